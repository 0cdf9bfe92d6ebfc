// Applying a LoRA set to a loaded model: only the prepared weights of the modules the new set or
// the previous set touches are re-prepared (merged weights, or the base weights again), and they
// are swapped in all at once after every replacement has been built. A failure anywhere before
// that point leaves the model exactly as it was.
#include <optional>
#include <set>

#include "core/error.h"
#include "core/memory_stats.h"
#include "io/tensor_file.h"
#include "models/lora.h"
#include "models/name_map.h"

namespace diffuse {

namespace {

struct Patch {
  std::shared_ptr<PreparedWeight> target, replacement;
};

// What applying a set does to one component: single weights swapped (patches), or, when a module
// is not a prepared layer (nothing LoRA files target in practice), the whole component re-bound.
struct ComponentPlan {
  LoraTarget target;
  std::vector<Patch> patches;
  std::optional<UNet> unet;          // whole re-bind (fallback)
  std::optional<ClipTextModel> te;   // whole re-bind (fallback)
  std::set<std::string> names;       // "<module>.weight" merged after the switch
};

Component component_of(LoraTarget t) {
  return t == LoraTarget::UNet ? Component::UNet : t == LoraTarget::TextEncoder ? Component::TextEncoder
                                                                                : Component::TextEncoder2;
}

PreparedIndex& index_of(SDModel& m, LoraTarget t) {
  return t == LoraTarget::UNet ? m.unet.prepared() : t == LoraTarget::TextEncoder ? m.te.prepared() : m.te2.prepared();
}

std::set<std::string>& names_of(SDModel& m, LoraTarget t) {
  return t == LoraTarget::UNet ? m.lora_merged.unet_names
         : t == LoraTarget::TextEncoder ? m.lora_merged.te_names : m.lora_merged.te2_names;
}

bool& flag_of(SDModel& m, LoraTarget t) {
  return t == LoraTarget::UNet ? m.lora_merged.unet : t == LoraTarget::TextEncoder ? m.lora_merged.te : m.lora_merged.te2;
}

// Re-prepares one weight from `w` (checkpoint shape) and the base bias.
std::shared_ptr<PreparedWeight> reprepare(Backend& be, const PreparedEntry& e, const std::string& name, const Tensor& w,
                                          const WeightStore& base) {
  DF_CHECK(w.shape() == e.checkpoint_shape, base.origin(), ": ", base.component(), " ", name, ": weight ",
           w.shape().str(), " where ", e.checkpoint_shape.str(), " was bound");
  Tensor bias;
  if (e.bias) {
    const std::string bname = name.substr(0, name.size() - std::string("weight").size()) + "bias";
    const Tensor* b = base.find(bname);
    DF_CHECK(b != nullptr, base.origin(), ": ", base.component(), ": ", bname, " is missing");
    bias = *b;
  }
  Tensor wp = w.reshape(e.prepared_shape);
  auto r = e.conv ? be.prepare_conv2d(wp, bias, e.params) : be.prepare_linear(wp, bias);
  DF_CHECK(r->shape() == e.w->shape(), name, ": re-prepared weight ", r->shape().str(), " differs from ",
           e.w->shape().str());
  return r;
}

// The whole component bound again from the base weights with `merged` substituted (fallback).
void rebind_whole(SDModel& m, Backend& be, const WeightStore& base, LoraTarget t,
                  const std::map<std::string, Tensor>& merged, ComponentPlan& plan) {
  WeightStore w(base.origin(), base.component());
  for (const std::string& n : base.names()) {
    auto it = merged.find(n);
    w.add(n, it != merged.end() ? it->second : *base.find(n));
  }
  if (t == LoraTarget::UNet) {
    plan.unet.emplace();
    plan.unet->load(be, w, m.unet_cfg);
  } else {
    plan.te.emplace();
    plan.te->load(be, w, t == LoraTarget::TextEncoder ? m.te_cfg : m.te2_cfg);
  }
}

ComponentPlan plan_component(SDModel& m, Backend& be, const TensorFile& f, LoraTarget t,
                             const std::map<std::string, Tensor>& merged) {
  ComponentPlan plan{t, {}, std::nullopt, std::nullopt, {}};
  for (const auto& [n, w] : merged) plan.names.insert(n);
  const std::set<std::string>& before = names_of(m, t);
  const WeightStore base = component_weights(f, component_of(t), m.family);
  PreparedIndex& idx = index_of(m, t);
  std::set<std::string> touched = plan.names;
  touched.insert(before.begin(), before.end());
  for (const std::string& n : touched)
    if (!idx.count(n)) {
      rebind_whole(m, be, base, t, merged, plan);
      return plan;
    }
  for (const std::string& n : touched) {
    auto it = merged.find(n);
    const Tensor* bw = base.find(n);
    DF_CHECK(it != merged.end() || bw != nullptr, base.origin(), ": ", base.component(), ": ", n, " is missing");
    const PreparedEntry& e = idx.at(n);
    plan.patches.push_back({e.w, reprepare(be, e, n, it != merged.end() ? it->second : *bw, base)});
  }
  return plan;
}

// Swaps every patch in; on a failure swaps back what was swapped (a swap is its own inverse) and
// rethrows, so a plan is applied entirely or not at all.
void swap_all(std::vector<Patch>& patches) {
  size_t done = 0;
  try {
    for (; done < patches.size(); ++done) patches[done].target->swap_contents(*patches[done].replacement);
  } catch (...) {
    while (done > 0) {
      --done;
      patches[done].target->swap_contents(*patches[done].replacement);
    }
    throw;
  }
}

}  // namespace

LoraApplyReport apply_loras(SDModel& model, Backend& be, const std::vector<std::pair<const LoraFile*, float>>& loras) {
  LoraMerge mg = merge_loras(model, loras);  // throws before the model is touched
  const std::pair<LoraTarget, const std::map<std::string, Tensor>*> comps[] = {
      {LoraTarget::TextEncoder, &mg.te}, {LoraTarget::TextEncoder2, &mg.te2}, {LoraTarget::UNet, &mg.unet}};
  auto loaded = [&](LoraTarget t) {
    return t == LoraTarget::UNet ? model.unet.loaded() : t == LoraTarget::TextEncoder ? model.te.loaded()
                                                                                      : model.has_te2 && model.te2.loaded();
  };

  // Build every replacement first; nothing in the model changes until all of them exist.
  std::optional<TensorFile> f;
  std::vector<ComponentPlan> plans;
  for (const auto& [t, merged] : comps) {
    if (!loaded(t) || (merged->empty() && names_of(model, t).empty() && !flag_of(model, t))) continue;
    if (!f) f.emplace(open_model_file(model.path));
    plans.push_back(plan_component(model, be, *f, t, *merged));
  }

  // Commit: patch swaps (all-or-nothing across components), then whole re-binds (moves).
  std::vector<Patch> all;
  for (ComponentPlan& p : plans) all.insert(all.end(), p.patches.begin(), p.patches.end());
  swap_all(all);
  for (ComponentPlan& p : plans) {
    if (p.unet) model.unet = std::move(*p.unet);
    if (p.te) (p.target == LoraTarget::TextEncoder ? model.te : model.te2) = std::move(*p.te);
    flag_of(model, p.target) = !p.names.empty();
    names_of(model, p.target) = std::move(p.names);
  }
  plans.clear();  // the replaced weights (now holding the old values) are freed here
  all.clear();
  return_free_memory();
  return mg.report;
}

}  // namespace diffuse
