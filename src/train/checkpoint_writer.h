// Writing a fully fine-tuned model as one file in the original (ldm) layout, the layout A1111,
// ComfyUI, diffusers' from_single_file and `diffuse generate` load: every tensor of the input
// checkpoint, with the trained ones put back under their original names (models/name_map.h maps
// them: ldm_tensor_sources, ldm_tensor_from), so the VAE, untrained encoders and any other key
// stay exactly as they were.
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
  int kept = 0;         // written as stored
  int dropped_ema = 0;  // model_ema.* tensors left out (stale copies of the untrained weights)
};

// Writes `f` (an ldm single file: safetensors or .ckpt) to `path` as safetensors through the safe
// writer: in f's order, each tensor rebuilt from trained values (converted to `dtype`) where
// `trained` has all its diffusers parts, every other tensor as stored, except model_ema.* (the
// input's EMA copies would be stale). Metadata: f's safetensors metadata with `metadata` added
// over it. Throws naming the file and tensor when a trained tensor has no place in f's layout, or
// an ldm tensor gets only some of its parts.
CheckpointWriteResult save_ldm_checkpoint(const std::string& path, const TensorFile& f, Family family,
                                          const std::vector<TrainedComponent>& trained, DType dtype,
                                          const std::map<std::string, std::string>& metadata);

}  // namespace diffuse::train
