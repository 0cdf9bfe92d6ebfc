#include "nn/weights.h"

#include "core/error.h"

namespace diffuse {

WeightStore::WeightStore(std::string origin, std::string component)
    : origin_(std::move(origin)), component_(std::move(component)) {}

void WeightStore::add(const std::string& name, Tensor t) {
  DF_CHECK(tensors_.emplace(name, std::move(t)).second, origin_, ": ", component_, " tensor ", name,
           " appears twice");
}

Tensor WeightStore::take(const std::string& name, const Shape& shape) {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    missing_.push_back(name);
    return Tensor::zeros(shape);
  }
  used_.insert(name);
  const Tensor& t = it->second;
  if (t.shape() != shape || !dtype_is_float(t.dtype())) {
    bad_shape_.push_back(cat(name, " is ", t.str(), ", expected ", shape.str()));
    return Tensor::zeros(shape);
  }
  // Tensors borrowed from a file mapping are copied into prepared (converted, reordered) weights
  // by the layer that takes them; once a few MB later the pages are dropped again, so loading
  // never holds the file and the prepared copy at the same time.
  recent_.push_back(t);
  recent_bytes_ += t.bytes();
  while (recent_bytes_ > kDropLagBytes && recent_.size() > 1) {
    recent_bytes_ -= recent_.front().bytes();
    recent_.front().drop_pages();
    recent_.pop_front();
  }
  return t;
}

void WeightStore::drop_file_pages() const {
  for (const Tensor& t : recent_) t.drop_pages();
  recent_.clear();
  recent_bytes_ = 0;
}

std::vector<std::string> WeightStore::unused() const {
  std::vector<std::string> out;
  for (const auto& [name, t] : tensors_)
    if (!used_.count(name)) out.push_back(name);
  return out;
}

static std::string first_few(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 4; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > 4) s += cat(", … (", v.size() - 4, " more)");
  return s;
}

void WeightStore::finish(const std::function<bool(const std::string&)>& unused_ok) const {
  drop_file_pages();
  std::vector<std::string> extra;
  for (const std::string& n : unused())
    if (!unused_ok || !unused_ok(n)) extra.push_back(n);
  if (missing_.empty() && bad_shape_.empty() && extra.empty()) return;
  std::string msg = cat(origin_, ": ", component_, ":");
  if (!missing_.empty()) msg += cat(" ", missing_.size(), " missing tensor(s): ", first_few(missing_), ";");
  if (!bad_shape_.empty()) msg += cat(" ", bad_shape_.size(), " wrongly shaped: ", first_few(bad_shape_), ";");
  if (!extra.empty()) msg += cat(" ", extra.size(), " unused tensor(s): ", first_few(extra), ";");
  msg.pop_back();
  throw Error(msg);
}

}  // namespace diffuse
