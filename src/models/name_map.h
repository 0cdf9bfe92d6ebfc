// The one place where checkpoint layouts meet: every model binds diffusers-style names (the names
// in a diffusers folder's component, without the "<component>/" prefix). Single-file (ldm)
// checkpoints are converted here, component by component; nowhere else knows ldm names.
#pragma once
#include <string>
#include <vector>

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

// The tensors of a standalone VAE file (--vae) under diffusers names, from any of its layouts: bare
// ldm names (encoder.down.0.block.0.norm1.weight, quant_conv.weight; EMA copies and loss.* left
// out), a checkpoint's first_stage_model.* names, diffusers AutoencoderKL names in one file (the old
// query/key/value/proj_attn attention names too) or a diffusers vae folder. Throws diffuse::Error
// naming the file when it holds no VAE tensors or tensors it cannot name.
WeightStore vae_file_weights(const TensorFile& f);

// The tensors of a UNet-only file (--unet, ComfyUI's "unet" / "diffusion_models" files) under
// diffusers names: bare ldm names (input_blocks.0.0.weight, time_embed.0.weight), a checkpoint's
// model.diffusion_model.* names, diffusers UNet2DConditionModel names in one file (conv_in.weight,
// down_blocks.*) or a diffusers unet folder. Throws diffuse::Error naming the file when it holds no
// UNet tensors or tensors it cannot name.
WeightStore unet_file_weights(const TensorFile& f);

// The inverse of component_weights for an ldm single file (writing a trained model back in the
// original layout): for each tensor of the file that component `c`'s mapping reads, in file order,
// the diffusers tensor(s) made from it. One diffusers tensor holds the same values, possibly
// reshaped (the VAE's mid-block attention [C, C, 1, 1] <-> [C, C]); several are consecutive row
// blocks of it (OpenCLIP's fused in_proj: q, k, v); `transposed`: the one diffusers tensor is its
// 2-D transpose (SDXL's text_projection). Tensors the mapping leaves out (position_ids, SD 2.x's
// unused last text block, logit_scale, ...) are not listed. Throws as component_weights does, and
// for a diffusers folder (no ldm names to map back to).
struct LdmSource {
  std::string ldm_name;
  std::vector<std::string> diffusers;
  bool transposed = false;
};
std::vector<LdmSource> ldm_tensor_sources(const TensorFile& f, Component c, Family family);

// The ldm tensor of shape `ldm_shape` rebuilt from its diffusers tensors `parts` (in the order of
// s.diffusers, one dtype), in their dtype. Throws naming s.ldm_name when the shapes do not fit.
Tensor ldm_tensor_from(const LdmSource& s, const Shape& ldm_shape, const std::vector<Tensor>& parts);

// The diffusers name of one ldm UNet tensor or module name (after "model.diffusion_model.", e.g.
// "input_blocks.1.1.proj_in.weight" -> "down_blocks.0.attentions.0.proj_in.weight") for a UNet with
// `layers_per_block` resnets per level; empty if the ldm mapping does not know the name. Module
// paths work too when given a dummy ".weight" tail. Used to resolve LoRA files written with ldm
// module names (kohya's SDXL files).
std::string ldm_unet_name_to_diffusers(const std::string& ldm_name, int layers_per_block);

// The inverse: the ldm name of one diffusers UNet tensor or module name ("<module>.weight";
// "down_blocks.1.attentions.0.proj_in.weight" -> "input_blocks.4.1.proj_in.weight") for a UNet
// with `layers_per_block` resnets per level and cross_attn[level] (UNetConfig::cross_attn, down
// order) saying which levels have transformers (an up level's upsampler follows its attention);
// empty if the name is not one of such a UNet's. kohya's SDXL LoRA files name modules this way.
std::string diffusers_unet_name_to_ldm(const std::string& name, int layers_per_block,
                                       const std::vector<bool>& cross_attn);

// The tensors of a ControlNet under diffusers ControlNetModel names, from any of its layouts:
//  - a diffusers folder: the component folder itself (config.json says ControlNetModel, bare names)
//    or a pipeline folder's "controlnet/" component;
//  - a single file with diffusers names (controlnet_cond_embedding.*, controlnet_down_blocks.*);
//  - a single file in the original (ControlNet / cldm) layout, with the "control_model." prefix
//    (also when the file bundles a whole SD model) or bare: time_embed, input_blocks and
//    middle_block as in an ldm UNet, input_hint_block.{0,2,..,2n} (conv_in, blocks.0..n-2, conv_out:
//    the odd entries are SiLUs), zero_convs.N.0 (controlnet_down_blocks.N), middle_block_out.0
//    (controlnet_mid_block).
// Throws diffuse::Error naming the file when it holds no ControlNet or tensors it cannot name.
WeightStore controlnet_weights(const TensorFile& f);

}  // namespace diffuse
