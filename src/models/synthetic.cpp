// Random-weight checkpoints with the real layouts (see synthetic.h): manifest parsing, the value
// generator, a streaming safetensors writer, and the diffusers folder around it.
#include "models/synthetic.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "models/tokenizer.h"

namespace diffuse {

namespace fs = std::filesystem;

namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

constexpr const char* kDiffusersVersion = "0.30.0";
constexpr float kEmbeddingStd = 0.02f;
constexpr float kBiasStd = 0.01f;
constexpr int64_t kChunkElems = int64_t(1) << 20;  // 4 MB of f32 per generated chunk

bool ends_with(const std::string& s, const char* suffix) {
  size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) out += (c < 0x20 || c == 0x7f) ? '?' : char(c);
  return out;
}

// "320x4x3x3" -> Shape; "" -> scalar. Returns false with *why set on a malformed shape.
bool parse_shape(const std::string& s, Shape* out, std::string* why) {
  std::vector<int64_t> dims;
  if (s.empty()) {
    *out = Shape(dims);
    return true;
  }
  size_t pos = 0;
  uint64_t product = 1;
  while (true) {
    size_t end = s.find('x', pos);
    std::string d = s.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (d.empty() || d.size() > 12 || d.find_first_not_of("0123456789") != std::string::npos) {
      *why = cat("dimension '", printable(d), "' is not a positive integer");
      return false;
    }
    int64_t v = std::stoll(d);
    if (v <= 0) {
      *why = cat("dimension ", v, " is not positive");
      return false;
    }
    if (__builtin_mul_overflow(product, uint64_t(v), &product) || product > (uint64_t(1) << 40)) {
      *why = "element count is too large";
      return false;
    }
    dims.push_back(v);
    if (dims.size() > size_t(Shape::kMaxDims)) {
      *why = cat("more than ", Shape::kMaxDims, " dimensions");
      return false;
    }
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  *out = Shape(dims);
  return true;
}

// ---- value generator ----

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t tensor_key(const std::string& name, uint64_t seed) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return mix64(h ^ mix64(seed + 0x9e3779b97f4a7c15ull));
}

// ---- progress ----

struct Progress {
  bool on = false;
  uint64_t total = 0, done = 0, next = 0;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  void add(uint64_t bytes, const std::string& what) {
    done += bytes;
    if (!on || done < next) return;
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "synth: %3d%%  %.2f / %.2f GB  %.1f s  %s\n", total ? int(100.0 * double(done) / double(total)) : 100,
                 double(done) / 1e9, double(total) / 1e9, s, what.c_str());
    next = done + std::max<uint64_t>(total / 20, 1);
  }
};

// A file written as path.tmp and renamed into place when complete.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    f_ = std::fopen(tmp_.c_str(), "wb");
    if (!f_) fail(path_, ": cannot create ", tmp_, ": ", std::strerror(errno));
  }
  ~AtomicFile() {
    if (f_) {
      std::fclose(f_);
      std::remove(tmp_.c_str());
    }
  }
  void write(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f_) != n) abort("write");
  }
  void commit() {
    if (std::fflush(f_) != 0) abort("write");
    if (::fsync(fileno(f_)) != 0 && errno != EINVAL && errno != EROFS) abort("fsync");
    int rc = std::fclose(f_);
    f_ = nullptr;
    if (rc != 0) {
      int e = errno;
      std::remove(tmp_.c_str());
      fail(path_, ": write failed: ", std::strerror(e));
    }
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      int e = errno;
      std::remove(tmp_.c_str());
      fail(path_, ": cannot rename ", tmp_, " into place: ", std::strerror(e));
    }
  }

 private:
  [[noreturn]] void abort(const char* what) {
    int e = errno;
    std::fclose(f_);
    f_ = nullptr;
    std::remove(tmp_.c_str());
    fail(path_, ": ", what, " failed: ", std::strerror(e));
  }
  std::string path_, tmp_;
  FILE* f_ = nullptr;
};

void write_text_file(const std::string& path, const std::string& text) {
  AtomicFile f(path);
  f.write(text.data(), text.size());
  f.commit();
}

const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    default: fail("synthetic checkpoints are f32, f16 or bf16, not ", dtype_name(t));
  }
}

// Streams one safetensors file: the header (all offsets are known from the shapes), then each
// tensor generated chunk by chunk into reused buffers.
void write_safetensors_stream(const std::string& path, const std::vector<const ManifestRow*>& rows,
                              const std::string& name_prefix, DType dtype, uint64_t seed,
                              const std::map<std::string, std::string>& metadata, Progress& progress,
                              SynthStats& stats) {
  const size_t esize = dtype_size(dtype);
  auto quoted = [&](const std::string& text) {
    try {
      return json(text).dump(-1, ' ', false, json::error_handler_t::strict);
    } catch (const json::exception&) {
      fail(path, ": cannot write name '", printable(text), "': not valid UTF-8");
    }
  };
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      header += cat(first ? "" : ",", quoted(k), ":", quoted(v));
      first = false;
    }
    header += '}';
  }
  uint64_t offset = 0;
  for (const ManifestRow* r : rows) {
    if (header.size() > 1) header += ',';
    header += quoted(r->name);
    header += cat(":{\"dtype\":\"", safetensors_dtype(dtype), "\",\"shape\":[");
    for (int i = 0; i < r->shape.rank(); ++i) header += cat(i ? "," : "", r->shape[i]);
    uint64_t bytes = uint64_t(r->shape.numel()) * esize;
    header += cat("],\"data_offsets\":[", offset, ",", offset + bytes, "]}");
    offset += bytes;
  }
  header += '}';
  while (header.size() % 8 != 0) header += ' ';  // keeps every tensor aligned to its element size

  AtomicFile f(path);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
  f.write(len, 8);
  f.write(header.data(), header.size());

  std::vector<float> buf;
  std::vector<uint8_t> out;
  for (const ManifestRow* r : rows) {
    const int64_t n = r->shape.numel();
    const int64_t chunk = std::min(n, kChunkElems);
    if (int64_t(buf.size()) < chunk) {
      buf.resize(size_t(chunk));
      out.resize(size_t(chunk) * esize);
    }
    for (int64_t b = 0; b < n; b += chunk) {
      const int64_t c = std::min(chunk, n - b);
      if (r->zero_init) std::fill(buf.begin(), buf.begin() + c, 0.0f);
      else synthetic_fill(r->name, r->shape, seed, b, c, buf.data());
      if (dtype == DType::F32) {
        f.write(buf.data(), size_t(c) * 4);
      } else {
        convert(buf.data(), DType::F32, out.data(), dtype, size_t(c));
        f.write(out.data(), size_t(c) * esize);
      }
      progress.add(uint64_t(c) * esize, name_prefix + r->name);
    }
    stats.tensors += 1;
    stats.parameters += n;
    stats.bytes += uint64_t(n) * esize;
  }
  f.commit();
}

// ---- diffusers folder pieces ----

enum class Fam { SD1, SD2, SDXL };

struct ComponentInfo {
  const char* library;
  const char* cls;
  const char* weights;
};

ComponentInfo component_info(const std::string& c) {
  if (c == "unet") return {"diffusers", "UNet2DConditionModel", "diffusion_pytorch_model.safetensors"};
  if (c == "vae") return {"diffusers", "AutoencoderKL", "diffusion_pytorch_model.safetensors"};
  if (c == "text_encoder") return {"transformers", "CLIPTextModel", "model.safetensors"};
  if (c == "text_encoder_2") return {"transformers", "CLIPTextModelWithProjection", "model.safetensors"};
  fail("synthetic diffusers folder: unknown component '", printable(c),
       "' (expected unet, vae, text_encoder, text_encoder_2)");
}

const char* torch_dtype_name(DType t) {
  return t == DType::F16 ? "float16" : t == DType::BF16 ? "bfloat16" : "float32";
}

template <typename J, typename V>
void set_default(J& j, const char* key, V&& v) {
  if (!j.contains(key)) j[key] = std::forward<V>(v);
}

ordered_json component_config(const std::string& component, const ordered_json& manifest_cfg, Fam fam,
                              DType dtype) {
  ComponentInfo info = component_info(component);
  ordered_json cfg = ordered_json::object();
  const bool transformers = std::strcmp(info.library, "transformers") == 0;
  if (transformers) {
    cfg["architectures"] = ordered_json::array({info.cls});
    cfg["model_type"] = "clip_text_model";
  } else {
    cfg["_class_name"] = info.cls;
    cfg["_diffusers_version"] = kDiffusersVersion;
  }
  if (manifest_cfg.is_object()) {
    auto it = manifest_cfg.find(component);
    if (it != manifest_cfg.end() && it->is_object())
      for (auto e = it->begin(); e != it->end(); ++e) cfg[e.key()] = e.value();
  }
  if (transformers) {
    set_default(cfg, "bos_token_id", 49406);
    set_default(cfg, "eos_token_id", 49407);
    set_default(cfg, "pad_token_id", 1);
    set_default(cfg, "layer_norm_eps", 1e-5);
    set_default(cfg, "attention_dropout", 0.0);
    set_default(cfg, "initializer_range", 0.02);
    set_default(cfg, "initializer_factor", 1.0);
    if (cfg.contains("hidden_size")) set_default(cfg, "projection_dim", cfg["hidden_size"]);
    set_default(cfg, "torch_dtype", torch_dtype_name(dtype));
  } else if (component == "vae") {
    set_default(cfg, "act_fn", "silu");
    set_default(cfg, "scaling_factor", fam == Fam::SDXL ? 0.13025 : 0.18215);
    set_default(cfg, "force_upcast", true);
  }
  return cfg;
}

ordered_json scheduler_config(Fam fam, bool v_prediction) {
  ordered_json s = ordered_json::object();
  const char* cls = fam == Fam::SD1 ? "PNDMScheduler" : fam == Fam::SD2 ? "DDIMScheduler" : "EulerDiscreteScheduler";
  s["_class_name"] = cls;
  s["_diffusers_version"] = kDiffusersVersion;
  s["beta_end"] = 0.012;
  s["beta_schedule"] = "scaled_linear";
  s["beta_start"] = 0.00085;
  s["num_train_timesteps"] = 1000;
  s["prediction_type"] = v_prediction ? "v_prediction" : "epsilon";
  s["steps_offset"] = 1;
  s["timestep_spacing"] = "leading";
  s["trained_betas"] = nullptr;
  if (fam == Fam::SD1) {
    s["set_alpha_to_one"] = false;
    s["skip_prk_steps"] = true;
  } else if (fam == Fam::SD2) {
    s["clip_sample"] = false;
    s["set_alpha_to_one"] = false;
  } else {
    s["interpolation_type"] = "linear";
    s["use_karras_sigmas"] = false;
  }
  return s;
}

// A CLIP tokenizer folder from the built-in vocabulary: vocab.json + merges.txt as transformers
// writes them, and the configs with the family's pad token.
void write_tokenizer(const fs::path& dir, const std::string& pad_token) {
  fs::create_directories(dir);
  const ClipTokenizer& tok = ClipTokenizer::builtin();
  const int n = tok.vocab_size();
  std::string vocab = "{";
  for (int id = 0; id < n; ++id) vocab += cat(id ? "," : "", json(tok.token(id)).dump(), ":", id);
  vocab += "}";
  write_text_file((dir / "vocab.json").string(), vocab);

  // The BPE file's first line is a comment; the next (vocab_size - 2*256 - 2) lines are the merges.
  const std::string text = detail::clip_vocab_text();
  const int merges = n - 514;
  DF_CHECK(merges > 0, "built-in CLIP vocabulary has only ", n, " tokens");
  std::string out = "#version: 0.2\n";
  size_t pos = text.find('\n');
  DF_CHECK(pos != std::string::npos, "built-in CLIP vocabulary: no merges");
  ++pos;
  for (int i = 0; i < merges; ++i) {
    size_t end = text.find('\n', pos);
    DF_CHECK(end != std::string::npos || i == merges - 1, "built-in CLIP vocabulary: only ", i, " merges");
    if (end == std::string::npos) end = text.size();
    out.append(text, pos, end - pos);
    out += '\n';
    pos = end + 1;
  }
  write_text_file((dir / "merges.txt").string(), out);

  ordered_json cfg = {{"add_prefix_space", false},
                      {"bos_token", "<|startoftext|>"},
                      {"do_lower_case", true},
                      {"eos_token", "<|endoftext|>"},
                      {"errors", "replace"},
                      {"model_max_length", 77},
                      {"pad_token", pad_token},
                      {"tokenizer_class", "CLIPTokenizer"},
                      {"unk_token", "<|endoftext|>"}};
  write_text_file((dir / "tokenizer_config.json").string(), cfg.dump(2) + "\n");
  ordered_json special = {{"bos_token", "<|startoftext|>"},
                          {"eos_token", "<|endoftext|>"},
                          {"pad_token", pad_token},
                          {"unk_token", "<|endoftext|>"}};
  write_text_file((dir / "special_tokens_map.json").string(), special.dump(2) + "\n");
}

ordered_json read_config_json(const std::string& path) {
  if (path.empty()) return ordered_json();
  std::ifstream in(path, std::ios::binary);
  DF_CHECK(in.good(), path, ": cannot open manifest config");
  std::ostringstream ss;
  ss << in.rdbuf();
  try {
    ordered_json j = ordered_json::parse(ss.str());
    DF_CHECK(j.is_object(), path, ": manifest config is not a JSON object");
    return j;
  } catch (const nlohmann::json::exception& e) {
    fail(path, ": manifest config is not valid JSON: ", e.what());
  }
}

}  // namespace

// ---- manifest ----

std::vector<ManifestRow> read_manifest(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) fail(path, ": cannot open manifest: ", std::strerror(errno));
  std::vector<ManifestRow> rows;
  std::map<std::string, int> seen;  // key -> line
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const std::string where = cat(path, ":", lineno, ": ");
    if (lineno == 1) {
      DF_CHECK(line == "layout\tcomponent\tname\tshape", where,
               "manifest header must be 'layout<TAB>component<TAB>name<TAB>shape', not '",
               printable(line.substr(0, 80)), "'");
      continue;
    }
    if (line.empty()) continue;
    std::vector<std::string> f;
    size_t pos = 0;
    while (true) {
      size_t tab = line.find('\t', pos);
      f.push_back(line.substr(pos, tab == std::string::npos ? std::string::npos : tab - pos));
      if (tab == std::string::npos) break;
      pos = tab + 1;
    }
    DF_CHECK(f.size() == 4, where, "expected 4 tab-separated fields (layout component name shape), found ", f.size());
    ManifestRow r;
    r.layout = f[0];
    r.component = f[1];
    r.name = f[2];
    DF_CHECK(r.layout == "diffusers" || r.layout == "ldm", where, "layout '", printable(r.layout),
             "' is not 'diffusers' or 'ldm'");
    DF_CHECK(!r.component.empty(), where, "empty component");
    DF_CHECK(!r.name.empty(), where, "empty tensor name");
    DF_CHECK(r.name.find_first_of(" \"\\") == std::string::npos && printable(r.name) == r.name, where,
             "tensor name '", printable(r.name), "' has a space, quote, backslash or control character");
    std::string why;
    DF_CHECK(parse_shape(f[3], &r.shape, &why), where, "tensor ", r.name, ": bad shape '", printable(f[3]), "': ", why);
    // ldm names share one file; diffusers names are per component folder.
    const std::string key = r.layout == "ldm" ? "ldm\t" + r.name : "diffusers\t" + r.component + "\t" + r.name;
    auto [it, inserted] = seen.emplace(key, lineno);
    DF_CHECK(inserted, where, r.layout, " tensor ", r.name, " already listed on line ", it->second);
    rows.push_back(std::move(r));
  }
  DF_CHECK(in.eof(), path, ": read error");
  DF_CHECK(lineno > 0, path, ": manifest is empty (no header)");
  DF_CHECK(!rows.empty(), path, ": manifest has a header but no rows");
  return rows;
}

std::string find_manifest(const std::string& name_or_path, const std::vector<std::string>& dirs) {
  std::error_code ec;
  if (ends_with(name_or_path, ".tsv") || name_or_path.find('/') != std::string::npos) {
    DF_CHECK(fs::is_regular_file(name_or_path, ec), name_or_path, ": no such manifest file");
    return name_or_path;
  }
  DF_CHECK(name_or_path == "sd15" || name_or_path == "sd21" || name_or_path == "sdxl", "unknown manifest '",
           printable(name_or_path), "' (expected sd15, sd21, sdxl or a path to a .tsv manifest)");
  std::string searched;
  for (const std::string& d : dirs) {
    if (d.empty()) continue;
    fs::path p = fs::path(d) / (name_or_path + ".tsv");
    if (fs::is_regular_file(p, ec)) return p.string();
    searched += (searched.empty() ? "" : ", ") + d;
  }
  fail("manifest ", name_or_path, ".tsv not found (searched: ", searched.empty() ? "nothing" : searched,
       "); pass --manifest PATH.tsv or set DIFFUSE_MANIFEST_DIR");
}

std::string manifest_config_path(const std::string& tsv_path) {
  std::string base = ends_with(tsv_path, ".tsv") ? tsv_path.substr(0, tsv_path.size() - 4) : tsv_path;
  std::error_code ec;
  std::string p = base + ".config.json";
  return fs::is_regular_file(p, ec) ? p : "";
}

// ---- values ----

SyntheticInit synthetic_init(const std::string& name, const Shape& shape) {
  if (shape.rank() == 0) return {SyntheticInit::Ones, 0.0f};
  if (name.find("token_embedding") != std::string::npos || name.find("position_embedding") != std::string::npos ||
      name.find("positional_embedding") != std::string::npos)
    return {SyntheticInit::Embedding, kEmbeddingStd};
  if (shape.rank() == 1) {
    if (ends_with(name, "bias")) return {SyntheticInit::Bias, kBiasStd};  // also in_proj_bias
    return {SyntheticInit::Ones, 0.0f};
  }
  const int64_t fan_in = shape.numel() / shape[0];
  return {SyntheticInit::FanIn, float(1.0 / std::sqrt(double(std::max<int64_t>(fan_in, 1))))};
}

void synthetic_fill(const std::string& name, const Shape& shape, uint64_t seed, int64_t begin, int64_t count,
                    float* out) {
  DF_ASSERT(begin >= 0 && count >= 0 && begin + count <= shape.numel());
  const SyntheticInit init = synthetic_init(name, shape);
  if (init.kind == SyntheticInit::Ones) {
    std::fill(out, out + count, 1.0f);
    return;
  }
  const uint64_t key = tensor_key(name, seed);
  // Sum of four 16-bit uniforms, each (b + 0.5) / 65536: mean 2, variance 4/12.
  const float scale = init.std * 1.7320508075688772f / 65536.0f;
  const float shift = 2.0f * 65536.0f - 2.0f;  // 65536 * mean - 4 * 0.5
  // Each element depends only on its index: threads cannot change the values.
#pragma omp parallel for schedule(static) if (count > (1 << 16))
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t r = mix64(key + uint64_t(begin + i) * 0x9e3779b97f4a7c15ull);
    const uint32_t s = uint32_t(r & 0xffff) + uint32_t((r >> 16) & 0xffff) + uint32_t((r >> 32) & 0xffff) +
                       uint32_t(r >> 48);
    out[i] = (float(s) - shift) * scale;
  }
}

// ---- writer ----

SynthStats write_synthetic_checkpoint(const std::vector<ManifestRow>& rows, const std::string& layout,
                                      const std::string& out_path, DType dtype, uint64_t seed,
                                      const std::string& config_path, bool progress_on,
                                      const std::map<std::string, std::string>& extra_metadata) {
  DF_CHECK(layout == "ldm" || layout == "diffusers", "synthetic checkpoint: layout '", printable(layout),
           "' is not 'ldm' or 'diffusers'");
  safetensors_dtype(dtype);  // validates
  DF_CHECK(!out_path.empty(), "synthetic checkpoint: empty output path");
  std::vector<const ManifestRow*> sel;
  std::vector<std::string> components;  // first-appearance order
  for (const ManifestRow& r : rows) {
    if (r.layout != layout) continue;
    sel.push_back(&r);
    if (std::find(components.begin(), components.end(), r.component) == components.end())
      components.push_back(r.component);
  }
  DF_CHECK(!sel.empty(), "synthetic checkpoint: the manifest has no rows with layout '", layout, "'");

  Progress progress;
  progress.on = progress_on;
  for (const ManifestRow* r : sel) progress.total += uint64_t(r->shape.numel()) * dtype_size(dtype);
  SynthStats stats;

  if (layout == "ldm") {
    std::error_code ec;
    DF_CHECK(!fs::is_directory(out_path, ec), out_path, ": is a directory (the ldm layout is one .safetensors file)");
    std::map<std::string, std::string> meta = {
        {"format", "pt"},
        {"diffuse_synthetic", cat("random weights (not a trained model), seed ", seed)}};
    for (const auto& [k, v] : extra_metadata) meta[k] = v;
    write_safetensors_stream(out_path, sel, "", dtype, seed, meta, progress, stats);
    return stats;
  }

  // diffusers folder
  std::error_code ec;
  if (fs::exists(out_path, ec)) {
    DF_CHECK(fs::is_directory(out_path, ec), out_path, ": exists and is not a directory (the diffusers layout is a folder)");
  } else {
    fs::create_directories(out_path, ec);
    if (ec) fail(out_path, ": cannot create directory: ", ec.message());
  }
  const fs::path root(out_path);
  const ordered_json manifest_cfg = read_config_json(config_path);

  const bool has_te = std::count(components.begin(), components.end(), "text_encoder") > 0;
  const bool has_te2 = std::count(components.begin(), components.end(), "text_encoder_2") > 0;
  int64_t te_width = 0;
  for (const ManifestRow* r : sel)
    if (r->component == "text_encoder" && ends_with(r->name, "token_embedding.weight") && r->shape.rank() == 2)
      te_width = r->shape[1];
  const Fam fam = has_te2 ? Fam::SDXL : te_width == 1024 ? Fam::SD2 : Fam::SD1;
  bool v_prediction = false;
  if (fam == Fam::SD2 && manifest_cfg.is_object() && manifest_cfg.contains("unet") && manifest_cfg["unet"].is_object()) {
    const auto& u = manifest_cfg["unet"];
    v_prediction = u.contains("sample_size") && u["sample_size"].is_number() && u["sample_size"].get<int>() == 96;
  }

  ordered_json index = ordered_json::object();
  index["_class_name"] = fam == Fam::SDXL ? "StableDiffusionXLPipeline" : "StableDiffusionPipeline";
  index["_diffusers_version"] = kDiffusersVersion;
  index["feature_extractor"] = ordered_json::array({nullptr, nullptr});
  if (fam == Fam::SDXL) {
    index["force_zeros_for_empty_prompt"] = true;
  } else {
    index["requires_safety_checker"] = false;
    index["safety_checker"] = ordered_json::array({nullptr, nullptr});
  }
  index["scheduler"] = ordered_json::array({"diffusers", scheduler_config(fam, v_prediction)["_class_name"]});
  std::vector<std::string> listed = components;
  if (has_te) listed.push_back("tokenizer");
  if (has_te2) listed.push_back("tokenizer_2");
  std::sort(listed.begin(), listed.end());
  for (const std::string& c : listed) {
    if (c == "tokenizer" || c == "tokenizer_2") {
      index[c] = ordered_json::array({"transformers", "CLIPTokenizer"});
    } else {
      ComponentInfo info = component_info(c);
      index[c] = ordered_json::array({info.library, info.cls});
    }
  }

  for (const std::string& c : components) {
    ComponentInfo info = component_info(c);
    fs::path dir = root / c;
    fs::create_directories(dir, ec);
    if (ec) fail(dir.string(), ": cannot create directory: ", ec.message());
    write_text_file((dir / "config.json").string(), component_config(c, manifest_cfg, fam, dtype).dump(2) + "\n");
    std::vector<const ManifestRow*> part;
    for (const ManifestRow* r : sel)
      if (r->component == c) part.push_back(r);
    write_safetensors_stream((dir / info.weights).string(), part, c + "/", dtype, seed, {{"format", "pt"}}, progress,
                             stats);
  }
  if (has_te) write_tokenizer(root / "tokenizer", fam == Fam::SD2 ? "!" : "<|endoftext|>");
  if (has_te2) write_tokenizer(root / "tokenizer_2", "!");
  fs::create_directories(root / "scheduler", ec);
  if (ec) fail((root / "scheduler").string(), ": cannot create directory: ", ec.message());
  write_text_file((root / "scheduler" / "scheduler_config.json").string(),
                  scheduler_config(fam, v_prediction).dump(2) + "\n");
  // Last, so that a folder is only a diffusers model once everything else is in place.
  write_text_file((root / "model_index.json").string(), index.dump(2) + "\n");
  return stats;
}

}  // namespace diffuse
