// LoRA files merged into a loaded SDModel: W' = W + Σ multiplier · alpha / rank · up·down.
//
// Formats (one file may mix them):
//  - kohya / A1111: "lora_unet_<module>", "lora_te_<module>" (SDXL: "lora_te1_", "lora_te2_") with
//    ".lora_down.weight", ".lora_up.weight" and ".alpha"; <module> is a module path with '.' written
//    as '_', in diffusers form ("down_blocks_0_attentions_0_proj_in") or, for the UNet, ldm form
//    ("input_blocks_1_1_proj_in", what kohya's SDXL files use). LoCon on 3×3 convolutions: down
//    [r, in, 3, 3], up [out, r, 1, 1].
//  - diffusers / PEFT: "unet.<module>", "text_encoder.<module>", "text_encoder_2.<module>" with
//    ".lora_A.weight" / ".lora_B.weight" (PEFT) or ".lora.down.weight" / ".lora.up.weight",
//    ".lora_linear_layer.down/up.weight", ".processor.to_q_lora.down/up.weight" (older diffusers).
// Scale: multiplier · alpha / rank when the file has an alpha for the module, else multiplier
// (kohya without alpha means alpha = rank; PEFT files carry their scale in B).
//
// Names are resolved against the modules the loaded model actually has (every tensor name
// "<module>.weight" of rank 2 or 4 of the component, after name_map.h's layout conversion), so a
// LoRA works the same on a single-file or a diffusers-folder model. Keys that are not LoRA tensors
// (LyCORIS LoHa/LoKr, DoRA, full diffs, ...) and modules the model lacks are reported, never
// dropped silently; a file of which nothing applies is an error.
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

struct LoraEntry {
  LoraTarget target = LoraTarget::UNet;
  std::string key;     // the module's key stem in the file ("lora_unet_down_blocks_0_..._to_q", "unet.down_blocks.0....to_q")
  std::string module;  // without the target prefix: underscored (kohya) or dotted (diffusers)
  bool underscored = false;
  Tensor down, up;     // [r, in] or [r, in, kh, kw]; [out, r] or [out, r, 1, 1] (as stored, any float type)
  bool has_alpha = false;
  float alpha = 0;
  int64_t rank() const { return down.dim(0); }
  // alpha / rank, or 1 without an alpha.
  float scale() const { return has_alpha ? alpha / float(rank()) : 1.0f; }
};

// Whether a LoRA pair fits a base weight of shape `base`: [O, I] or [O, I, kh, kw]; down [r, I] or
// [r, I, kh, kw] (2-D only for kh = kw = 1); up [O, r] or [O, r, 1, 1] (load_lora checked that
// up's r is down's).
bool lora_fits(const Shape& base, const LoraEntry& e);

struct LoraFile {
  std::string path;
  std::string name;                  // file name without directory and extension (A1111's name)
  std::vector<LoraEntry> entries;    // file order of their down tensors
  std::vector<std::string> unknown;  // "<key> (why)": not LoRA down/up/alpha tensors, or lacking their pair
  std::map<std::string, std::string> metadata;  // safetensors __metadata__ (kohya's ss_* training info)
};

// Reads a LoRA file (safetensors, or a PyTorch .pt/.ckpt holding a flat state dict). Tensors borrow
// the mapped file. Throws diffuse::Error naming the file if it cannot be read, a pair has
// inconsistent shapes, or it holds no LoRA tensors at all.
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
