#include "train/layer_params.h"

#include <algorithm>

#include "core/error.h"

namespace diffuse::train {

namespace {

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

bool is_bias(const std::string& name) { return ends_with(name, ".bias"); }

// "<module>.weight" for "<module>.weight" or "<module>.bias".
std::string weight_of(const std::string& name) {
  return is_bias(name) ? name.substr(0, name.size() - 4) + "weight" : name;
}

}  // namespace

std::unique_ptr<Param> make_trainable(Grads& grads, const PreparedIndex& prepared, const NormIndex& norms,
                                      const std::string& name, const std::string& component) {
  const bool bias = is_bias(name);
  DF_CHECK(bias || ends_with(name, ".weight"), "training: ", component, " parameter '", name,
           "' should end in .weight or .bias");
  const std::string wname = weight_of(name);
  auto param = std::make_unique<Param>();
  param->name = name;
  if (auto it = prepared.find(wname); it != prepared.end()) {
    LayerParams& lp = grads.layer(it->second.w.get(), "training");
    DF_CHECK(!bias || lp.b.defined(), "training: ", component, " ", wname, " has no bias");
    if (lp.w.dtype() != DType::F32) lp.w = lp.w.to(DType::F32);  // trained: f32 master weights
    // Gradients in the checkpoint's shape ([O, I, 1, 1] for 1×1 convolutions bound as linear).
    const Shape shape = bias ? lp.b.shape() : it->second.checkpoint_shape;
    Tensor& g = bias ? lp.gb : lp.gw;
    if (!g.defined()) g = Tensor::zeros(shape);
    param->value = (bias ? lp.b : lp.w).reshape(shape);
    param->grad = g.reshape(shape);
  } else if (auto nt = norms.find(wname); nt != norms.end()) {
    NormParams* np = grads.norm(nt->second.gamma.data());
    DF_ASSERT(np != nullptr);
    const Tensor& v = bias ? nt->second.beta : nt->second.gamma;
    Tensor& g = bias ? np->gbeta : np->ggamma;
    if (!g.defined()) g = Tensor::zeros(v.shape());
    param->value = v;  // the norm reads these f32 tensors directly: updates apply at once
    param->grad = g;
  } else {
    fail("training: the ", component, " has no parameter ", name);
  }
  return param;
}

bool is_trainable(const PreparedIndex& prepared, const NormIndex& norms, const std::string& name) {
  if (!is_bias(name) && !ends_with(name, ".weight")) return false;
  const std::string wname = weight_of(name);
  if (auto it = prepared.find(wname); it != prepared.end()) return !is_bias(name) || it->second.bias;
  return norms.count(wname) != 0;
}

void reprepare(Backend& be, Grads& grads, PreparedIndex& prepared, const std::string& name) {
  auto it = prepared.find(weight_of(name));
  if (it == prepared.end()) return;  // norms: updated in place
  PreparedEntry& e = it->second;
  const LayerParams& lp = grads.layer(e.w.get(), "training");
  auto fresh = be.prepare_like(*e.w, lp.w, lp.b, e.conv, e.params);
  e.w->swap_contents(*fresh);
}

std::vector<std::string> trainable_names(const PreparedIndex& prepared, const NormIndex& norms) {
  std::vector<std::string> out;
  for (const auto& [wname, e] : prepared) {
    out.push_back(wname);
    if (e.bias) out.push_back(wname.substr(0, wname.size() - 6) + "bias");
  }
  for (const auto& [wname, n] : norms) {
    out.push_back(wname);
    if (n.beta.defined()) out.push_back(wname.substr(0, wname.size() - 6) + "bias");
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace diffuse::train
