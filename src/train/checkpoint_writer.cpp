#include "train/checkpoint_writer.h"

#include <set>

#include "core/error.h"
#include "models/name_map.h"

namespace diffuse::train {

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// ldm name -> the tensor rebuilt from trained values, for one component; marks the diffusers
// names it used in `used`.
void rebuild_component(const TensorFile& f, Family family, const TrainedComponent& tc, DType dtype,
                       std::map<std::string, Tensor>& out, std::set<std::string>& used) {
  for (const LdmSource& s : ldm_tensor_sources(f, tc.component, family)) {
    std::vector<Tensor> parts;
    for (const std::string& d : s.diffusers)
      if (auto it = tc.tensors.find(d); it != tc.tensors.end()) parts.push_back(it->second);
    if (parts.empty()) continue;
    DF_CHECK(parts.size() == s.diffusers.size(), f.path, ": ", s.ldm_name, " is made of ", s.diffusers.size(),
             " trained tensors but only ", parts.size(), " were given");
    const Tensor* orig = f.find(s.ldm_name);
    DF_ASSERT(orig != nullptr);
    out[s.ldm_name] = ldm_tensor_from(s, orig->shape(), parts).to(dtype);
    used.insert(s.diffusers.begin(), s.diffusers.end());
  }
  for (const auto& kv : tc.tensors)
    DF_CHECK(used.count(kv.first), f.path, ": the trained ", component_name(tc.component), " tensor ", kv.first,
             " has no place in the file's (ldm) layout");
}

}  // namespace

CheckpointWriteResult save_ldm_checkpoint(const std::string& path, const TensorFile& f, Family family,
                                          const std::vector<TrainedComponent>& trained, DType dtype,
                                          const std::map<std::string, std::string>& metadata) {
  std::map<std::string, Tensor> rebuilt;
  for (const TrainedComponent& tc : trained) {
    std::set<std::string> used;
    rebuild_component(f, family, tc, dtype, rebuilt, used);
  }
  CheckpointWriteResult r;
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const TensorEntry& e : f.tensors) {
    if (starts_with(e.name, "model_ema.")) {
      ++r.dropped_ema;
      continue;
    }
    auto it = rebuilt.find(e.name);
    if (it != rebuilt.end()) {
      ++r.replaced;
      tensors.emplace_back(e.name, it->second);
      continue;
    }
    ++r.kept;
    const bool cast = dtype_is_float(e.tensor.dtype()) && e.tensor.dtype() != dtype;
    r.converted += cast;
    tensors.emplace_back(e.name, cast ? e.tensor.to(dtype) : e.tensor);
  }
  std::map<std::string, std::string> meta = f.format == "safetensors" ? f.metadata : std::map<std::string, std::string>();
  meta.erase("diffuse_synthetic");  // a random-init file's "not a trained model" note: trained now
  for (const auto& kv : metadata) meta[kv.first] = kv.second;
  save_safetensors(path, tensors, meta);
  return r;
}

std::string describe_untrained(const CheckpointWriteResult& r, DType dtype) {
  std::string s = std::to_string(r.kept) + " untrained";
  if (r.converted) s += " (" + std::to_string(r.converted) + " converted to " + dtype_name(dtype) + ")";
  else s += " as they were";
  return s;
}

}  // namespace diffuse::train
