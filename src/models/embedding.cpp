// Textual-inversion embedding files and the set a run uses (see embedding.h).
#include "models/embedding.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "io/tensor_file.h"

namespace fs = std::filesystem;

namespace diffuse {

namespace {

constexpr int kMaxVectors = 75;  // a chunk's content tokens: A1111 cannot place more
constexpr uintmax_t kMaxFileBytes = 64ull << 20;

const char* width_family(int64_t w) {
  return w == 768 ? " (SD 1.x)" : w == 1024 ? " (SD 2.x)" : "";
}

// [W] or [n, W] of any float type -> owned f32 [n, W], checked.
Tensor as_vectors(const std::string& path, const std::string& name, const Tensor& t) {
  DF_CHECK(t.rank() == 1 || t.rank() == 2, path, ": embedding tensor ", name, " is ", t.str(),
           ", expected [n, width] or [width]");
  DF_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::F16 || t.dtype() == DType::BF16, path,
           ": embedding tensor ", name, " is ", t.str(), ", expected a float type");
  Tensor v = t.to(DType::F32);
  if (v.rank() == 1) v = v.reshape({1, v.dim(0)});
  DF_CHECK(v.dim(0) >= 1 && v.dim(0) <= kMaxVectors && v.dim(1) >= 1, path, ": embedding tensor ", name, " is ",
           t.str(), ": expected 1 to ", kMaxVectors, " vectors (one 75-token chunk)");
  const float* d = v.f32();
  for (int64_t i = 0; i < v.numel(); ++i)
    DF_CHECK(std::isfinite(d[i]), path, ": embedding tensor ", name, " has a non-finite value at element ", i);
  return v;
}

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool embedding_extension(const fs::path& p) {
  const std::string e = lower(p.extension().string());
  return e == ".pt" || e == ".bin" || e == ".safetensors";
}

}  // namespace

const Tensor& Embedding::for_encoder(Family family, int e, int64_t width) const {
  if (family == Family::SDXL) {
    DF_CHECK(sdxl(), path, ": a one-encoder embedding of width ", vec[0].dim(1), width_family(vec[0].dim(1)),
             "; an SDXL model needs clip_l [n, 768] and clip_g [n, 1280]");
  } else {
    DF_CHECK(!sdxl(), path, ": an SDXL embedding (clip_l + clip_g); this ", family_name(family),
             " model's text encoder needs one tensor [n, ", width, "]");
  }
  const Tensor& v = vec[e];
  DF_CHECK(v.dim(1) == width, path, ": embedding vectors of width ", v.dim(1), width_family(v.dim(1)), "; this ",
           family_name(family), " model's text encoder", e == 1 ? " 2" : "", " needs [n, ", width, "]");
  return v;
}

std::string Embedding::describe() const {
  if (sdxl())
    return cat("SDXL (clip_l ", vec[0].dim(1), " + clip_g ", vec[1].dim(1), "), ", vectors(), " vector",
               vectors() == 1 ? "" : "s");
  const int64_t w = vec[0].dim(1);
  return cat(w == 768 ? "SD 1.x" : w == 1024 ? "SD 2.x" : "unknown model", " (", w, "), ", vectors(), " vector",
             vectors() == 1 ? "" : "s");
}

Embedding load_embedding(const std::string& path) {
  std::error_code ec;
  DF_CHECK(fs::is_regular_file(path, ec), path, ": no such embedding file");
  DF_CHECK(fs::file_size(path, ec) <= kMaxFileBytes, path, ": ", fs::file_size(path, ec) >> 20,
           " MB is too large for a textual-inversion embedding (a model?)");
  const TensorFile f = open_model_file(path);
  Embedding e;
  e.path = path;
  e.name = fs::path(path).stem().string();
  std::vector<const TensorEntry*> params;
  for (const TensorEntry& t : f.tensors)
    if (t.name.rfind("string_to_param.", 0) == 0) params.push_back(&t);
  const Tensor* l = f.find("clip_l");
  const Tensor* g = f.find("clip_g");
  if (!params.empty()) {  // A1111 / original textual inversion
    DF_CHECK(params.size() == 1, path, ": string_to_param holds ", params.size(),
             " tensors; an embedding file has one");
    e.vec[0] = as_vectors(path, params[0]->name, params[0]->tensor);
  } else if (l || g) {  // SDXL
    DF_CHECK(l && g, path, ": an SDXL embedding needs both clip_l and clip_g, the file has only ",
             l ? "clip_l" : "clip_g");
    e.vec[0] = as_vectors(path, "clip_l", *l);
    e.vec[1] = as_vectors(path, "clip_g", *g);
    DF_CHECK(e.vec[0].dim(0) == e.vec[1].dim(0), path, ": clip_l has ", e.vec[0].dim(0), " vectors, clip_g ",
             e.vec[1].dim(0), "; they must match");
  } else {  // one tensor: A1111 .safetensors (emb_params) or a diffusers learned_embeds file
    DF_CHECK(f.tensors.size() == 1, path, ": not a textual-inversion embedding: ", f.tensors.size(),
             " tensors", f.tensors.empty() ? "" : " (first: " + f.tensors[0].name + ")",
             "; expected string_to_param, clip_l + clip_g, or a single tensor [n, width]");
    e.vec[0] = as_vectors(path, f.tensors[0].name, f.tensors[0].tensor);
  }
  return e;
}

// ---------------------------------------------------------------------------------------------

std::shared_ptr<EmbeddingSet> EmbeddingSet::from_dir(const std::string& dir) {
  auto set = std::make_shared<EmbeddingSet>();
  set->dir_ = dir;
  std::error_code ec;
  if (dir.empty() || !fs::is_directory(dir, ec)) return set;
  std::vector<fs::path> files;
  for (auto it = fs::recursive_directory_iterator(dir, fs::directory_options::skip_permission_denied, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    std::error_code e2;
    if (it.depth() > 4) it.disable_recursion_pending();
    if (!it->is_regular_file(e2) || !embedding_extension(it->path())) continue;
    if (it->file_size(e2) > kMaxFileBytes) continue;
    files.push_back(it->path());
  }
  std::sort(files.begin(), files.end());
  for (const fs::path& p : files) set->add_file(p.stem().string(), p.string(), nullptr);
  return set;
}

void EmbeddingSet::add(Embedding e) {
  const std::string name = e.name, path = e.path;
  add_file(name, path, std::make_unique<Embedding>(std::move(e)));
}

void EmbeddingSet::add_file(const std::string& name, const std::string& path, std::unique_ptr<Embedding> e) {
  std::lock_guard<std::mutex> lk(mu_);
  if (name.empty() || by_name_.count(name)) return;
  auto f = std::make_unique<File>();
  f->name = name;
  f->path = path;
  const ClipTokenizer& tok = ClipTokenizer::builtin();
  f->ids[0] = tok.tokenize(name, false);
  f->ids[1] = tok.tokenize(name, true);
  if (f->ids[0].empty()) return;  // a name of nothing but spaces cannot be matched
  f->loaded = std::move(e);
  by_name_[name] = files_.size();
  files_.push_back(std::move(f));
}

std::vector<std::string> EmbeddingSet::names() const {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<std::string> out;
  for (const auto& f : files_) out.push_back(f->name);
  return out;
}

const Embedding* EmbeddingSet::get(const File& f) const {
  std::lock_guard<std::mutex> lk(mu_);
  if (!f.loaded && !f.failed) {
    try {
      f.loaded = std::make_unique<Embedding>(load_embedding(f.path));
    } catch (const Error& e) {
      f.failed = true;
      warnings_.push_back(std::string(e.what()) + " (its name is left as text)");
    }
  }
  return f.loaded.get();
}

const Embedding* EmbeddingSet::find(const std::string& name) const {
  const File* f = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = by_name_.find(name);
    if (it != by_name_.end()) f = files_[it->second].get();
  }
  return f ? get(*f) : nullptr;
}

std::vector<std::string> EmbeddingSet::take_warnings() const {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<std::string> w;
  w.swap(warnings_);
  return w;
}

std::pair<const Embedding*, int> EmbeddingSet::match(const std::vector<int>& tokens, size_t pos,
                                                     bool bang_is_pad) const {
  std::vector<const File*> candidates;  // names that start here, longest first
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& f : files_) {
      const std::vector<int>& ids = f->ids[bang_is_pad ? 1 : 0];
      if (f->failed || pos + ids.size() > tokens.size()) continue;
      if (std::equal(ids.begin(), ids.end(), tokens.begin() + long(pos))) candidates.push_back(f.get());
    }
  }
  std::stable_sort(candidates.begin(), candidates.end(), [&](const File* a, const File* b) {
    return a->ids[bang_is_pad ? 1 : 0].size() > b->ids[bang_is_pad ? 1 : 0].size();
  });
  for (const File* f : candidates)
    if (const Embedding* e = get(*f)) return {e, int(f->ids[bang_is_pad ? 1 : 0].size())};
  return {nullptr, 0};
}

std::string EmbeddingSet::rewrite_prefixed(const std::string& prompt, std::vector<std::string>* unknown) const {
  static const std::string kPrefix = "embedding:";
  std::string out;
  size_t i = 0;
  while (i < prompt.size()) {
    const size_t at = prompt.find(kPrefix, i);
    if (at == std::string::npos) break;
    size_t end = at + kPrefix.size();
    while (end < prompt.size() && !std::isspace(static_cast<unsigned char>(prompt[end])) &&
           std::string_view(",()[]:<>|").find(prompt[end]) == std::string_view::npos)
      ++end;
    std::string name = prompt.substr(at + kPrefix.size(), end - at - kPrefix.size());
    if (embedding_extension(fs::path(name))) name = fs::path(name).stem().string();
    bool known;
    {
      std::lock_guard<std::mutex> lk(mu_);
      known = !name.empty() && by_name_.count(name);
    }
    out += prompt.substr(i, at - i);
    if (known) {
      out += name;
    } else {
      out += prompt.substr(at, end - at);
      if (unknown && !name.empty()) unknown->push_back(name);
    }
    i = end;
  }
  out += prompt.substr(std::min(i, prompt.size()));
  return out;
}

std::vector<const Embedding*> EmbeddingSet::used_in(const std::string& prompt) const {
  std::vector<const Embedding*> out;
  if (empty()) return out;
  const std::vector<int> tokens = ClipTokenizer::builtin().tokenize(prompt, false);
  for (size_t pos = 0; pos < tokens.size();) {
    auto [e, n] = match(tokens, pos, false);
    if (!e) {
      ++pos;
      continue;
    }
    if (std::find(out.begin(), out.end(), e) == out.end()) out.push_back(e);
    pos += size_t(n);
  }
  return out;
}

}  // namespace diffuse
