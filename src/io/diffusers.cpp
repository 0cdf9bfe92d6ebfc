// diffusers folders: model_index.json names the pipeline's components; each component folder has
// a config.json and its weights as diffusion_pytorch_model.safetensors (diffusers classes) or
// model.safetensors (transformers classes), possibly sharded with a *.safetensors.index.json, or
// only as an fp16 variant. Tensors are named "<component>/<name>". A single component folder
// (config.json + weights, no model_index.json) loads with bare tensor names.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/tensor_file.h"

namespace diffuse {

namespace fs = std::filesystem;

namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

constexpr uintmax_t kMaxJsonBytes = 64ull << 20;

// Names from JSON files: keep messages on one line.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) out += (c < 0x20 || c == 0x7f) ? '?' : char(c);
  return out;
}

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

std::string read_text(const fs::path& p) {
  std::error_code ec;
  uintmax_t n = fs::file_size(p, ec);
  if (ec) fail(p.string(), ": cannot read: ", ec.message());
  DF_CHECK(n <= kMaxJsonBytes, p.string(), ": ", n, " bytes is too large for a JSON config");
  std::ifstream in(p, std::ios::binary);
  DF_CHECK(in.good(), p.string(), ": cannot open for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  DF_CHECK(!in.bad(), p.string(), ": read error");
  return ss.str();
}

template <typename J>
J parse_json(const fs::path& p, const std::string& text) {
  try {
    return J::parse(text);
  } catch (const nlohmann::json::exception& e) {
    std::string why = e.what();
    size_t k = why.find("] ");
    if (why.rfind("[json.exception", 0) == 0 && k != std::string::npos) why = why.substr(k + 2);
    fail(p.string(), ": not valid JSON: ", why);
  }
}

// Where a component folder keeps its weights.
struct Weights {
  enum Kind { None, Single, Sharded, PickleOnly } kind = None;
  fs::path file;  // the .safetensors file or the .index.json
};

Weights find_weights(const fs::path& dir) {
  static const char* const kBases[] = {"diffusion_pytorch_model", "model"};
  for (const char* variant : {"", ".fp16"}) {
    for (const char* base : kBases) {
      fs::path single = dir / cat(base, variant, ".safetensors");
      if (is_file(single)) return {Weights::Single, single};
    }
    for (const char* base : kBases) {
      // diffusers puts the variant before the last extension: x.safetensors.index.fp16.json;
      // some exports use x.fp16.safetensors.index.json.
      for (const std::string& name : {cat(base, ".safetensors.index", variant, ".json"),
                                      cat(base, variant, ".safetensors.index.json")}) {
        fs::path index = dir / name;
        if (is_file(index)) return {Weights::Sharded, index};
      }
    }
  }
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".bin") == 0 &&
        (name.rfind("diffusion_pytorch_model", 0) == 0 || name.rfind("pytorch_model", 0) == 0))
      return {Weights::PickleOnly, it->path()};
  }
  return {};
}

bool plain_file_name(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\\') == std::string::npos && s.find('\0') == std::string::npos;
}

// Appends one component's tensors (named prefix + name) to `out`.
void load_component(const fs::path& dir, const Weights& w, const std::string& prefix, TensorFile& out) {
  auto take = [&](TensorFile&& part) {
    for (auto& e : part.tensors) out.tensors.push_back({prefix + e.name, std::move(e.tensor)});
    for (auto& m : part.metadata) out.metadata.emplace(prefix + m.first, m.second);
    for (auto& s : part.warnings) out.warnings.push_back(std::move(s));
  };
  switch (w.kind) {
    case Weights::None:
      return;
    case Weights::PickleOnly:
      fail(dir.string(), ": component has only .bin (pickle) weights (", w.file.filename().string(),
           "); .bin weights in diffusers folders are not supported yet, convert them to safetensors");
    case Weights::Single:
      take(load_safetensors(w.file.string()));
      return;
    case Weights::Sharded:
      break;
  }

  // Sharded: {"metadata": {...}, "weight_map": {"tensor name": "shard file name"}}.
  const std::string ipath = w.file.string();
  json index = parse_json<json>(w.file, read_text(w.file));
  DF_CHECK(index.is_object(), ipath, ": shard index is not a JSON object");
  auto wm = index.find("weight_map");
  DF_CHECK(wm != index.end() && wm->is_object(), ipath, ": shard index has no \"weight_map\" object");
  std::map<std::string, std::vector<std::string>> by_shard;  // sorted shard names: stable order
  std::map<std::string, std::string> shard_of;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    DF_CHECK(it->is_string(), ipath, ": weight_map entry for '", printable(it.key()), "' is not a string");
    const std::string& shard = it->get_ref<const std::string&>();
    DF_CHECK(plain_file_name(shard), ipath, ": weight_map entry for '", printable(it.key()), "' names '", printable(shard),
             "', not a file in the same folder");
    by_shard[shard].push_back(it.key());
    shard_of[it.key()] = shard;
  }
  DF_CHECK(!by_shard.empty(), ipath, ": weight_map is empty");
  for (const auto& [shard, names] : by_shard) {
    fs::path sp = dir / shard;
    DF_CHECK(is_file(sp), ipath, ": shard '", shard, "' (holding '", printable(names.front()), "') is missing");
    TensorFile part = load_safetensors(sp.string());
    for (const auto& n : names)
      DF_CHECK(part.find(n) != nullptr, ipath, ": tensor '", printable(n), "' is listed in shard '", shard,
               "' but that file does not contain it");
    size_t unlisted = 0;
    for (const auto& e : part.tensors) {
      auto s = shard_of.find(e.name);
      if (s == shard_of.end() || s->second != shard) ++unlisted;
    }
    if (unlisted)
      out.warnings.push_back(cat(sp.string(), ": ", unlisted, " tensors are not listed for this shard in ",
                                 w.file.filename().string()));
    part.metadata.clear();  // per-shard "format" entries would collide; the index holds the story
    take(std::move(part));
  }
}

bool has_component_files(const fs::path& dir) {
  if (!is_file(dir / "config.json")) return false;
  Weights w = find_weights(dir);
  return w.kind == Weights::Single || w.kind == Weights::Sharded;
}

}  // namespace

bool is_diffusers_dir(const std::string& path) {
  fs::path p(path);
  if (!is_dir(p)) return false;
  return is_file(p / "model_index.json") || has_component_files(p);
}

TensorFile load_diffusers(const std::string& dir) {
  fs::path root(dir);
  if (!is_dir(root)) {
    std::error_code ec;
    if (!fs::exists(root, ec)) fail(dir, ": no such file or directory");
    fail(dir, ": not a directory");
  }
  TensorFile tf;
  tf.path = dir;
  tf.format = "diffusers";

  fs::path mi = root / "model_index.json";
  if (!is_file(mi)) {
    // A single component folder: bare tensor names.
    Weights w = find_weights(root);
    bool has_config = is_file(root / "config.json");
    DF_CHECK(has_config && w.kind != Weights::None, dir,
             ": not a diffusers folder (no model_index.json, and no config.json with "
             "diffusion_pytorch_model.safetensors or model.safetensors)");
    load_component(root, w, "", tf);
    tf.metadata["config.json"] = read_text(root / "config.json");
    tf.build_index();
    return tf;
  }

  std::string index_text = read_text(mi);
  ordered_json index = parse_json<ordered_json>(mi, index_text);  // keeps component order
  DF_CHECK(index.is_object(), mi.string(), ": not a JSON object");
  tf.metadata["model_index.json"] = index_text;

  size_t loaded = 0;
  for (auto it = index.begin(); it != index.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = *it;
    // Components are ["library", "ClassName"]; unused ones are [null, null]; the rest is settings.
    if (!v.is_array() || v.size() != 2 || !v[0].is_string() || !v[1].is_string()) continue;
    if (!plain_file_name(name)) {
      tf.warnings.push_back(cat(mi.string(), ": skipping component '", printable(name), "': not a plain folder name"));
      continue;
    }
    fs::path cdir = root / name;
    if (!is_dir(cdir)) continue;
    Weights w = find_weights(cdir);
    if (w.kind == Weights::None) {
      // Tokenizers and schedulers have no weights. Keep the scheduler's settings (prediction type,
      // beta schedule): they describe how the model was trained.
      if (is_file(cdir / "scheduler_config.json"))
        tf.metadata[name + "/scheduler_config.json"] = read_text(cdir / "scheduler_config.json");
      else if (is_file(cdir / "config.json"))
        tf.warnings.push_back(cat(cdir.string(), ": component '", name, "' (", v[1].get<std::string>(),
                                  ") has a config.json but no weights"));
      continue;
    }
    load_component(cdir, w, name + "/", tf);
    if (is_file(cdir / "config.json")) tf.metadata[name + "/config.json"] = read_text(cdir / "config.json");
    ++loaded;
  }
  DF_CHECK(loaded > 0, dir, ": no component folder with safetensors weights found (model_index.json lists none "
           "that exist here)");
  tf.build_index();
  return tf;
}

}  // namespace diffuse
