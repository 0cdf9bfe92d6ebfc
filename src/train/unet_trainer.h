// One training step on the UNet: forward with the Grads (LoRA adapters apply), the objective's
// loss, backward into the gradients the Grads asks for. Every trainer (diffuse train check, LoRA
// training, full fine-tuning) runs its steps through this class, so the references checked by
// `diffuse train check` cover the code that trains.
//
// The backward passes need the plain f32 weights of every layer they pass through: they are read
// once from the model file (the same tensors SDModel::load prepared), so the UNet must be the
// model file's own (no LoRA merged into it).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/arena.h"
#include "models/sd_model.h"
#include "nn/grad.h"
#include "train/objective.h"
#include "train/optim.h"

namespace diffuse::train {

class UNetTrainer {
 public:
  // model.unet loaded with `be` (f32 compute); reads the UNet's plain weights from model.path.
  UNetTrainer(SDModel& model, Backend& be);

  Grads& grads() { return grads_; }
  // Gradient checkpointing per block (default): the backward recomputes each block's forward.
  // Off: the forward keeps every block's intermediates (more memory, about a forward less).
  void set_checkpointing(bool on) { checkpointing_ = on; }
  UNet& unet() { return model_.unet; }

  // Full fine-tuning: makes the UNet parameter `name` (diffusers name: "<module>.weight" or
  // ".bias" of a convolution, linear layer or norm) collect gradients, and returns it (its value
  // tensor is the trainer's f32 copy; updating the prepared layer from it is apply_param()).
  // Throws naming the parameter if the UNet has none of that name.
  Param& train_param(const std::string& name);
  // Whether the UNet has a trainable parameter of that name (checks, no side effects).
  bool has_param(const std::string& name) const;
  // Re-prepares the layer of a trained weight/bias from its f32 value (after an optimiser step).
  void apply_param(const std::string& name);

  struct Step {
    LossResult loss;
    Tensor pred;  // [B, H, W, C] f32 (a copy)
  };
  // Forward + loss (+ backward when `backward`): gradients add into the trained parameters
  // (grad_scale multiplies them: 1/accumulation steps). context: [B, S, ctx];
  // text_embeds/time_ids for SDXL.
  // dcontext (with backward): receives dL/dcontext (f32, context's shape), for training the
  // text encoder that produced the context; dtext_embeds (SDXL) dL/dtext_embeds (f32,
  // text_embeds' shape), for the encoder that produced the pooled embedding.
  Step run(const NoisedBatch& batch, const Tensor& context, const std::vector<float>& weights, bool backward,
           float grad_scale = 1.0f, const Tensor* text_embeds = nullptr, const Tensor* time_ids = nullptr,
           Tensor* dcontext = nullptr, Tensor* dtext_embeds = nullptr);

 private:
  SDModel& model_;
  Backend& be_;
  Grads grads_;
  std::map<std::string, std::unique_ptr<Param>> trained_;  // full fine-tune parameters by name
  bool checkpointing_ = true;
  Workspace ws_;
  Arena arena_;  // a step's activations (block inputs, skips, gradients): reset per step, keeps its size
};

}  // namespace diffuse::train
