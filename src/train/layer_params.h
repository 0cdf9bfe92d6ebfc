// Full fine-tuning of a model component's own weights (not adapters): the weight or bias of any
// convolution, linear layer or norm the component bound (its PreparedIndex and NormIndex,
// nn/weights.h) becomes a trained f32 Param whose gradient the backward passes fill (through the
// Grads the component's layers were registered in, nn/grad.h). UNetTrainer::train_param uses this
// for the UNet; `train full` for the text encoder as well.
#pragma once
#include <memory>
#include <string>

#include "backend/backend.h"
#include "nn/grad.h"
#include "nn/weights.h"
#include "train/optim.h"

namespace diffuse::train {

// Makes parameter `name` ("<module>.weight" or "<module>.bias", the component's names) collect
// gradients and returns it: for a layer its value is the registered f32 plain weight (converted to
// f32 if kept in bf16) viewed in the checkpoint's shape ([O, I, 1, 1] for a 1×1 convolution bound
// as linear); for a norm the gamma/beta the norm reads (updates apply at once). The layers must be
// registered in `grads` (register_layers). Throws naming `component` and the parameter when the
// component has none of that name, or it ends in neither .weight nor .bias.
std::unique_ptr<Param> make_trainable(Grads& grads, const PreparedIndex& prepared, const NormIndex& norms,
                                      const std::string& name, const std::string& component);

// Whether the component has a trainable parameter of that name (no side effects).
bool is_trainable(const PreparedIndex& prepared, const NormIndex& norms, const std::string& name);

// Re-prepares the layer of a trained weight or bias from its f32 value for `be` (after an
// optimiser step); norms read their tensors directly and need nothing.
void reprepare(Backend& be, Grads& grads, PreparedIndex& prepared, const std::string& name);

// The parameter names of every layer and norm of a component, sorted: "<module>.weight" and,
// where bound, "<module>.bias".
std::vector<std::string> trainable_names(const PreparedIndex& prepared, const NormIndex& norms);

}  // namespace diffuse::train
