#include "train/unet_trainer.h"

#include <cstring>

#include "core/arena.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/name_map.h"
#include "train/layer_params.h"

namespace diffuse::train {

UNetTrainer::UNetTrainer(SDModel& model, Backend& be) : model_(model), be_(be) {
  DF_CHECK(model.unet.loaded(), "training: the model's UNet is not loaded");
  DF_CHECK(!model.lora_merged.unet, model.path, ": training needs the UNet without merged LoRA weights");
  DF_CHECK(be.weight_format() == WeightFormat::Native, "training: the backend must use native (not int8) weights");
  const TensorFile f = open_model_file(model.path);
  const WeightStore store = component_weights(f, Component::UNet, model.family);
  // bf16 compute keeps the frozen layers' plain weights in bf16 as well (train_param converts
  // the ones it trains to f32).
  const DType plain = be.effective_precision() == Precision::BF16 ? DType::BF16 : DType::F32;
  register_layers(grads_, model.unet.prepared(), model.unet.norms(), store, plain);
}

Param& UNetTrainer::train_param(const std::string& name) {
  if (auto it = trained_.find(name); it != trained_.end()) return *it->second;
  std::unique_ptr<Param>& p = trained_[name];
  try {
    p = make_trainable(grads_, model_.unet.prepared(), model_.unet.norms(), name, "UNet");
  } catch (...) {
    trained_.erase(name);
    throw;
  }
  return *p;
}

bool UNetTrainer::has_param(const std::string& name) const {
  return is_trainable(model_.unet.prepared(), model_.unet.norms(), name);
}

void UNetTrainer::apply_param(const std::string& name) { reprepare(be_, grads_, model_.unet.prepared(), name); }

UNetTrainer::Step UNetTrainer::run(const NoisedBatch& batch, const Tensor& context, const std::vector<float>& weights,
                                   bool backward, float grad_scale, const Tensor* text_embeds, const Tensor* time_ids,
                                   Tensor* dcontext, Tensor* dtext_embeds) {
  arena_.reset();
  Ctx c{be_, arena_, DType::F32, &ws_, &grads_};
  std::vector<float> t(batch.timesteps.begin(), batch.timesteps.end());
  UNetTrace trace;
  Tensor pred = model_.unet.forward_train(c, batch.noisy, t, context, text_embeds, time_ids, trace, checkpointing_);
  Step s;
  s.pred = pred.clone();
  s.loss = mse_loss(s.pred, batch.target, weights, grad_scale);
  if (backward) model_.unet.backward(c, trace, s.loss.dpred, nullptr, dcontext, dtext_embeds);
  return s;
}

}  // namespace diffuse::train
