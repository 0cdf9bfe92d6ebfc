#include "train/lora_network.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "models/lora.h"

namespace diffuse::train {

static std::string underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

std::unique_ptr<LoraNetwork> LoraNetwork::from_file(const std::string& path, UNet& unet) {
  LoraFile f = load_lora(path);
  DF_CHECK(f.unknown.empty(), path, ": keys that are not LoRA down/up/alpha tensors: ", f.unknown.front(),
           f.unknown.size() > 1 ? " (and more)" : "");
  // The UNet's linear layers / 1×1 convolutions by underscored module path.
  std::map<std::string, std::string> by_stem;
  PreparedIndex& prepared = unet.prepared();
  for (const auto& [name, e] : prepared) {
    if (name.size() < 7 || name.compare(name.size() - 7, 7, ".weight") != 0) continue;
    by_stem[underscored(name.substr(0, name.size() - 7))] = name;
  }
  auto net = std::make_unique<LoraNetwork>();
  for (const LoraEntry& e : f.entries) {
    DF_CHECK(e.target == LoraTarget::UNet, path, ": ", e.key, ": only UNet LoRA modules can be trained here (",
             lora_target_name(e.target), ")");
    const std::string stem = e.underscored ? e.module : underscored(e.module);
    auto it = by_stem.find(stem);
    DF_CHECK(it != by_stem.end(), path, ": ", e.key, ": the UNet has no layer ", stem);
    const PreparedEntry& pe = prepared.at(it->second);
    const Shape& ws = pe.checkpoint_shape;
    const int64_t out = ws[0], in = ws[1], r = e.rank();
    const bool pointwise = ws.rank() == 2 || (ws.rank() == 4 && ws[2] == 1 && ws[3] == 1);
    DF_CHECK(pointwise, path, ": ", e.key, ": ", it->second, " ", ws.str(),
             " is a k×k convolution; LoRA training covers linear layers and 1×1 convolutions");
    const bool fits = e.down.numel() == r * in && e.up.numel() == out * r && e.down.dim(1) == in && e.up.dim(0) == out;
    DF_CHECK(fits, path, ": ", e.key, ": down ", e.down.shape().str(), " and up ", e.up.shape().str(),
             " do not fit ", it->second, " ", ws.str());
    LoraModule m;
    m.key = e.key;
    m.weight_name = it->second;
    m.alpha = e.has_alpha ? e.alpha : float(r);
    m.down = {e.key + ".lora_down.weight", e.down.to(DType::F32), Tensor::zeros(e.down.shape())};
    m.up = {e.key + ".lora_up.weight", e.up.to(DType::F32), Tensor::zeros(e.up.shape())};
    m.layer = pe.w.get();
    net->modules_.push_back(std::move(m));
  }
  for (LoraModule& m : net->modules_) {
    m.adapter.key = m.key;
    m.adapter.down = m.down.value, m.adapter.up = m.up.value;
    m.adapter.gdown = m.down.grad, m.adapter.gup = m.up.grad;
    m.adapter.scale = m.alpha / float(m.down.value.dim(0));
  }
  return net;
}

void LoraNetwork::attach(Grads& g) {
  for (LoraModule& m : modules_) g.adapters[m.layer] = &m.adapter;
}

void LoraNetwork::detach(Grads& g) {
  for (LoraModule& m : modules_) g.adapters.erase(m.layer);
}

std::vector<Param*> LoraNetwork::params() {
  std::vector<Param*> out;
  for (LoraModule& m : modules_) out.push_back(&m.down), out.push_back(&m.up);
  return out;
}

void LoraNetwork::zero_grad() {
  for (Param* p : params()) std::memset(p->grad.data(), 0, p->grad.bytes());
}

std::vector<std::pair<std::string, Tensor>> LoraNetwork::tensors(const std::string& prefix, bool with_alpha) const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const LoraModule& m : modules_) {
    out.emplace_back(prefix + m.down.name, m.down.value.clone());
    out.emplace_back(prefix + m.up.name, m.up.value.clone());
    if (with_alpha) out.emplace_back(prefix + m.key + ".alpha", Tensor::full(Shape{}, m.alpha));
  }
  return out;
}

std::vector<std::pair<std::string, Tensor>> LoraNetwork::gradients(const std::string& prefix) const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const LoraModule& m : modules_) {
    out.emplace_back(prefix + m.down.name, m.down.grad.clone());
    out.emplace_back(prefix + m.up.name, m.up.grad.clone());
  }
  return out;
}

}  // namespace diffuse::train
