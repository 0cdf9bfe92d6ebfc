// The server's model, LoRA and ControlNet lists, and the only place where a client's name becomes
// a path. A lookup never builds a path from the name: it returns an entry the last scan found.
// The name is still checked against the folder first (absolute, `..`, a symlink out), so an
// attempt to leave the folder is a 400 the client sees rather than a quiet "unknown".
//
// Scans follow A1111: checkpoints are *.safetensors / *.ckpt (modules/sd_models.py lists those
// two; diffuse also reads .pt, but a .pt next to checkpoints is usually an embedding or a VAE),
// LoRAs *.safetensors / *.pt / *.ckpt (the Lora extension), ControlNets *.safetensors / *.pth /
// *.pt / *.ckpt (sd-webui-controlnet's CN_MODEL_EXTS) plus diffusers ControlNet folders.
// Hidden entries (".name") are skipped, as A1111 does by default. Symlinks are followed only
// while they resolve inside the folder being scanned; anything resolving outside is not listed.
#include "server/model_registry.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <set>

#include "core/sha256.h"
#include "core/text.h"
#include "io/tensor_file.h"
#include "server/request.h"

namespace fs = std::filesystem;

namespace diffuse::server {

namespace {

constexpr int kMaxDepth = 16;                       // deeper trees are not model folders
constexpr uint64_t kMaxHeaderBytes = 16ull << 20;   // LoRA metadata: real headers are < 1 MB

const std::vector<std::string> kModelExts = {".safetensors", ".ckpt"};
const std::vector<std::string> kLoraExts = {".safetensors", ".pt", ".ckpt"};
const std::vector<std::string> kControlExts = {".safetensors", ".pth", ".pt", ".ckpt"};

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool has_ext(const std::string& name, const std::vector<std::string>& exts) {
  const std::string l = lower(name);
  for (const std::string& e : exts)
    if (l.size() > e.size() && l.compare(l.size() - e.size(), e.size(), e) == 0) return true;
  return false;
}

// "sub/x.safetensors" → "sub/x" (only the last component's extension; "sub.d/x" stays).
std::string strip_ext(const std::string& rel) {
  const size_t slash = rel.find_last_of('/');
  const size_t dot = rel.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash) || dot == slash + 1) return rel;
  return rel.substr(0, dot);
}

std::string base_name(const std::string& rel) {
  const size_t slash = rel.find_last_of('/');
  return slash == std::string::npos ? rel : rel.substr(slash + 1);
}

// A1111's model_name: the relative path without extension, separators turned into '_'.
std::string model_name_of(const std::string& rel, bool folder) {
  std::string s = folder ? rel : strip_ext(rel);
  std::replace(s.begin(), s.end(), '/', '_');
  std::replace(s.begin(), s.end(), '\\', '_');
  return s;
}

// "x [abc]" → "x": A1111's re_strip_checksum (a trailing bracketed part and the blanks around it).
std::string strip_bracket(const std::string& s) {
  size_t end = s.find_last_not_of(" \t");
  if (end == std::string::npos || s[end] != ']') return s;
  const size_t open = s.rfind('[', end);
  if (open == std::string::npos) return s;
  size_t keep = s.find_last_not_of(" \t", open == 0 ? std::string::npos : open - 1);
  return open == 0 || keep == std::string::npos ? std::string() : s.substr(0, keep + 1);
}

bool all_hex(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isxdigit(c) != 0; });
}

// A client's name for messages and field names: control characters escaped, bytes of text that
// is not UTF-8 written as \xNN (it goes into a JSON body), long names cut.
std::string safe(const std::string& name) {
  std::string s = name.size() > 200 ? name.substr(0, 200) : name;
  if (!valid_utf8(s)) {
    std::string out;
    for (unsigned char c : s) {
      if (c >= 0x80) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\x%02x", c);
        out += buf;
      } else {
        out += char(c);
      }
    }
    s = out;
  }
  s = printable(s);
  if (name.size() > 200) s += "...";
  return s;
}

std::string shown(const std::string& name) {
  std::string s(1, '\'');
  s += safe(name);
  s += '\'';
  return s;
}

// Whether canonical path `p` is `root` or lies below it, compared component by component (a
// string prefix would take /models-evil for /models).
bool inside(const fs::path& root, const fs::path& p) {
  auto r = root.begin(), q = p.begin();
  for (; r != root.end(); ++r, ++q) {
    if (r->empty()) continue;  // a trailing separator's empty last component
    if (q == p.end() || *r != *q) return false;
  }
  return true;
}

fs::path canonical_or_empty(const fs::path& p) {
  std::error_code ec;
  fs::path c = fs::canonical(p, ec);
  return ec ? fs::path() : c;
}

// The checks on a client's name that do not depend on what lies on disk, then the ones that
// do: every candidate path the name could mean (`tries`: the name itself and variants) must
// resolve inside `root` (missing trailing parts are fine: weakly_canonical resolves what exists,
// so a symlinked directory on the way is caught even when the file is not there).
void check_name(const std::string& name, const std::string& root, const std::vector<std::string>& tries,
                const std::string& field, const std::string& what) {
  auto refuse = [&](const std::string& why) {
    throw RequestError(400, field, field + ": " + what + " " + shown(name) + " " + why);
  };
  if (name.find('\0') != std::string::npos) refuse("contains a NUL byte");
  if (name.empty()) return;
  // '\' is a separator for Windows clients (A1111 titles there use it), so it counts as one here.
  if (name[0] == '/' || name[0] == '\\' || (name.size() >= 2 && std::isalpha(static_cast<unsigned char>(name[0])) &&
                                            name[1] == ':'))
    refuse("is an absolute path: give a name relative to the folder");
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find_first_of("/\\", start);
    if (end == std::string::npos) end = name.size();
    if (name.compare(start, end - start, "..") == 0) refuse("contains a '..' component: names stay inside the folder");
    start = end + 1;
  }
  if (root.empty()) return;
  const fs::path croot = canonical_or_empty(root);
  if (croot.empty()) return;  // no folder: nothing there to reach
  for (const std::string& t : tries) {
    if (t.empty()) continue;
    std::error_code ec;
    const fs::path c = fs::weakly_canonical(croot / fs::path(t), ec);
    // Fail closed: a path that cannot be resolved (a symlink loop, no permission) is not followed.
    if (ec) refuse("cannot be resolved inside the folder (" + ec.message() + ")");
    if (!inside(croot, c)) refuse("resolves outside the folder (a symlink pointing out)");
  }
}

// A1111's old model hash (sd_models.model_hash): the first 8 hex digits of the sha256 of the 64 KiB
// at offset 1 MiB (of nothing for smaller files). Still accepted as a checkpoint alias, and the
// hash the ControlNet extension shows.
std::string old_hash(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return "";
  Sha256 s;
  std::vector<uint8_t> buf(0x10000);
  if (std::fseek(f, 0x100000, SEEK_SET) == 0) {
    size_t n = std::fread(buf.data(), 1, buf.size(), f);
    s.update(buf.data(), n);
  }
  std::fclose(f);
  return s.hex().substr(0, 8);
}

// The __metadata__ of a safetensors file (header only, size capped); {} when there is none or the
// file is not safetensors.
nlohmann::json safetensors_metadata(const std::string& path) {
  nlohmann::json none = nlohmann::json::object();
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return none;
  uint8_t len8[8];
  std::string header;
  if (std::fread(len8, 1, 8, f) == 8) {
    uint64_t n = 0;
    for (int k = 7; k >= 0; --k) n = n << 8 | len8[k];
    if (n >= 2 && n <= kMaxHeaderBytes) {
      header.resize(size_t(n));
      if (std::fread(header.data(), 1, header.size(), f) != header.size()) header.clear();
    }
  }
  std::fclose(f);
  if (header.empty() || header[0] != '{') return none;
  try {
    nlohmann::json h = nlohmann::json::parse(header);
    auto it = h.find("__metadata__");
    if (h.is_object() && it != h.end() && it->is_object()) return *it;
  } catch (const nlohmann::json::exception&) {
  }
  return none;
}

// What a scan found: the path (as reached, not resolved) and its name relative to the root.
struct Found {
  fs::path path;
  std::string rel;
  bool folder = false;
};

enum class Kind { Models, Loras, ControlNets };

struct Walk {
  Kind kind;
  fs::path root;              // canonical
  std::set<fs::path> skip;    // canonical folders left out (the ControlNet and LoRA folders)
  std::set<fs::path> seen;    // canonical folders visited (symlink loops)
  std::vector<Found> out;

  void dir(const fs::path& d, const std::string& prefix, int depth) {
    if (depth > kMaxDepth) return;
    std::vector<fs::directory_entry> entries;
    std::error_code ec;
    for (fs::directory_iterator it(d, ec), end; !ec && it != end; it.increment(ec)) entries.push_back(*it);
    std::sort(entries.begin(), entries.end(),
              [](const auto& a, const auto& b) { return a.path().filename() < b.path().filename(); });
    for (const fs::directory_entry& e : entries) {
      const std::string name = e.path().filename().string();
      if (name.empty() || name[0] == '.') continue;
      const fs::path c = canonical_or_empty(e.path());
      if (c.empty() || !inside(root, c)) continue;  // dangling, or a symlink out
      std::error_code sec;
      const fs::file_status st = fs::status(c, sec);
      if (sec) continue;
      const std::string rel = prefix + name;
      if (fs::is_directory(st)) {
        if (skip.count(c) || !seen.insert(c).second) continue;
        if (take_folder(c)) {
          out.push_back({e.path(), rel, true});
          continue;
        }
        if (is_diffusers_dir(c.string())) continue;  // a component folder (VAE, text encoder): not ours, nor its files
        dir(e.path(), rel + "/", depth + 1);
      } else if (fs::is_regular_file(st)) {
        const auto& exts = kind == Kind::Models ? kModelExts : kind == Kind::Loras ? kLoraExts : kControlExts;
        if (has_ext(name, exts)) out.push_back({e.path(), rel, false});
      }
    }
  }

  // A folder listed as one entry: a diffusers pipeline (checkpoints: the loader needs its
  // model_index.json) or a diffusers ControlNet (config.json + weights).
  bool take_folder(const fs::path& c) const {
    std::error_code ec;
    if (kind == Kind::Models) return fs::is_regular_file(c / "model_index.json", ec);
    if (kind == Kind::ControlNets) return is_diffusers_dir(c.string()) && !fs::exists(c / "model_index.json", ec);
    return false;
  }
};

std::vector<Found> scan(Kind kind, const std::string& dir, const std::vector<std::string>& skip) {
  if (dir.empty()) return {};
  Walk w{kind, canonical_or_empty(dir), {}, {}, {}};
  if (w.root.empty()) return {};
  std::error_code ec;
  if (!fs::is_directory(w.root, ec)) return {};
  for (const std::string& s : skip) {
    if (s.empty()) continue;
    fs::path c = canonical_or_empty(s);
    if (!c.empty() && c != w.root) w.skip.insert(c);
  }
  w.seen.insert(w.root);
  w.dir(fs::path(dir), "", 0);
  std::sort(w.out.begin(), w.out.end(), [](const Found& a, const Found& b) { return a.rel < b.rel; });
  return w.out;
}

std::string absolute_of(const fs::path& p) {
  std::error_code ec;
  fs::path a = fs::absolute(p, ec);
  return (ec ? p : a).lexically_normal().string();
}

// The alias forms a checkpoint answers to, strongest first (A1111's CheckpointInfo.ids), each
// form in a fixed slot ("" when the entry has none) so that lookups compare like with like.
std::vector<std::string> model_ids(const ModelInfo& m, const std::string& old) {
  const std::string stem = m.folder ? base_name(m.rel) : strip_ext(base_name(m.rel));
  const bool h = !m.hash.empty(), o = !old.empty();
  return {m.title,
          m.rel,
          m.sha256,
          m.hash,
          h ? stem + " [" + m.hash + "]" : "",
          old,
          o ? m.rel + " [" + old + "]" : "",
          o ? stem + " [" + old + "]" : "",
          m.model_name,
          base_name(m.rel),
          stem};
}

}  // namespace

ModelRegistry::ModelRegistry(std::string models_dir, std::string lora_dir, std::string extra_model,
                             std::function<std::string(const std::string&)> sha256_of, std::string controlnet_dir)
    : models_dir_(std::move(models_dir)),
      lora_dir_(std::move(lora_dir)),
      extra_model_(std::move(extra_model)),
      controlnet_dir_(std::move(controlnet_dir)),
      sha256_of_(std::move(sha256_of)) {
  if (controlnet_dir_.empty() && !models_dir_.empty())
    controlnet_dir_ = (fs::path(models_dir_) / "ControlNet").string();
  refresh_models();
  refresh_loras();
}

void ModelRegistry::refresh_models() {
  // Built without the lock (hashing may read whole files the first time), then swapped in.
  std::vector<ModelInfo> models, nets;
  std::vector<std::string> olds;
  auto full_hash = [&](const std::string& path) -> std::string {
    if (!sha256_of_) return "";
    try {
      return lower(sha256_of_(path));
    } catch (const std::exception&) {
      return "";  // unreadable now: listed without a hash
    }
  };
  auto add_model = [&](const fs::path& path, const std::string& rel, bool folder) {
    ModelInfo m;
    m.rel = rel;
    m.folder = folder;
    m.filename = absolute_of(path);
    m.model_name = model_name_of(rel, folder);
    if (!folder) {
      m.sha256 = full_hash(m.filename);
      if (m.sha256.size() >= 10 && all_hex(m.sha256)) m.hash = m.sha256.substr(0, 10);
      else m.sha256.clear();
    }
    m.title = m.hash.empty() ? rel : rel + " [" + m.hash + "]";
    models.push_back(std::move(m));
    olds.push_back(folder ? "" : old_hash(models.back().filename));
  };

  // --model first; listed by its path inside the models folder when it is there, else by its name.
  fs::path extra_canon;
  if (!extra_model_.empty()) {
    extra_canon = canonical_or_empty(extra_model_);
    std::string rel = fs::path(extra_model_).filename().string();
    if (rel.empty()) rel = fs::path(extra_model_).parent_path().filename().string();  // "dir/"
    const fs::path root = models_dir_.empty() ? fs::path() : canonical_or_empty(models_dir_);
    if (!extra_canon.empty() && !root.empty() && inside(root, extra_canon) && extra_canon != root)
      rel = extra_canon.lexically_relative(root).generic_string();
    std::error_code ec;
    add_model(extra_model_, rel, fs::is_directory(extra_model_, ec));
  }
  for (const Found& f : scan(Kind::Models, models_dir_, {controlnet_dir_, lora_dir_})) {
    if (!extra_canon.empty() && canonical_or_empty(f.path) == extra_canon) continue;  // listed first already
    add_model(f.path, f.rel, f.folder);
  }

  // ControlNets: "stem [old hash]" as the extension lists them (its names drop the subfolder).
  for (const Found& f : scan(Kind::ControlNets, controlnet_dir_, {})) {
    ModelInfo m;
    m.rel = f.rel;
    m.folder = f.folder;
    m.filename = absolute_of(f.path);
    m.model_name = f.folder ? base_name(f.rel) : strip_ext(base_name(f.rel));
    if (!f.folder) m.hash = old_hash(m.filename);
    m.title = m.hash.empty() ? m.model_name : m.model_name + " [" + m.hash + "]";
    nets.push_back(std::move(m));
  }

  std::lock_guard<std::mutex> lk(mu_);
  models_ = std::move(models);
  old_hashes_ = std::move(olds);
  controlnets_ = std::move(nets);
}

void ModelRegistry::refresh_loras() {
  std::vector<LoraInfo> loras;
  for (const Found& f : scan(Kind::Loras, lora_dir_, {})) {
    LoraInfo l;
    l.rel = f.rel;
    l.path = absolute_of(f.path);
    l.name = strip_ext(base_name(f.rel));
    if (has_ext(f.rel, {".safetensors"})) l.metadata = safetensors_metadata(l.path);
    auto it = l.metadata.find("ss_output_name");
    const bool named = it != l.metadata.end() && it->is_string() && !it->get<std::string>().empty();
    l.alias = named ? it->get<std::string>() : l.name;
    loras.push_back(std::move(l));
  }
  std::lock_guard<std::mutex> lk(mu_);
  loras_ = std::move(loras);
}

std::vector<ModelInfo> ModelRegistry::models() const {
  std::lock_guard<std::mutex> lk(mu_);
  return models_;
}

std::vector<LoraInfo> ModelRegistry::loras() const {
  std::lock_guard<std::mutex> lk(mu_);
  return loras_;
}

std::vector<ModelInfo> ModelRegistry::controlnets() const {
  std::lock_guard<std::mutex> lk(mu_);
  return controlnets_;
}

std::optional<ModelInfo> ModelRegistry::find_model(const std::string& alias, const std::string& field) const {
  const std::string bare = strip_bracket(alias);
  check_name(alias, models_dir_, {alias, bare}, field, "checkpoint");
  if (alias.empty()) return std::nullopt;
  std::string a = alias;
  std::replace(a.begin(), a.end(), '\\', '/');  // Windows clients' titles
  if (all_hex(a)) a = lower(a);
  std::string b = strip_bracket(a);
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<std::vector<std::string>> ids;
  for (size_t i = 0; i < models_.size(); ++i) ids.push_back(model_ids(models_[i], old_hashes_[i]));
  // The strongest alias form across all entries first, so one file's stem cannot shadow another's title.
  for (const std::string& want : {a, b}) {
    if (want.empty()) continue;
    for (size_t k = 0; k < (ids.empty() ? 0 : ids[0].size()); ++k)
      for (size_t i = 0; i < models_.size(); ++i)
        if (!ids[i][k].empty() && ids[i][k] == want) return models_[i];
  }
  return std::nullopt;
}

std::optional<LoraInfo> ModelRegistry::find_lora(const std::string& name) const {
  std::vector<std::string> tries = {name};
  for (const std::string& e : kLoraExts) tries.push_back(name + e);
  check_name(name, lora_dir_, tries, "<lora:" + safe(name) + ">", "LoRA");
  if (name.empty()) return std::nullopt;
  std::string n = name;
  std::replace(n.begin(), n.end(), '\\', '/');
  std::lock_guard<std::mutex> lk(mu_);
  // A1111: the file stem, then (here) the path under the folder with or without its
  // extension, then the ss_output_name alias.
  for (int k = 0; k < 4; ++k)
    for (const LoraInfo& l : loras_) {
      const bool hit = k == 0 ? l.name == n : k == 1 ? l.rel == n : k == 2 ? strip_ext(l.rel) == n : l.alias == n;
      if (hit) return l;
    }
  return std::nullopt;
}

std::optional<ModelInfo> ModelRegistry::find_controlnet(const std::string& name, const std::string& field) const {
  const std::string bare = strip_bracket(name);
  check_name(name, controlnet_dir_, {name, bare}, field, "ControlNet");
  if (name.empty()) return std::nullopt;
  std::string n = name;
  std::replace(n.begin(), n.end(), '\\', '/');
  const std::string b = strip_bracket(n);
  std::lock_guard<std::mutex> lk(mu_);
  // The listed title, then the path under the folder, then (without the hash, as the extension
  // matches it) the stem, case-insensitively.
  for (const ModelInfo& m : controlnets_)
    if (m.title == n || m.rel == n || m.rel == b || strip_ext(m.rel) == b) return m;
  for (const ModelInfo& m : controlnets_)
    if (lower(m.model_name) == lower(b) || lower(base_name(m.rel)) == lower(b)) return m;
  return std::nullopt;
}

}  // namespace diffuse::server
