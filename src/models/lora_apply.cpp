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
  // In the layouts the current weight holds, so the swap keeps its primitives.
  auto r = be.prepare_like(*e.w, wp, bias, e.conv, e.params);
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
  auto loaded = [&](LoraTarget t) {
    return t == LoraTarget::UNet ? model.unet.loaded() : t == LoraTarget::TextEncoder ? model.te.loaded()
                                                                                      : model.has_te2 && model.te2.loaded();
  };
  std::map<std::string, TensorFile> files;
  std::map<LoraTarget, WeightStore> bases;  // the file's base weights (restores, biases)
  auto base_of = [&](LoraTarget t) -> const WeightStore& {
    auto it = bases.find(t);
    if (it != bases.end()) return it->second;
    return bases.emplace(t, base_component_weights(model, component_of(t), files)).first->second;
  };

  // Build every replacement first; nothing in the model changes until all of them exist. Merged
  // weights are prepared as they are computed (one f32 buffer at a time).
  std::map<LoraTarget, ComponentPlan> plans;
  std::map<LoraTarget, std::map<std::string, Tensor>> whole;  // merged weights of components re-bound whole
  auto on_names = [&](const std::map<LoraTarget, std::set<std::string>>& names) {
    for (LoraTarget t : {LoraTarget::TextEncoder, LoraTarget::TextEncoder2, LoraTarget::UNet}) {
      auto it = names.find(t);
      const std::set<std::string> now = it == names.end() ? std::set<std::string>() : it->second;
      if (!loaded(t) || (now.empty() && names_of(model, t).empty() && !flag_of(model, t))) continue;
      plans.emplace(t, ComponentPlan{t, {}, std::nullopt, std::nullopt, now});
      std::set<std::string> touched = now;
      touched.insert(names_of(model, t).begin(), names_of(model, t).end());
      const PreparedIndex& idx = index_of(model, t);
      for (const std::string& n : touched)
        if (!idx.count(n)) whole[t];  // not a prepared layer: this component is re-bound whole
    }
  };
  LoraApplyReport report = merge_each(model, loras, on_names, [&](LoraTarget t, const std::string& n, const Tensor& w) {
    if (whole.count(t)) {
      whole[t].emplace(n, w.clone());
      return;
    }
    const PreparedEntry& e = index_of(model, t).at(n);
    plans.at(t).patches.push_back({e.w, reprepare(be, e, n, w, base_of(t))});
  });
  for (auto& [t, p] : plans) {
    if (whole.count(t)) {
      rebind_whole(model, be, base_of(t), t, whole[t], p);
      continue;
    }
    // Weights merged before but not now go back to the file's base weights (converted to f32 in
    // one reused buffer, as a load converts them).
    Tensor buf;
    for (const std::string& n : names_of(model, t)) {
      if (p.names.count(n)) continue;
      const WeightStore& base = base_of(t);
      const Tensor* bw = base.find(n);
      DF_CHECK(bw != nullptr, base.origin(), ": ", base.component(), ": ", n, " is missing");
      if (!buf.defined() || buf.numel() < bw->numel()) buf = Tensor::empty({bw->numel()});
      Tensor w = Tensor::borrow(buf.data(), bw->shape(), DType::F32);
      convert(bw->data(), bw->dtype(), w.data(), DType::F32, size_t(bw->numel()));
      const PreparedEntry& e = index_of(model, t).at(n);
      p.patches.push_back({e.w, reprepare(be, e, n, w, base)});
    }
  }

  // Commit: patch swaps (all-or-nothing across components), then whole re-binds (moves).
  std::vector<Patch> all;
  for (auto& [t, p] : plans) all.insert(all.end(), p.patches.begin(), p.patches.end());
  swap_all(all);
  for (auto& [t, p] : plans) {
    if (p.unet) model.unet = std::move(*p.unet);
    if (p.te) (t == LoraTarget::TextEncoder ? model.te : model.te2) = std::move(*p.te);
    flag_of(model, t) = !p.names.empty();
    names_of(model, t) = std::move(p.names);
  }
  plans.clear();  // the replaced weights (now holding the old values) are freed here
  all.clear();
  return_free_memory();
  return report;
}

}  // namespace diffuse
