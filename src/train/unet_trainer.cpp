#include "train/unet_trainer.h"

#include <cstring>

#include "core/arena.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/name_map.h"

namespace diffuse::train {

static bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

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
  const bool bias = ends_with(name, ".bias");
  DF_CHECK(bias || ends_with(name, ".weight"), "training: UNet parameter '", name, "' should end in .weight or .bias");
  const std::string wname = bias ? name.substr(0, name.size() - 4) + "weight" : name;
  auto param = std::make_unique<Param>();
  param->name = name;
  if (auto it = model_.unet.prepared().find(wname); it != model_.unet.prepared().end()) {
    LayerParams& lp = grads_.layer(it->second.w.get(), "training");
    DF_CHECK(!bias || lp.b.defined(), "training: ", wname, " has no bias");
    if (lp.w.dtype() != DType::F32) lp.w = lp.w.to(DType::F32);  // trained: f32 master weights
    // Gradients in the checkpoint's shape ([O, I, 1, 1] for 1×1 convolutions bound as linear).
    const Shape shape = bias ? lp.b.shape() : it->second.checkpoint_shape;
    Tensor& g = bias ? lp.gb : lp.gw;
    if (!g.defined()) g = Tensor::zeros(shape);
    param->value = (bias ? lp.b : lp.w).reshape(shape);
    param->grad = g.reshape(shape);
  } else if (auto nt = model_.unet.norms().find(wname); nt != model_.unet.norms().end()) {
    NormParams* np = grads_.norm(nt->second.gamma.data());
    DF_ASSERT(np != nullptr);
    const Tensor& v = bias ? nt->second.beta : nt->second.gamma;
    Tensor& g = bias ? np->gbeta : np->ggamma;
    if (!g.defined()) g = Tensor::zeros(v.shape());
    param->value = v;  // the norm reads these f32 tensors directly: updates apply at once
    param->grad = g;
  } else {
    fail("training: the UNet has no parameter ", name);
  }
  Param& ref = *param;
  trained_[name] = std::move(param);
  return ref;
}

bool UNetTrainer::has_param(const std::string& name) const {
  const bool bias = ends_with(name, ".bias");
  if (!bias && !ends_with(name, ".weight")) return false;
  const std::string wname = bias ? name.substr(0, name.size() - 4) + "weight" : name;
  if (auto it = model_.unet.prepared().find(wname); it != model_.unet.prepared().end()) return !bias || it->second.bias;
  return model_.unet.norms().count(wname) != 0;
}

void UNetTrainer::apply_param(const std::string& name) {
  const bool bias = ends_with(name, ".bias");
  const std::string wname = bias ? name.substr(0, name.size() - 4) + "weight" : name;
  auto it = model_.unet.prepared().find(wname);
  if (it == model_.unet.prepared().end()) return;  // norms: updated in place
  PreparedEntry& e = it->second;
  const LayerParams& lp = grads_.layer(e.w.get(), "training");
  auto fresh = be_.prepare_like(*e.w, lp.w, lp.b, e.conv, e.params);
  e.w->swap_contents(*fresh);
}

UNetTrainer::Step UNetTrainer::run(const NoisedBatch& batch, const Tensor& context, const std::vector<float>& weights,
                                   bool backward, float grad_scale, const Tensor* text_embeds, const Tensor* time_ids,
                                   Tensor* dcontext) {
  arena_.reset();
  Ctx c{be_, arena_, DType::F32, &ws_, &grads_};
  std::vector<float> t(batch.timesteps.begin(), batch.timesteps.end());
  UNetTrace trace;
  Tensor pred = model_.unet.forward_train(c, batch.noisy, t, context, text_embeds, time_ids, trace, checkpointing_);
  Step s;
  s.pred = pred.clone();
  s.loss = mse_loss(s.pred, batch.target, weights, grad_scale);
  if (backward) model_.unet.backward(c, trace, s.loss.dpred, nullptr, dcontext);
  return s;
}

}  // namespace diffuse::train
