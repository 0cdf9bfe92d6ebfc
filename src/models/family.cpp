#include "models/family.h"

#include <map>

namespace diffuse {

const char* family_name(Family f) {
  switch (f) {
    case Family::SD1: return "sd1";
    case Family::SD2: return "sd2";
    case Family::SDXL: return "sdxl";
    case Family::Unknown: break;
  }
  return "unknown";
}

const char* component_name(Component c) {
  switch (c) {
    case Component::UNet: return "unet";
    case Component::VAE: return "vae";
    case Component::TextEncoder: return "text_encoder";
    case Component::TextEncoder2: return "text_encoder_2";
    case Component::EMA: return "ema";
    case Component::Other: break;
  }
  return "other";
}

static bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

Component component_of(const std::string& name, bool diffusers_layout) {
  if (diffusers_layout) {
    if (starts_with(name, "unet/")) return Component::UNet;
    if (starts_with(name, "vae/")) return Component::VAE;
    if (starts_with(name, "text_encoder/")) return Component::TextEncoder;
    if (starts_with(name, "text_encoder_2/")) return Component::TextEncoder2;
    return Component::Other;
  }
  if (starts_with(name, "model.diffusion_model.")) return Component::UNet;
  if (starts_with(name, "first_stage_model.")) return Component::VAE;
  // SDXL: embedders.0 is CLIP ViT-L (transformer.*), embedders.1 OpenCLIP ViT-bigG (model.*); the
  // refiner has only the OpenCLIP one, as embedders.0.model.*: encoder 2 by what it is.
  if (starts_with(name, "conditioner.embedders.0.model.")) return Component::TextEncoder2;
  if (starts_with(name, "cond_stage_model.") || starts_with(name, "conditioner.embedders.0."))
    return Component::TextEncoder;
  if (starts_with(name, "conditioner.embedders.1.")) return Component::TextEncoder2;
  if (starts_with(name, "model_ema.")) return Component::EMA;
  return Component::Other;
}

ModelSummary summarize_model(const TensorFile& f) {
  ModelSummary s;
  bool diffusers = f.format == "diffusers";
  s.layout = diffusers ? "diffusers" : "ldm";
  std::map<Component, ComponentSummary> comps;
  for (const TensorEntry& e : f.tensors) {
    Component c = component_of(e.name, diffusers);
    ComponentSummary& cs = comps.try_emplace(c, ComponentSummary{c}).first->second;
    cs.tensors++;
    cs.parameters += e.tensor.numel();
  }
  for (auto& [c, cs] : comps) s.components.push_back(cs);

  auto shape_of = [&](const std::string& name) -> const Shape* {
    const Tensor* t = f.find(name);
    return t ? &t->shape() : nullptr;
  };
  // UNet input channels and context width.
  const std::string unet = diffusers ? "unet/" : "model.diffusion_model.";
  if (const Shape* in = shape_of(unet + (diffusers ? "conv_in.weight" : "input_blocks.0.0.weight")))
    if (in->rank() == 4) s.unet_in_channels = int((*in)[1]);
  // The first cross-attention key projection gives the context width (SDXL has none at level 0).
  for (const TensorEntry& e : f.tensors) {
    if (e.name.rfind(unet, 0) == 0 && e.name.find("attn2.to_k.weight") != std::string::npos &&
        e.tensor.rank() == 2) {
      s.context_dim = int(e.tensor.dim(1));
      break;
    }
  }
  // Linear (rank-2) proj_in means SD 2.x/XL style transformer blocks; conv (rank 4) is SD 1.x.
  int proj_rank = 0;
  for (const TensorEntry& e : f.tensors) {
    if (e.name.rfind(unet, 0) == 0 && e.name.find("proj_in.weight") != std::string::npos) {
      proj_rank = e.tensor.rank();
      break;
    }
  }
  bool has_add_embedding = diffusers ? shape_of("unet/add_embedding.linear_1.weight") != nullptr
                                     : shape_of("model.diffusion_model.label_emb.0.0.weight") != nullptr;
  bool te1 = false, te2 = false, openclip = false, clip_l = false;
  for (const ComponentSummary& c : s.components) {
    te1 |= c.component == Component::TextEncoder;
    te2 |= c.component == Component::TextEncoder2;
  }
  for (const TensorEntry& e : f.tensors) {
    if (starts_with(e.name, "cond_stage_model.model.")) openclip = true;
    if (starts_with(e.name, "cond_stage_model.transformer.")) clip_l = true;
  }

  if (te2 || has_add_embedding) {
    s.family = Family::SDXL;
    // The refiner: encoder 2 without encoder 1 (a UNet-only file cannot tell; it is a base).
    s.refiner = te2 && !te1;
  } else if (openclip || proj_rank == 2) {
    s.family = Family::SD2;
  } else if (clip_l || proj_rank == 4) {
    s.family = Family::SD1;
  } else {
    s.problems.push_back("no UNet transformer blocks or text encoder recognised: family unknown");
  }
  if (s.family == Family::SD1 && openclip) s.problems.push_back("SD 1.x UNet with an OpenCLIP text encoder");
  if (s.unet_in_channels == 0) s.problems.push_back("no UNet (conv_in) found");
  return s;
}

std::string model_kind_name(const ModelSummary& s) {
  return s.refiner ? "sdxl-refiner" : family_name(s.family);
}

}  // namespace diffuse
