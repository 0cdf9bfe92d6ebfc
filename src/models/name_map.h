// The one place where checkpoint layouts meet: every model binds diffusers-style names (the names
// in a diffusers folder's component, without the "<component>/" prefix). Single-file (ldm)
// checkpoints are converted here, component by component; nowhere else knows ldm names.
#pragma once
#include <string>

#include "io/tensor_file.h"
#include "models/family.h"
#include "nn/weights.h"

namespace diffuse {

// The tensors of component `c` from a model file of either layout, under diffusers names.
// diffusers folders: "<folder>/<name>" -> "<name>" (folder: unet, vae, text_encoder, text_encoder_2).
// ldm single files: converted (OpenCLIP fused in_proj split into q/k/v views, SDXL's transposed
// text_projection transposed back, SD 2.x's unused last text block left out, ...).
// Tensors the component does not use (position_ids, logit_scale, EMA copies, ...) are not added.
// Throws diffuse::Error naming the file if the component is absent.
WeightStore component_weights(const TensorFile& f, Component c, Family family);

}  // namespace diffuse
