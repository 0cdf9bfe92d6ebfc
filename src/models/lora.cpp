#include "models/lora.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <regex>
#include <set>
#include <tuple>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/sha256.h"
#include "io/tensor_file.h"
#include "models/lycoris.h"
#include "models/name_map.h"

namespace diffuse {

namespace fs = std::filesystem;

const char* lora_target_name(LoraTarget t) {
  switch (t) {
    case LoraTarget::UNet: return "unet";
    case LoraTarget::TextEncoder: return "text_encoder";
    case LoraTarget::TextEncoder2: return "text_encoder_2";
  }
  return "?";
}

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& x) {
  return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
}

// ---------------------------------------------------------------------------------------------
// Reading

// Target component and module path (without the target prefix) of a stem.
void split_stem(const std::string& stem, LoraEntry* e) {
  static const std::tuple<const char*, LoraTarget, bool> kPrefixes[] = {
      {"lora_unet_", LoraTarget::UNet, true},
      {"lora_te1_", LoraTarget::TextEncoder, true},
      {"lora_te2_", LoraTarget::TextEncoder2, true},
      {"lora_te_", LoraTarget::TextEncoder, true},
      {"unet.", LoraTarget::UNet, false},
      {"text_encoder_2.", LoraTarget::TextEncoder2, false},
      {"text_encoder.", LoraTarget::TextEncoder, false},
  };
  std::string s = stem;
  if (starts_with(s, "base_model.model.")) s = s.substr(17);
  for (const auto& [pre, target, underscored] : kPrefixes) {
    if (starts_with(s, pre)) {
      e->target = target;
      e->module = s.substr(std::strlen(pre));
      e->underscored = underscored;
      return;
    }
  }
  // No component prefix (a PEFT state dict of one model): text encoder names start with text_model.
  e->target = starts_with(s, "text_model.") ? LoraTarget::TextEncoder : LoraTarget::UNet;
  e->module = s;
  e->underscored = false;
}

// PEFT's pattern lookup (peft.utils.other.get_pattern_key): the first key of `patterns` (a JSON
// object, keys sorted) that matches the end of the dotted module name at a '.' boundary.
const nlohmann::json* pattern_value(const std::string& path, const nlohmann::json& patterns, const std::string& module) {
  if (!patterns.is_object()) return nullptr;
  for (auto it = patterns.begin(); it != patterns.end(); ++it) {
    try {
      if (std::regex_match(module, std::regex("(.*\\.)?(" + it.key() + ")"))) return &it.value();
    } catch (const std::regex_error&) {
      fail(path, ": lora_adapter_metadata: pattern '", it.key(), "' is not a regular expression");
    }
  }
  return nullptr;
}

// diffusers' "lora_adapter_metadata" (the PEFT LoraConfig of each component, keys "<component>.<field>",
// or unprefixed for a single model): lora_alpha / r (rsLoRA: / √r) for the PEFT-style entries that
// have no .alpha tensor. A rank that disagrees with the tensors' is an error.
void apply_adapter_metadata(const std::string& path, LoraFile& f) {
  auto m = f.metadata.find("lora_adapter_metadata");
  if (m == f.metadata.end()) return;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(m->second);
  } catch (const nlohmann::json::exception& e) {
    fail(path, ": metadata lora_adapter_metadata is not JSON (", e.what(), ")");
  }
  DF_CHECK(j.is_object(), path, ": metadata lora_adapter_metadata is not a JSON object");
  for (LoraEntry& e : f.entries) {
    if (e.kind != LoraKind::LoRA || e.underscored || e.has_alpha) continue;
    const std::string comp = lora_target_name(e.target);
    auto field = [&](const std::string& k) -> const nlohmann::json* {
      for (const std::string& name : {comp + "." + k, k}) {
        auto it = j.find(name);
        if (it != j.end() && !it->is_null()) return &*it;
      }
      return nullptr;
    };
    const nlohmann::json* alpha = field("lora_alpha");
    if (!alpha) continue;
    if (const nlohmann::json* p = field("alpha_pattern"); p && pattern_value(path, *p, e.module))
      alpha = pattern_value(path, *p, e.module);
    const nlohmann::json* rank = field("r");
    if (const nlohmann::json* p = field("rank_pattern"); p && pattern_value(path, *p, e.module))
      rank = pattern_value(path, *p, e.module);
    DF_CHECK(alpha->is_number(), path, ": ", e.key, ": lora_adapter_metadata's lora_alpha is ", alpha->dump(),
             ", expected a number");
    if (rank) {
      DF_CHECK(rank->is_number_integer() && rank->get<int64_t>() == e.rank(), path, ": ", e.key, ": rank ", e.rank(),
               " (lora_A ", e.down.shape().str(), ") but lora_adapter_metadata says r = ", rank->dump());
    }
    const nlohmann::json* rs = field("use_rslora");
    e.has_alpha = true;
    e.alpha = alpha->get<float>();
    e.rs_lora = rs && rs->is_boolean() && rs->get<bool>();
    DF_CHECK(std::isfinite(e.alpha), path, ": ", e.key, ": lora_adapter_metadata's lora_alpha is not finite");
    ++f.metadata_alphas;
  }
}

}  // namespace

LoraFile load_lora(const std::string& path) {
  TensorFile f = open_model_file(path);
  DF_CHECK(f.format != "diffusers", path, ": a folder, expected a LoRA file (.safetensors, .pt or .ckpt)");
  LoraFile out;
  out.path = path;
  out.name = fs::path(path).stem().string();
  out.metadata = f.metadata;

  std::map<std::string, ModuleTensors> parts;
  std::vector<std::string> order;
  for (const TensorEntry& te : f.tensors) {
    std::string stem, role;
    if (!parse_lora_key(te.name, &stem, &role) || !dtype_is_float(te.tensor.dtype())) {
      out.unknown.push_back(te.name + " (not a LoRA or LyCORIS tensor)");
      continue;
    }
    auto [it, fresh] = parts.try_emplace(stem);
    if (fresh) order.push_back(stem);
    auto [rt, added] = it->second.try_emplace(role, RoleTensor{te.name, te.tensor});
    DF_CHECK(added, path, ": module ", stem, " has two ", role, " tensors (", rt->second.key, ", ", te.name, ")");
  }
  for (const std::string& stem : order) {
    LoraEntry e;
    if (!assemble_entry(path, stem, parts[stem], &e, &out.unknown)) continue;
    e.key = stem;
    split_stem(stem, &e);
    out.entries.push_back(std::move(e));
  }
  if (out.entries.empty()) {
    std::string first = out.unknown.empty() ? std::string("none") : out.unknown.front();
    fail(path, ": no LoRA tensors (", f.tensors.size(), " tensors, none named <module>.lora_down/lora_up.weight, ",
         "<module>.lora_A/lora_B.weight or LyCORIS's <module>.hada_*/lokr_*/diff; first: ", first, ")");
  }
  apply_adapter_metadata(path, out);
  return out;
}

std::vector<std::pair<std::string, int>> lora_summary(const LoraFile& f) {
  const char* kLabels[] = {"LoRA", "LoCon Tucker", "LoHa", "LoHa Tucker", "LoKr", "LoKr Tucker", "full", "DoRA",
                           "unet", "text_encoder", "text_encoder_2"};
  std::map<std::string, int> n;
  for (const LoraEntry& e : f.entries) {
    const bool tucker = e.mid.defined() || e.t1.defined() || e.t2.defined();
    std::string kind = lora_kind_name(e.kind);
    if (tucker) kind = e.kind == LoraKind::LoRA ? "LoCon Tucker" : kind + " Tucker";
    ++n[kind];
    if (e.dora.defined()) ++n["DoRA"];
    ++n[lora_target_name(e.target)];
  }
  std::vector<std::pair<std::string, int>> out;
  for (const char* l : kLabels)
    if (n.count(l)) out.emplace_back(l, n[l]);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Resolving module names against a loaded model

namespace {

std::string underscored(const std::string& dotted) {
  std::string s = dotted;
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

// The modules of one component that a LoRA can target: "<m>.weight" of rank 2 or 4.
struct ModuleIndex {
  std::map<std::string, const Tensor*> weight;            // dotted module -> base weight
  std::unordered_map<std::string, std::string> by_under;  // underscored -> dotted ("" if ambiguous)

  explicit ModuleIndex(const WeightStore& w) {
    for (const std::string& n : w.names()) {
      if (!ends_with(n, ".weight")) continue;
      const Tensor* t = w.find(n);
      if (t->rank() != 2 && t->rank() != 4) continue;
      std::string m = n.substr(0, n.size() - 7);
      weight[m] = t;
      auto [it, fresh] = by_under.try_emplace(underscored(m), m);
      if (!fresh) it->second.clear();
    }
  }
  bool has(const std::string& m) const { return weight.count(m) != 0; }
  std::string from_under(const std::string& u) const {
    auto it = by_under.find(u);
    return it == by_under.end() ? std::string() : it->second;
  }
};

std::vector<std::string> split_on(const std::string& s, char c) {
  std::vector<std::string> out;
  size_t b = 0;
  for (;;) {
    size_t e = s.find(c, b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) return out;
    b = e + 1;
  }
}

// kohya ldm-style UNet module ("input_blocks_4_1_transformer_blocks_0_attn1_to_q") -> diffusers
// module, through name_map's ldm rules: the block head is fixed by the ldm structure, the '_' of
// the tail are tried as '_' or '.' until a name maps to a module the model has. "" if none does.
std::string resolve_ldm_unet(const std::string& u, int lpb, const ModuleIndex& idx) {
  std::vector<std::string> tok = split_on(u, '_');
  std::string head;
  size_t used = 0;
  auto tok_is = [&](size_t i, const char* s) { return i < tok.size() && tok[i] == s; };
  if ((tok_is(0, "input") || tok_is(0, "output")) && tok_is(1, "blocks") && tok.size() >= 4) {
    head = tok[0] + "_blocks." + tok[2] + "." + tok[3];
    used = 4;
  } else if (tok_is(0, "middle") && tok_is(1, "block") && tok.size() >= 3) {
    head = "middle_block." + tok[2];
    used = 3;
  } else if (tok_is(0, "time") && tok_is(1, "embed") && tok.size() == 3) {
    head = "time_embed." + tok[2];
    used = 3;
  } else if (tok_is(0, "label") && tok_is(1, "emb") && tok.size() == 4) {
    head = "label_emb." + tok[2] + "." + tok[3];
    used = 4;
  } else if (tok_is(0, "out") && tok.size() == 2) {
    head = "out." + tok[1];
    used = 2;
  } else {
    return {};
  }
  const size_t m = tok.size() - used;
  if (m > 16) return {};
  const uint32_t combos = m == 0 ? 1u : 1u << (m - 1);
  for (uint32_t mask = 0; mask < combos; ++mask) {
    std::string name = head;
    for (size_t i = 0; i < m; ++i) {
      name += (i == 0 || (mask >> (i - 1) & 1u)) ? "." : "_";
      name += tok[used + i];
    }
    std::string d = ldm_unet_name_to_diffusers(name + ".weight", lpb);
    if (d.empty() || !ends_with(d, ".weight")) continue;
    d.resize(d.size() - 7);
    if (idx.has(d)) return d;
  }
  return {};
}

// What one (component, module) gets: its base weight and every matching entry with its
// multiplier, in file order.
struct ModuleTerms {
  const Tensor* base = nullptr;
  std::vector<std::pair<const LoraEntry*, float>> terms;
};

// The merged weight of one module into `w` [O, K] (f32): base converted, plus every plain LoRA
// term's multiplier · scale · up·down, computed in blocks of rows so that each block's product (an
// f32 GEMM of the backend `gemm`, an fp32 CPU backend, into `block`) is added while it is still in
// cache; then every other term (LyCORIS, LoCon Tucker, DoRA: models/lycoris.cpp) whole, through
// `extra` [O, K].
void merge_module(Backend& gemm, const ModuleTerms& mt, Tensor& w, Tensor& block, Tensor& extra) {
  const Tensor& base = *mt.base;
  const int64_t O = w.dim(0), K = w.dim(1), kRows = 512;
  struct Term {
    Tensor u, d;
    float s;
  };
  std::vector<Term> terms;
  std::vector<std::pair<const LoraEntry*, float>> others;
  bool dora = false;
  for (const auto& [e, mult] : mt.terms) {
    if (e->plain()) {
      terms.push_back({e->up.to(DType::F32).reshape({O, e->rank()}), e->down.to(DType::F32), mult * e->scale()});
    } else {
      others.emplace_back(e, mult);
      dora = dora || e->dora.defined();
    }
  }
  if (!block.defined() || block.numel() < kRows * K) block = Tensor::empty({kRows * K});
  const size_t esz = dtype_size(base.dtype());
  for (int64_t o0 = 0; o0 < O; o0 += kRows) {
    const int64_t rows = std::min(kRows, O - o0);
    float* W = w.f32() + o0 * K;
    convert(static_cast<const uint8_t*>(base.data()) + size_t(o0 * K) * esz, base.dtype(), W, DType::F32,
            size_t(rows * K));
    for (const Term& t : terms) {
      const int64_t r = t.u.dim(1);
      Tensor u = Tensor::borrow(const_cast<float*>(t.u.f32()) + o0 * r, {1, rows, r}, DType::F32);
      Tensor d = Tensor::borrow(const_cast<float*>(t.d.f32()), {1, r, K}, DType::F32);
      Tensor c = Tensor::borrow(block.data(), {1, rows, K}, DType::F32);
      gemm.matmul(u, d, c, false, t.s);
      const float* C = c.f32();
      const int64_t n = rows * K;
#pragma omp parallel for schedule(static) if (n > (1 << 15))
      for (int64_t i = 0; i < n; ++i) W[i] += C[i];
    }
  }
  if (others.empty()) return;
  const Tensor w0 = dora ? base.to(DType::F32) : Tensor();  // DoRA normalises the base weight plus its own delta
  if (!extra.defined() || extra.numel() < O * K) extra = Tensor::empty({O * K});
  for (const auto& [e, mult] : others) {
    lycoris_term(gemm, *e, base.shape(), dora ? w0.f32() : nullptr, mult, extra.f32());
    float* W = w.f32();
    const float* X = extra.f32();
#pragma omp parallel for schedule(static) if (O * K > (1 << 15))
    for (int64_t i = 0; i < O * K; ++i) W[i] += X[i];
  }
}

struct ComponentSlot {
  LoraTarget target;
  Component comp;
  bool present;
};

}  // namespace

// Matches `loras` against `model` (throwing, before any work, for a file that matches nothing or
// a pair that does not fit), tells `on_names` which weights will be merged, then computes them
// one at a time: fn(target, "<module>.weight", merged f32 tensor of the base shape), the tensor a
// reused buffer valid during the call only.
LoraApplyReport merge_each(const SDModel& model, const std::vector<std::pair<const LoraFile*, float>>& loras,
                           const std::function<void(const std::map<LoraTarget, std::set<std::string>>&)>& on_names,
                           const MergedFn& fn) {
  LoraApplyReport report;
  std::map<LoraTarget, std::set<std::string>> names;
  if (loras.empty()) {
    if (on_names) on_names(names);
    return report;
  }
  std::map<std::string, TensorFile> files;
  const ComponentSlot slots[] = {
      {LoraTarget::UNet, Component::UNet, model.unet.loaded()},
      {LoraTarget::TextEncoder, Component::TextEncoder, model.te.loaded()},
      {LoraTarget::TextEncoder2, Component::TextEncoder2, model.has_te2 && model.te2.loaded()},
  };
  std::map<LoraTarget, WeightStore> stores;
  std::map<LoraTarget, ModuleIndex> index;
  std::map<LoraTarget, std::map<std::string, ModuleTerms>> modules;
  auto slot_of = [&](LoraTarget t) -> const ComponentSlot& {
    return slots[t == LoraTarget::UNet ? 0 : t == LoraTarget::TextEncoder ? 1 : 2];
  };
  const int lpb = model.unet.loaded() ? model.unet.config().layers_per_block : 0;

  for (const auto& [file, mult] : loras) {
    DF_ASSERT(file != nullptr);
    int matched = 0;
    std::vector<std::string> missed = file->unknown;
    for (const LoraEntry& e : file->entries) {
      const ComponentSlot& slot = slot_of(e.target);
      if (!slot.present) {
        missed.push_back(e.key + " (" + lora_target_name(e.target) + " not loaded)");
        continue;
      }
      auto st = stores.find(e.target);
      if (st == stores.end()) {
        st = stores.emplace(e.target, base_component_weights(model, slot.comp, files)).first;
        index.emplace(e.target, ModuleIndex(st->second));
      }
      const ModuleIndex& idx = index.at(e.target);
      std::string mod;
      if (!e.underscored) {
        if (idx.has(e.module)) mod = e.module;
      } else {
        mod = idx.from_under(e.module);
        if (mod.empty() && e.target == LoraTarget::UNet) mod = resolve_ldm_unet(e.module, lpb, idx);
      }
      if (mod.empty()) {
        missed.push_back(e.key + " (no such module in " + lora_target_name(e.target) + ")");
        continue;
      }
      const Tensor& base = *idx.weight.at(mod);
      DF_CHECK(lora_fits(base.shape(), e), file->path, ": ", e.key, ": ", lora_factor_shapes(e), " do not fit ",
               lora_target_name(e.target), " weight ", mod, " ", base.shape().str(), " (a ",
               e.kind == LoraKind::Full ? "full difference" : lora_kind_name(e.kind), " for another model architecture?)");
      ModuleTerms& mt = modules[e.target][mod];
      mt.base = &base;
      mt.terms.emplace_back(&e, mult);
      ++matched;
    }
    if (matched == 0) {
      std::string list;
      for (size_t i = 0; i < missed.size() && i < 3; ++i) list += (i ? "; " : "") + missed[i];
      fail(file->path, ": none of its ", file->entries.size() + file->unknown.size(),
           " LoRA modules/keys apply to ", model.path, " (", family_name(model.family), "): ", list,
           missed.size() > 3 ? "; ..." : "");
    }
    report.matched += matched;
    for (std::string& m : missed) report.unmatched.push_back(file->name + ": " + m);
  }
  for (const auto& [target, mods] : modules)
    for (const auto& [mod, mt] : mods) names[target].insert(mod + ".weight");
  if (on_names) on_names(names);

  // One module at a time in reused buffers.
  // The GEMM backend stays per thread: its primitives (one per product shape) are made once.
  static thread_local std::unique_ptr<Backend> gemm = make_cpu_backend(Precision::F32);
  Tensor w_buf, block, extra;
  for (const auto& [target, mods] : modules) {
    for (const auto& [mod, mt] : mods) {
      const Tensor& base = *mt.base;
      const int64_t O = base.dim(0), K = base.numel() / O;
      if (!w_buf.defined() || w_buf.numel() < O * K) w_buf = Tensor::empty({O * K});
      Tensor w = Tensor::borrow(w_buf.data(), {O, K}, DType::F32);
      merge_module(*gemm, mt, w, block, extra);
      fn(target, mod + ".weight", w.reshape(base.shape()));
    }
  }
  return report;
}


std::string LoraApplyReport::summary() const {
  std::string s = cat("lora: ", matched, " module", matched == 1 ? "" : "s", " merged");
  if (!unmatched.empty()) {
    s += cat("; ", unmatched.size(), " key", unmatched.size() == 1 ? "" : "s", " not applied (");
    for (size_t i = 0; i < unmatched.size() && i < 3; ++i) s += (i ? ", " : "") + unmatched[i];
    s += unmatched.size() > 3 ? ", ...)" : ")";
  }
  return s;
}

LoraMerge merge_loras(const SDModel& model, const std::vector<std::pair<const LoraFile*, float>>& loras) {
  LoraMerge out;
  out.report = merge_each(model, loras, {}, [&](LoraTarget t, const std::string& name, const Tensor& w) {
    (t == LoraTarget::UNet ? out.unet : t == LoraTarget::TextEncoder ? out.te : out.te2).emplace(name, w.clone());
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Prompt tags, paths, hashes

std::string extract_lora_tags(const std::string& prompt, std::vector<std::pair<std::string, float>>* tags) {
  // A1111's extra-network syntax: <(\w+):([^>]+)>, parameters separated by ':'.
  std::string out;
  size_t i = 0;
  while (i < prompt.size()) {
    size_t lt = prompt.find('<', i);
    if (lt == std::string::npos) break;
    size_t j = lt + 1;
    while (j < prompt.size() && (std::isalnum(static_cast<unsigned char>(prompt[j])) || prompt[j] == '_')) ++j;
    size_t gt = j < prompt.size() && prompt[j] == ':' ? prompt.find('>', j + 1) : std::string::npos;
    if (j == lt + 1 || gt == std::string::npos || gt == j + 1) {
      out.append(prompt, i, lt + 1 - i);
      i = lt + 1;
      continue;
    }
    const std::string type = prompt.substr(lt + 1, j - lt - 1);
    if (type != "lora") {  // another extra network: left in the text
      out.append(prompt, i, gt + 1 - i);
      i = gt + 1;
      continue;
    }
    const std::string tag = prompt.substr(lt, gt + 1 - lt);
    std::vector<std::string> items = split_on(prompt.substr(j + 1, gt - j - 1), ':');
    DF_CHECK(!items[0].empty(), "prompt tag ", tag, ": empty LoRA name (expected <lora:NAME> or <lora:NAME:MULTIPLIER>)");
    DF_CHECK(items.size() <= 2, "prompt tag ", tag, ": separate text-encoder and UNet multipliers are not supported ",
             "(expected <lora:NAME> or <lora:NAME:MULTIPLIER>)");
    float mult = 1.0f;
    if (items.size() == 2) {
      const std::string& v = items[1];
      const char* b = v.c_str();
      char* e = nullptr;
      errno = 0;
      double x = std::strtod(b, &e);
      while (e && *e && std::isspace(static_cast<unsigned char>(*e))) ++e;
      DF_CHECK(e != b && e && *e == 0 && errno == 0 && std::isfinite(x) && v.find('=') == std::string::npos,
               "prompt tag ", tag, ": multiplier '", v, "' is not a number (expected <lora:NAME:MULTIPLIER>, e.g. <lora:",
               items[0], ":0.8>)");
      mult = float(x);
    }
    if (tags) tags->emplace_back(items[0], mult);
    out.append(prompt, i, lt - i);
    i = gt + 1;
  }
  if (i < prompt.size()) out.append(prompt, i, std::string::npos);
  return out;
}

std::string resolve_lora_path(const std::string& name, const std::string& dir) {
  DF_CHECK(!name.empty(), "LoRA name is empty");
  DF_CHECK(!dir.empty(), "LoRA '", name, "': no LoRA directory given");
  const fs::path d(dir);
  for (const char* ext : {".safetensors", ".pt", ".ckpt"}) {
    if (ends_with(name, ext)) {
      fs::path p = d / name;
      std::error_code ec;
      if (fs::is_regular_file(p, ec)) return p.string();
    }
  }
  for (const char* ext : {".safetensors", ".pt", ".ckpt"}) {
    fs::path p = d / (name + ext);
    std::error_code ec;
    if (fs::is_regular_file(p, ec)) return p.string();
  }
  fail("LoRA '", name, "': no ", name, ".safetensors, ", name, ".pt or ", name, ".ckpt in ", dir);
}

std::string lora_hash(const std::string& path) {
  std::FILE* fp = std::fopen(path.c_str(), "rb");
  DF_CHECK(fp != nullptr, path, ": cannot open: ", std::strerror(errno));
  unsigned char head[9] = {};
  size_t got = std::fread(head, 1, sizeof head, fp);
  uint64_t start = 0;
  if (got == sizeof head && head[8] == '{') {  // safetensors: skip the 8-byte length and the header
    uint64_t n = 0;
    for (int k = 7; k >= 0; --k) n = n << 8 | head[k];
    start = 8 + n;
  }
  Sha256 s;
  bool ok = std::fseek(fp, long(start), SEEK_SET) == 0;
  std::vector<uint8_t> buf(size_t(4) << 20);
  size_t n;
  while (ok && (n = std::fread(buf.data(), 1, buf.size(), fp)) > 0) s.update(buf.data(), n);
  ok = ok && !std::ferror(fp);
  std::fclose(fp);
  DF_CHECK(ok, path, ": read error while hashing");
  return s.hex();
}

std::string format_lora_hashes(const std::vector<std::pair<std::string, std::string>>& name_hash) {
  if (name_hash.empty()) return {};
  std::string v;
  for (const auto& [name, hash] : name_hash) {
    std::string n;
    for (char c : name)
      if (c != ':' && c != ',') n += c;
    if (!v.empty()) v += ", ";
    v += n + ": " + hash.substr(0, 12);
  }
  // A1111 quotes the value with json.dumps.
  std::string q = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') q += '\\';
    q += c;
  }
  return q + "\"";
}

}  // namespace diffuse
