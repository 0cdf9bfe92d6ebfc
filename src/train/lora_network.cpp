#include "train/lora_network.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "core/error.h"
#include "io/tensor_file.h"
#include "models/lora.h"
#include "models/name_map.h"

namespace diffuse::train {

static std::string underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

// The layers a file's modules can name, by underscored module path: layer weight name and its
// prepared entry.
using LayerIndex = std::map<std::string, std::pair<std::string, const PreparedEntry*>>;

static std::string module_path(const std::string& weight_name) {
  return weight_name.substr(0, weight_name.size() - 7);  // without ".weight"
}

static bool is_weight(const std::string& name) {
  return name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
}

// kohya's module path of a UNet layer: SDXL files (sdxl_original_unet) use ldm names, SD 1.x/2.x
// files diffusers names (kohya's UNet there mirrors diffusers').
static std::string kohya_unet_path(const UNetConfig& cfg, const std::string& weight_name) {
  if (!cfg.text_time) return module_path(weight_name);
  const std::string ldm = diffusers_unet_name_to_ldm(weight_name, cfg.layers_per_block, cfg.cross_attn);
  DF_CHECK(!ldm.empty(), "LoRA: the SDXL UNet layer ", weight_name, " has no ldm name");
  return module_path(ldm);
}

// Every weight of `prepared` under its underscored diffusers path and, for a UNet, its ldm path.
static LayerIndex layer_index(const PreparedIndex& prepared, const UNetConfig* unet) {
  LayerIndex idx;
  for (const auto& [name, e] : prepared) {
    if (!is_weight(name)) continue;
    idx[underscored(module_path(name))] = {name, &e};
    if (!unet) continue;
    const std::string ldm = diffusers_unet_name_to_ldm(name, unet->layers_per_block, unet->cross_attn);
    if (!ldm.empty()) idx[underscored(module_path(ldm))] = {name, &e};
  }
  return idx;
}

std::unique_ptr<LoraNetwork> LoraNetwork::from_file(const std::string& path, UNet& unet, ClipTextModel* te,
                                                    ClipTextModel* te2) {
  LoraFile f = load_lora(path);
  DF_CHECK(f.unknown.empty(), path, ": keys that are not LoRA down/up/alpha tensors: ", f.unknown.front(),
           f.unknown.size() > 1 ? " (and more)" : "");
  const LayerIndex by_unet = layer_index(unet.prepared(), &unet.config());
  const LayerIndex by_te = te ? layer_index(te->prepared(), nullptr) : LayerIndex();
  const LayerIndex by_te2 = te2 ? layer_index(te2->prepared(), nullptr) : LayerIndex();
  auto net = std::make_unique<LoraNetwork>();
  for (const LoraEntry& e : f.entries) {
    DF_CHECK(e.plain(), path, ": ", e.key, ": a ", e.kind == LoraKind::LoRA ? "LoCon Tucker or DoRA" : lora_kind_name(e.kind),
             " module (", lora_factor_shapes(e), "); training starts from LoRA files (lora_down/lora_up) only");
    const bool given = e.target == LoraTarget::UNet || (e.target == LoraTarget::TextEncoder ? te : te2) != nullptr;
    DF_CHECK(given, path, ": ", e.key, ": a ", lora_target_name(e.target),
             " module, and that text encoder is not trained here (--train-text-encoder, a model that has it)");
    const LayerIndex& idx = e.target == LoraTarget::UNet ? by_unet : e.target == LoraTarget::TextEncoder ? by_te : by_te2;
    const std::string stem = e.underscored ? e.module : underscored(e.module);
    auto it = idx.find(stem);
    DF_CHECK(it != idx.end(), path, ": ", e.key, ": the ", lora_target_name(e.target), " has no layer ", stem);
    const auto& [weight_name, pe] = it->second;
    const Shape& ws = pe->checkpoint_shape;
    const int64_t r = e.rank();
    DF_CHECK(lora_fits(ws, e), path, ": ", e.key, ": down ", e.down.shape().str(), " and up ", e.up.shape().str(),
             " do not fit ", weight_name, " ", ws.str());
    LoraModule m;
    m.key = e.key;
    m.weight_name = weight_name;
    m.target = e.target;
    m.alpha = e.has_alpha ? e.alpha : float(r);
    m.down = {e.key + ".lora_down.weight", e.down.to(DType::F32), Tensor::zeros(e.down.shape())};
    m.up = {e.key + ".lora_up.weight", e.up.to(DType::F32), Tensor::zeros(e.up.shape())};
    m.layer = pe->w.get();
    net->modules_.push_back(std::move(m));
  }
  DF_CHECK(!net->modules_.empty(), path, ": holds no LoRA modules");
  net->bind_adapters();
  return net;
}

// A fresh module (kohya's init) under `key` on the prepared layer `name` of a model: on a linear
// layer down [r, in], up [out, r]; on a convolution [out, in, kh, kw] down [r, in, kh, kw] (a
// convolution like the layer's), up [out, r, 1, 1].
static LoraModule fresh_module(const std::string& key, const std::string& name, const PreparedEntry& e, int rank,
                               float alpha, std::mt19937_64& rng) {
  const Shape& ws = e.checkpoint_shape;
  const int64_t out = ws[0], in = ws[1];
  const int64_t kh = ws.rank() == 4 ? ws[2] : 1, kw = ws.rank() == 4 ? ws[3] : 1;
  LoraModule m;
  m.key = key;
  m.weight_name = name;
  m.alpha = alpha;
  const Shape ds = ws.rank() == 4 ? Shape{rank, in, kh, kw} : Shape{rank, in};
  const Shape us = ws.rank() == 4 ? Shape{out, rank, 1, 1} : Shape{out, rank};
  m.down = {m.key + ".lora_down.weight", Tensor::empty(ds), Tensor::zeros(ds)};
  m.up = {m.key + ".lora_up.weight", Tensor::zeros(us), Tensor::zeros(us)};
  // kaiming_uniform_(a=√5): gain √(2/6), bound gain·√(3/fan_in) = 1/√fan_in, fan_in = in·kh·kw.
  const double bound = 1.0 / std::sqrt(double(in * kh * kw));
  std::uniform_real_distribution<double> u(-bound, bound);
  for (int64_t i = 0; i < m.down.value.numel(); ++i) m.down.value.f32()[i] = float(u(rng));
  m.layer = e.w.get();
  return m;
}

int LoraNetwork::add_text_encoder(ClipTextModel& te, const std::string& prefix, int rank, float alpha, uint64_t seed,
                                  float lr_scale) {
  DF_CHECK(rank >= 1 && rank <= 4096, "--rank ", rank, ": must be in [1, 4096]");
  const bool second = prefix == "lora_te2";
  std::mt19937_64 rng(seed ^ (second ? 0x7e2e7e2eULL : 0x7e7e7e7eULL));
  int n = 0;
  for (auto& [name, e] : te.prepared()) {
    if (name.find(".self_attn.") == std::string::npos && name.find(".mlp.") == std::string::npos) continue;
    LoraModule m = fresh_module(prefix + "_" + underscored(module_path(name)), name, e, rank, alpha, rng);
    m.target = second ? LoraTarget::TextEncoder2 : LoraTarget::TextEncoder;
    m.down.lr_scale = m.up.lr_scale = lr_scale;
    modules_.push_back(std::move(m));
    ++n;
  }
  DF_CHECK(n > 0, "LoRA: the text encoder has no attention/MLP layers to adapt");
  bind_adapters();
  return n;
}

int LoraNetwork::count(LoraTarget target) const {
  return int(std::count_if(modules_.begin(), modules_.end(), [&](const LoraModule& m) { return m.target == target; }));
}

void LoraNetwork::set_lr_scale(LoraTarget target, float lr_scale) {
  for (LoraModule& m : modules_)
    if (m.target == target) m.down.lr_scale = m.up.lr_scale = lr_scale;
}

std::unique_ptr<LoraNetwork> LoraNetwork::create_unet(UNet& unet, int rank, float alpha, uint64_t seed) {
  DF_CHECK(rank >= 1 && rank <= 4096, "--rank ", rank, ": must be in [1, 4096]");
  DF_CHECK(std::isfinite(alpha) && alpha > 0, "--alpha ", alpha, ": must be a positive number");
  auto net = std::make_unique<LoraNetwork>();
  std::mt19937_64 rng(seed);
  for (auto& [name, e] : unet.prepared()) {
    // Inside a Transformer2DModel ("…attentions.N.…"), linear or 1×1 convolution.
    if (name.find("attentions.") == std::string::npos) continue;
    const Shape& ws = e.checkpoint_shape;
    const bool pointwise = ws.rank() == 2 || (ws.rank() == 4 && ws[2] == 1 && ws[3] == 1);
    if (!pointwise) continue;
    net->modules_.push_back(
        fresh_module("lora_unet_" + underscored(kohya_unet_path(unet.config(), name)), name, e, rank, alpha, rng));
  }
  DF_CHECK(!net->modules_.empty(), "LoRA: the UNet has no transformer linear layers to adapt");
  net->bind_adapters();
  return net;
}

// Inside one of kohya's conv target classes (diffusers' ResnetBlock2D, Downsample2D, Upsample2D).
static bool in_resnet_or_resampler(const std::string& name) {
  return name.find("resnets.") != std::string::npos || name.find("downsamplers.") != std::string::npos ||
         name.find("upsamplers.") != std::string::npos;
}

int LoraNetwork::add_unet_conv_targets(UNet& unet, int rank, float alpha, int conv_rank, float conv_alpha,
                                       uint64_t seed) {
  DF_CHECK(rank >= 1 && rank <= 4096, "--rank ", rank, ": must be in [1, 4096]");
  DF_CHECK(conv_rank >= 1 && conv_rank <= 4096, "--conv-rank ", conv_rank, ": must be in [1, 4096]");
  DF_CHECK(std::isfinite(conv_alpha) && conv_alpha > 0, "--conv-alpha ", conv_alpha, ": must be a positive number");
  std::mt19937_64 rng(seed ^ 0xc0c0c0c0c0ULL);  // its own stream: the default modules start as without LoCon
  int n = 0;
  for (auto& [name, e] : unet.prepared()) {
    if (!in_resnet_or_resampler(name)) continue;
    const Shape& ws = e.checkpoint_shape;
    const bool pointwise = ws.rank() == 2 || (ws.rank() == 4 && ws[2] == 1 && ws[3] == 1);
    modules_.push_back(fresh_module("lora_unet_" + underscored(kohya_unet_path(unet.config(), name)), name, e,
                                    pointwise ? rank : conv_rank, pointwise ? alpha : conv_alpha, rng));
    ++n;
  }
  DF_CHECK(n > 0, "LoCon: the UNet has no ResNet or resampler layers to adapt");
  bind_adapters();
  return n;
}

const LoraModule* LoraNetwork::first_kxk_conv() const {
  for (const LoraModule& m : modules_) {
    const Shape& s = m.down.value.shape();
    if (s.rank() == 4 && (s[2] > 1 || s[3] > 1)) return &m;
  }
  return nullptr;
}

void LoraNetwork::save(const std::string& path, DType dtype, const std::map<std::string, std::string>& metadata) const {
  DF_CHECK(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16, "LoRA: cannot save as ",
           dtype_name(dtype));
  std::vector<std::pair<std::string, Tensor>> t;
  for (auto& [k, v] : tensors("", true)) t.emplace_back(k, k.size() > 6 && k.compare(k.size() - 6, 6, ".alpha") == 0 ? v : v.to(dtype));
  // kohya's sshs_model_hash (what A1111 shows as the LoRA's hash) is the sha256 of the file's
  // tensor-data region, which the metadata does not change: write, hash, write with the hash.
  save_safetensors(path, t, metadata);
  std::map<std::string, std::string> with_hash = metadata;
  with_hash["sshs_model_hash"] = lora_hash(path);
  save_safetensors(path, t, with_hash);
}

void LoraNetwork::bind_adapters() {
  for (LoraModule& m : modules_) {
    m.adapter.key = m.key;
    m.adapter.down = m.down.value, m.adapter.up = m.up.value;
    m.adapter.gdown = m.down.grad, m.adapter.gup = m.up.grad;
    m.adapter.scale = m.alpha / float(m.down.value.dim(0));
  }
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
