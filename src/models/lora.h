// LoRA files merged into a loaded SDModel: W' = W + Σ multiplier · scale · ΔW per module.
//
// Formats (one file may mix them):
//  - kohya / A1111: "lora_unet_<module>", "lora_te_<module>" (SDXL: "lora_te1_", "lora_te2_") with
//    ".lora_down.weight", ".lora_up.weight" and ".alpha"; <module> is a module path with '.' written
//    as '_', in diffusers form ("down_blocks_0_attentions_0_proj_in") or, for the UNet, ldm form
//    ("input_blocks_1_1_proj_in", what kohya's SDXL files use). LoCon on 3×3 convolutions: down
//    [r, in, 3, 3], up [out, r, 1, 1]; LoCon with a Tucker core: down [r, in, 1, 1],
//    ".lora_mid.weight" [r, r, kh, kw], up [out, r, 1, 1].
//  - diffusers / PEFT: "unet.<module>", "text_encoder.<module>", "text_encoder_2.<module>" with
//    ".lora_A.weight" / ".lora_B.weight" (PEFT) or ".lora.down.weight" / ".lora.up.weight",
//    ".lora_linear_layer.down/up.weight", ".processor.to_q_lora.down/up.weight" (older diffusers).
//    PEFT's scale comes from the safetensors metadata "lora_adapter_metadata" (diffusers writes the
//    adapter config there: "unet.lora_alpha", "unet.r", "unet.alpha_pattern", "unet.rank_pattern",
//    "unet.use_rslora", ...; unprefixed for a single model): lora_alpha / r (rsLoRA: / √r).
//  - LyCORIS (models/lycoris.cpp), under the same module names: LoHa ("hada_w1_a", "hada_w1_b",
//    "hada_w2_a", "hada_w2_b", Tucker "hada_t1", "hada_t2"), LoKr ("lokr_w1" or "lokr_w1_a" ·
//    "lokr_w1_b", "lokr_w2" or "lokr_w2_a" · "lokr_w2_b", Tucker "lokr_t2"), full differences
//    (".diff"; ".diff_b" bias differences are reported, not applied), and DoRA on any of them
//    ("dora_scale"; PEFT's "lora_magnitude_vector").
// Scale: alpha / rank when the file has an alpha for the module (LoKr: only when a factor is
// decomposed, rank that factor's; else 1), else 1 (kohya without alpha means alpha = rank; PEFT
// files without metadata carry their scale in B). DoRA: m ⊙ V / ‖V‖ with V = W + scale · ΔW, the
// norm per input channel for LyCORIS's dora_scale [1, in(, 1, 1)] (+ f32 epsilon, as LyCORIS),
// per output channel for [out, 1(, 1, 1)], a vector [out] and PEFT's magnitude; a multiplier M
// gives W + M · (m ⊙ V / ‖V‖ − W) (LyCORIS's result at M = 1, the base weight at M = 0).
//
// Names are resolved against the modules the loaded model actually has (every tensor name
// "<module>.weight" of rank 2 or 4 of the component, after name_map.h's layout conversion), so a
// LoRA works the same on a single-file or a diffusers-folder model. Keys that are not LoRA tensors,
// incomplete factor sets and modules the model lacks are reported, never dropped silently; a file
// of which nothing applies is an error, and so is a factor set whose shapes are inconsistent or do
// not fit the model's weight (a file for another architecture), naming the file, key and shapes.
//
// Applying re-prepares only the weights of the modules the new set or the previous set touches
// (models/lora_apply.cpp): merged weights, or the ORIGINAL base weights read again from the model
// file (safetensors are memory-mapped, so this reads only those tensors), prepared exactly as
// SDModel::load prepares them, and swapped into the layers all at once after every replacement
// has been built. Switching LoRA sets in one process (A -> none -> B) gives bit for bit what fresh
// processes give, nothing is ever subtracted, and a switch that fails (a file that does not fit,
// an unreadable model file, out of memory) leaves the model as it was. Merged weights are f32;
// the backend's prepare converts them to its compute type.
#pragma once
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "models/sd_model.h"

namespace diffuse {

enum class LoraTarget { UNet, TextEncoder, TextEncoder2 };
const char* lora_target_name(LoraTarget t);  // "unet", "text_encoder", "text_encoder_2"

// What a module's tensors are: a LoRA pair (LoCon included), LyCORIS LoHa or LoKr, or a full
// weight difference.
enum class LoraKind { LoRA, LoHa, LoKr, Full };
const char* lora_kind_name(LoraKind k);  // "LoRA", "LoHa", "LoKr", "full"

struct LoraEntry {
  LoraTarget target = LoraTarget::UNet;
  std::string key;     // the module's key stem in the file ("lora_unet_down_blocks_0_..._to_q", "unet.down_blocks.0....to_q")
  std::string module;  // without the target prefix: underscored (kohya) or dotted (diffusers)
  bool underscored = false;
  LoraKind kind = LoraKind::LoRA;
  // LoRA: down [r, in] or [r, in, kh, kw]; up [out, r] or [out, r, 1, 1] (as stored, any float
  // type). With a Tucker core `mid` [r, r', kh, kw]: down [r', in(, 1, 1)], up [out, r(, 1, 1)].
  Tensor down, up, mid;
  // LoHa: w1a [out, r], w1b [r, in·kh·kw] or [r, in, kh, kw], w2a, w2b alike; Tucker: t1, t2
  // [r, r, kh, kw] with w1a, w2a [r, out] and w1b, w2b [r, in].
  // LoKr: w1 [a, c] or w1a [a, r] · w1b [r, c]; w2 [b, d(, kh, kw)] or w2a [b, r] · w2b [r, d·kh·kw];
  // Tucker: t2 [r, r, kh, kw] with w2a [r, b], w2b [r, d]. ΔW = kron(w1, w2) as [a·b, c·d, kh, kw].
  Tensor w1a, w1b, w2a, w2b, t1, t2, w1, w2;
  Tensor diff;            // full: the weight difference (the base's shape)
  Tensor dora;            // DoRA magnitude: "dora_scale" (LyCORIS) or "lora_magnitude_vector" (PEFT)
  bool dora_peft = false; // the magnitude is PEFT's (per output channel, no epsilon)
  bool has_alpha = false;
  float alpha = 0;
  bool rs_lora = false;   // PEFT use_rslora: alpha / √rank
  // The rank the scale divides by: down's rows (LoRA), w1b's (LoHa), the decomposed factor's
  // (LoKr; 0 when neither is), 0 for full differences.
  int64_t rank() const;
  // alpha / rank, or 1 without an alpha (or without a rank).
  float scale() const;
  // A LoRA pair without a Tucker core or DoRA (merged by the blocked GEMM path).
  bool plain() const { return kind == LoraKind::LoRA && !mid.defined() && !dora.defined(); }
};

// Whether an entry fits a base weight of shape `base`: [O, I] or [O, I, kh, kw]. LoRA: down [r, I]
// or [r, I, kh, kw] (2-D only for kh = kw = 1); up [O, r] or [O, r, 1, 1] (load_lora checked that
// up's r is down's); LyCORIS factors: see models/lycoris.cpp. A DoRA magnitude must match too.
bool lora_fits(const Shape& base, const LoraEntry& e);
// The entry's tensors and shapes for messages: "down [4, 32] and up [32, 4]",
// "hada_w1_a [32, 4], hada_w1_b [4, 288], ...", with ", dora_scale [1, 32]" when present.
std::string lora_factor_shapes(const LoraEntry& e);

struct LoraFile {
  std::string path;
  std::string name;                  // file name without directory and extension (A1111's name)
  std::vector<LoraEntry> entries;    // file order of their down tensors
  std::vector<std::string> unknown;  // "<key> (why)": not LoRA/LyCORIS tensors, or an incomplete factor set
  std::map<std::string, std::string> metadata;  // safetensors __metadata__ (kohya's ss_* training info)
  int metadata_alphas = 0;           // entries whose alpha came from PEFT's lora_adapter_metadata
};

// What a file holds, for `diffuse info`: (label, modules) in a fixed order, labels present only:
// "LoRA", "LoCon Tucker", "LoHa", "LoHa Tucker", "LoKr", "LoKr Tucker", "full", "DoRA" (modules
// with a magnitude, of any kind), "unet", "text_encoder", "text_encoder_2".
std::vector<std::pair<std::string, int>> lora_summary(const LoraFile& f);

// Reads a LoRA or LyCORIS file (safetensors, or a PyTorch .pt/.ckpt holding a flat state dict).
// Tensors borrow the mapped file. Throws diffuse::Error naming the file if it cannot be read, a
// module's factors have inconsistent shapes (or disagree with its lora_adapter_metadata rank),
// or it holds no LoRA tensors at all.
LoraFile load_lora(const std::string& path);

struct LoraApplyReport {
  int matched = 0;                     // modules merged (over all files)
  std::vector<std::string> unmatched;  // "<file name>: <key> (why)": unknown keys, modules the model lacks
  // One line for logs: "lora: 128 modules merged; 3 keys not applied (first: a, b, c)".
  std::string summary() const;
};

// The merged weights of one component: diffusers tensor names -> f32 tensors of the base shape.
struct LoraMerge {
  std::map<std::string, Tensor> unet, te, te2;
  LoraApplyReport report;
};

// Computes (without touching the model) the merged weights for `loras` (file, multiplier) against
// `model`'s base weights, read from model.path. Throws diffuse::Error when a file matches nothing,
// or a module's up·down does not have the shape of the model's weight (a LoRA for another
// architecture), naming the file, key and shapes.
LoraMerge merge_loras(const SDModel& model, const std::vector<std::pair<const LoraFile*, float>>& loras);

// The same, streamed: matches first (throwing as merge_loras() does, before any work), passes the
// names of the weights that will be merged to `on_names`, then calls `fn` once per weight with
// the merged f32 tensor (base shape) in a buffer reused for the next one: copy what you keep.
using MergedFn = std::function<void(LoraTarget, const std::string& name, const Tensor& merged)>;
LoraApplyReport merge_each(const SDModel& model, const std::vector<std::pair<const LoraFile*, float>>& loras,
                           const std::function<void(const std::map<LoraTarget, std::set<std::string>>&)>& on_names,
                           const MergedFn& fn);

// Merges `loras` into `model` (replacing whatever set was applied before; empty = back to the
// base weights). Only weights the set or the previous set touches are re-prepared. Returns what
// matched and what did not; throws as merge_loras() does (or on any later failure), leaving the
// model as it was. Needs exclusive use of the model (no pass running on it).
LoraApplyReport apply_loras(SDModel& model, Backend& be, const std::vector<std::pair<const LoraFile*, float>>& loras);

// A1111 prompt tags: every "<lora:NAME>" or "<lora:NAME:MULT>" (MULT a number, default 1) is removed
// from the prompt (only the tag; the surrounding text stays as it is) and appended to *tags in
// prompt order. Other "<type:...>" extra-network tags are left in the text. Throws diffuse::Error for
// an empty name, a multiplier that is not a number, or A1111's separate text-encoder / UNet
// multipliers ("<lora:NAME:0.8:0.5>"), which this engine does not support.
std::string extract_lora_tags(const std::string& prompt, std::vector<std::pair<std::string, float>>* tags);

// The file of LoRA NAME in `dir`: NAME.safetensors, NAME.pt or NAME.ckpt (first that exists), or
// NAME itself when it already ends in one of those. Throws diffuse::Error naming NAME and dir.
std::string resolve_lora_path(const std::string& name, const std::string& dir);

// A1111's LoRA hash (modules/hashes.py with use_addnet_hash): the SHA-256 hex digest of a
// safetensors file's data after its header (sd-webui-additional-networks' "addnet" hash), or of
// the whole file for other formats. The PNG parameters carry its first 12 digits:
//   Lora hashes: "NAME: 0123456789ab, NAME2: ..."
// Throws diffuse::Error naming the file if it cannot be read.
std::string lora_hash(const std::string& path);
// A1111's "Lora hashes" field value from (name, full or short hash) pairs, with the quotes A1111
// writes around it: "NAME: 0123456789ab, NAME2: 0123456789ab". Names lose ':' and ',' (A1111's
// remove_symbols), hashes are cut to 12 digits. Empty for no pairs.
std::string format_lora_hashes(const std::vector<std::pair<std::string, std::string>>& name_hash);

}  // namespace diffuse
