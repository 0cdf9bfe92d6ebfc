// Binding checkpoint tensors to layers by name, strictly: every expected tensor must exist with the
// expected shape and a float dtype; tensors nobody asked for are reported as unused. Problems are
// collected so one load reports all of them (first few names of each kind), naming the file.
#pragma once
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/tensor.h"

namespace diffuse {

// A prepared (backend) weight as it was bound: what re-preparing it from another tensor of the
// same checkpoint shape needs (LoRA merges patch single layers this way, models/lora.h).
struct PreparedEntry {
  std::shared_ptr<PreparedWeight> w;  // shared with the layer that runs it
  bool conv = false;                  // prepare_conv2d with `params`, else prepare_linear
  Conv2dParams params;
  Shape checkpoint_shape;             // "<module>.weight" as stored ([O, I, 1, 1] for a 1×1 conv bound as linear)
  Shape prepared_shape;               // what was prepared ([O, I] for such a linear)
  bool bias = false;                  // "<module>.bias" was bound with it
};
// "<module>.weight" (component names, e.g. "down_blocks.0.attentions.0.proj_in.weight") -> entry.
using PreparedIndex = std::map<std::string, PreparedEntry>;
// Norm layers as bound: "<module>.weight" -> the f32 gamma and beta the layer holds (shared), so
// that training finds a norm's parameters by name.
struct NormEntry {
  Tensor gamma, beta;
};
using NormIndex = std::map<std::string, NormEntry>;

class WeightStore {
 public:
  // origin: file path (for messages); component: "unet", "vae", "text_encoder", ...
  WeightStore(std::string origin, std::string component);
  void add(const std::string& name, Tensor t);  // throws on a duplicate name
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  // The tensor without marking it used (for config detection from shapes); nullptr if absent.
  const Tensor* find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
  }
  // All names, sorted (for counting layers and levels).
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [n, t] : tensors_) out.push_back(n);
    return out;
  }
  size_t size() const { return tensors_.size(); }
  const std::string& origin() const { return origin_; }
  const std::string& component() const { return component_; }

  // The tensor `name` checked against `shape`; on a problem, records it and returns zeros of
  // `shape` so binding continues and finish() reports everything at once.
  Tensor take(const std::string& name, const Shape& shape);
  // Marks a tensor as deliberately unused (e.g. position_ids).
  void ignore(const std::string& name) { used_.insert(name); }
  std::vector<std::string> unused() const;
  // Throws diffuse::Error listing missing, mis-shaped and (unless allowed by `unused_ok`)
  // unused tensors. Call once after binding.
  void finish(const std::function<bool(const std::string&)>& unused_ok = nullptr) const;
  // Drops the memory pages of the file-mapped tensors taken so far (finish() does this too):
  // after binding, the layers hold their own prepared copies; a later read re-reads the file.
  void drop_file_pages() const;

  // Layers record what they prepared (nn/layers.cpp); the model keeps the index after load.
  void record_prepared(const std::string& weight_name, PreparedEntry e) { prepared_[weight_name] = std::move(e); }
  PreparedIndex take_prepared() { return std::move(prepared_); }
  void record_norm(const std::string& weight_name, NormEntry e) { norms_[weight_name] = std::move(e); }
  NormIndex take_norms() { return std::move(norms_); }

 private:
  PreparedIndex prepared_;
  NormIndex norms_;
  std::string origin_, component_;
  std::map<std::string, Tensor> tensors_;
  std::set<std::string> used_;
  std::vector<std::string> missing_, bad_shape_;
  static constexpr size_t kDropLagBytes = size_t(64) << 20;
  mutable std::deque<Tensor> recent_;  // taken recently, pages not dropped yet
  mutable size_t recent_bytes_ = 0;
};

// A scoped view: Binder(store).sub("down_blocks").sub("0").take("conv1.weight", {...}).
class Binder {
 public:
  explicit Binder(WeightStore& store, std::string prefix = "") : store_(&store), prefix_(std::move(prefix)) {}
  Binder sub(const std::string& name) const { return Binder(*store_, prefix_ + name + "."); }
  Binder sub(int index) const { return sub(std::to_string(index)); }
  Tensor take(const std::string& name, const Shape& shape) const { return store_->take(prefix_ + name, shape); }
  bool has(const std::string& name) const { return store_->has(prefix_ + name); }
  const std::string& prefix() const { return prefix_; }
  WeightStore& store() const { return *store_; }

 private:
  WeightStore* store_;
  std::string prefix_;
};

}  // namespace diffuse
