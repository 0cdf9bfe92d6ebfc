// LoRA and LyCORIS factor sets of one module (internal to models/lora*.cpp): reading a module's
// tensors into a LoraEntry with their shape checks, and the weight difference each kind makes.
//
// The formulas are LyCORIS's (KohakuBlueleaf/LyCORIS, lycoris/modules/{locon,loha,lokr,full}.py),
// as A1111 (extensions-builtin/Lora/network_*.py) applies them; models/lora.h has the summary.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "models/lora.h"

namespace diffuse {

// One tensor of a module: its key in the file and the tensor.
struct RoleTensor {
  std::string key;
  Tensor t;
};
// A module's tensors by role: "down", "up", "mid", "alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a",
// "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
// "lokr_w2_b", "lokr_t2", "dora_scale", "magnitude" (PEFT's lora_magnitude_vector), "diff", "diff_b".
using ModuleTensors = std::map<std::string, RoleTensor>;

// The module stem and role of a LoRA / LyCORIS key ("lora_unet_x.hada_w1_a" -> "lora_unet_x",
// "hada_w1_a"); false if the key is none of them.
bool parse_lora_key(const std::string& key, std::string* stem, std::string* role);

// Fills e's kind, factors, alpha and DoRA magnitude (not its target or names) from one module's
// tensors. Returns false, appending "<key> (why)" to *unknown for each of them, when the set is
// incomplete (half a LoRA pair, an alpha alone, a LoHa without all four factors); keys of the
// module that are not applied (diff_b) are appended too. Throws diffuse::Error naming `path`, the
// module and the shapes when the factors present are inconsistent with each other.
bool assemble_entry(const std::string& path, const std::string& stem, const ModuleTensors& t, LoraEntry* e,
                    std::vector<std::string>* unknown);

// The term entry `e` adds, at multiplier `mult`, to a base weight w0 (f32 [O, K], K = I·kh·kw, of
// shape `base`, which lora_fits() accepted), written to out [O, K]:
//   mult · scale · ΔW, or with a DoRA magnitude m: mult · (m ⊙ V / ‖V‖ − w0), V = w0 + scale · ΔW.
// w0 is read only for DoRA. `gemm` is an fp32 CPU backend for the factor products.
void lycoris_term(Backend& gemm, const LoraEntry& e, const Shape& base, const float* w0, float mult, float* out);

}  // namespace diffuse
