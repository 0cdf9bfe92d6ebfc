// Writing a fully fine-tuned model as one file in the original (ldm) layout, the layout A1111,
// ComfyUI, diffusers' from_single_file and `diffuse generate` load: every tensor of the input
// checkpoint, with the trained ones put back under their original names (models/name_map.h maps
// them: ldm_tensor_sources, ldm_tensor_from); the VAE, untrained encoders and any other key keep
// their values. Like kohya's --save_precision, every float tensor is written in the save
// precision, the untrained ones too (an f32 VAE beside an f16-trained UNet is cast to f16), so
// the file has one float dtype; integer tensors (position_ids) are written as stored.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "io/tensor_file.h"
#include "models/family.h"

namespace diffuse::train {

// A trained component's tensors by diffusers name (any float dtype; usually the f32 masters).
struct TrainedComponent {
  Component component;
  std::map<std::string, Tensor> tensors;
};

struct CheckpointWriteResult {
  int replaced = 0;     // ldm tensors written from trained values
  int kept = 0;         // not trained: written with their stored values
  int converted = 0;    // of those, float tensors cast to the save precision
  int dropped_ema = 0;  // model_ema.* tensors left out (stale copies of the untrained weights)
};

// Writes `f` (an ldm single file: safetensors or .ckpt) to `path` as safetensors through the safe
// writer: in f's order, each tensor rebuilt from trained values (converted to `dtype`) where
// `trained` has all its diffusers parts, every other tensor with its stored values (float ones
// converted to `dtype`), except model_ema.* (the input's EMA copies would be stale). Metadata:
// f's safetensors metadata with `metadata` added over it. Throws naming the file and tensor when a trained tensor has no place in f's layout, or
// an ldm tensor gets only some of its parts.
CheckpointWriteResult save_ldm_checkpoint(const std::string& path, const TensorFile& f, Family family,
                                          const std::vector<TrainedComponent>& trained, DType dtype,
                                          const std::map<std::string, std::string>& metadata);

// "152 untrained (40 converted to f16)" / "152 untrained as they were": for the trainers' logs.
std::string describe_untrained(const CheckpointWriteResult& r, DType dtype);

}  // namespace diffuse::train
