// Model family detection from tensor names and shapes (single files carry no config), and a
// per-component summary of a model file.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/tensor_file.h"

namespace diffuse {

enum class Family { Unknown, SD1, SD2, SDXL };
const char* family_name(Family f);  // "sd1", "sd2", "sdxl", "unknown"

// Which component a tensor belongs to, in both layouts.
enum class Component { UNet, VAE, TextEncoder, TextEncoder2, EMA, Other };
const char* component_name(Component c);  // "unet", "vae", "text_encoder", ...

struct ComponentSummary {
  Component component;
  int64_t tensors = 0;
  int64_t parameters = 0;
};

struct ModelSummary {
  Family family = Family::Unknown;
  std::string layout;        // "ldm" (original single file) or "diffusers"
  int unet_in_channels = 0;  // 4, or 9 for inpainting models; 0 if no UNet
  int context_dim = 0;       // cross-attention context width (768 SD1, 1024 SD2, 2048 SDXL, 1280 refiner)
  // SDXL refiner (family SDXL, same VAE latent space): one text encoder, OpenCLIP ViT-bigG
  // (ldm conditioner.embedders.0.model.*, diffusers text_encoder_2/ alone), and a UNet whose
  // added embedding takes the pooled text + 5 time ids (size, crop, aesthetic score).
  bool refiner = false;
  std::vector<ComponentSummary> components;  // in UNet, VAE, TextEncoder, TextEncoder2, EMA, Other order
  std::vector<std::string> problems;         // why detection was uncertain, if it was
};

Component component_of(const std::string& name, bool diffusers_layout);
ModelSummary summarize_model(const TensorFile& f);
// "sdxl-refiner" for a refiner, else family_name(s.family).
std::string model_kind_name(const ModelSummary& s);

}  // namespace diffuse
