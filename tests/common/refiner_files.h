// A tiny SDXL refiner written in the published ldm layout of sd_xl_refiner_1.0, made from the tiny
// SDXL base fixture: its one text encoder, OpenCLIP ViT-bigG, under conditioner.embedders.0.model.*
// (the base's encoder 2 copied, so the refiner's text conditioning equals the base's encoder-2
// half), model.diffusion_model.* with cross-attention to that encoder's width (new attn2.to_k/to_v)
// and label_emb taking pooled + 5 x 256 time-id sinusoids (a new label_emb.0.0), and
// first_stage_model.*. The base's CLIP ViT-L (conditioner.embedders.0.transformer.*) is left out.
#pragma once
#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "io/tensor_file.h"

namespace refiner_files {

inline diffuse::Tensor randn_tensor(const diffuse::Shape& s, uint32_t seed) {
  diffuse::Tensor t = diffuse::Tensor::empty(s);
  std::mt19937 g(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const float scale = 1.0f / std::sqrt(float(s.numel() / s[0]));
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g) * scale;
  return t;
}

struct RefinerShape {
  int time_ids = 5, time_dim = 256;  // label_emb input = pooled + time_ids · time_dim
  bool context_from_encoder = true;  // false: keep the base's (te1 + te2) context width
};

// Writes the refiner made from the SDXL single file `base` to `out`. Throws diffuse::Error when
// `base` lacks SDXL's encoder 2.
inline void write_refiner(const std::string& base, const std::string& out, const RefinerShape& rs = {}) {
  using namespace diffuse;
  auto ends_with = [](const std::string& s, const std::string& e) {
    return s.size() >= e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0;
  };
  TensorFile f = open_model_file(base);
  const Tensor* proj = f.find("conditioner.embedders.1.model.text_projection");  // [W, P]
  const Tensor* tok = f.find("conditioner.embedders.1.model.token_embedding.weight");
  DF_CHECK(proj && tok, base, ": no SDXL encoder 2 to make a refiner from");
  const int64_t P = proj->dim(1), W = tok->dim(1);
  std::vector<std::pair<std::string, Tensor>> ts;
  uint32_t seed = 1;
  const std::string unet = "model.diffusion_model.", te2 = "conditioner.embedders.1.model.";
  for (const TensorEntry& e : f.tensors) {
    const std::string& n = e.name;
    if (n.rfind("conditioner.embedders.0.", 0) == 0) continue;  // CLIP ViT-L: not in a refiner
    if (n.rfind(te2, 0) == 0) {
      ts.emplace_back("conditioner.embedders.0.model." + n.substr(te2.size()), e.tensor);
    } else if (n.rfind(unet, 0) == 0 && rs.context_from_encoder &&
               (ends_with(n, "attn2.to_k.weight") || ends_with(n, "attn2.to_v.weight"))) {
      ts.emplace_back(n, randn_tensor({e.tensor.dim(0), W}, seed++));
    } else if (n == unet + "label_emb.0.0.weight") {
      ts.emplace_back(n, randn_tensor({e.tensor.dim(0), P + rs.time_ids * rs.time_dim}, seed++));
    } else {
      ts.emplace_back(n, e.tensor);
    }
  }
  save_safetensors(out, ts);
}

}  // namespace refiner_files
