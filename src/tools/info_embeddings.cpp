// `diffuse info` for textual inversions: an embedding file, or a folder of them (what
// --embeddings-dir would offer: name, vectors, which model family they are for, A1111's hash).
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/sha256.h"
#include "io/tensor_file.h"
#include "models/embedding.h"
#include "tools/info_embeddings.h"

namespace fs = std::filesystem;

namespace diffuse::tools {

namespace {

nlohmann::json embedding_json(const Embedding& e) {
  nlohmann::json j = {{"name", e.name}, {"file", e.path}, {"vectors", e.vectors()},
                      {"describe", e.describe()}, {"hash", sha256_file(e.path).substr(0, 12)}};
  j["width"] = e.sdxl() ? nlohmann::json{{"clip_l", e.vec[0].dim(1)}, {"clip_g", e.vec[1].dim(1)}}
                        : nlohmann::json(e.vec[0].dim(1));
  return j;
}

}  // namespace

bool is_embedding_file(const std::string& path) {
  try {
    load_embedding(path);
    return true;
  } catch (const Error&) {
    return false;
  }
}

bool is_embeddings_dir(const std::string& path) {
  std::error_code ec;
  // A folder holding embedding-sized .pt/.bin/.safetensors files (an empty one is no model either:
  // `info` says so as it does for any other folder).
  return fs::is_directory(path, ec) && !is_diffusers_dir(path) && !EmbeddingSet::from_dir(path)->empty();
}

int embedding_file_info(const std::string& path, bool json) {
  const Embedding e = load_embedding(path);
  if (json) {
    nlohmann::json j = embedding_json(e);
    j["kind"] = "embedding";
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%s: textual-inversion embedding '%s', %s, hash %s\n", path.c_str(), e.name.c_str(),
              e.describe().c_str(), sha256_file(path).substr(0, 12).c_str());
  return 0;
}

int embeddings_dir_info(const std::string& dir, bool json) {
  std::shared_ptr<EmbeddingSet> set = EmbeddingSet::from_dir(dir);
  nlohmann::json list = nlohmann::json::array();
  std::vector<std::string> lines;
  for (const std::string& name : set->names()) {
    const Embedding* e = set->find(name);
    if (!e) continue;
    list.push_back(embedding_json(*e));
    lines.push_back(cat("  ", name, ": ", e->describe(), ", hash ", sha256_file(e->path).substr(0, 12), "  (",
                        e->path, ")"));
  }
  const std::vector<std::string> skipped = set->take_warnings();
  if (json) {
    std::printf("%s\n", nlohmann::json{{"folder", dir}, {"kind", "embeddings"}, {"embeddings", list},
                                       {"skipped", skipped}}
                            .dump(2)
                            .c_str());
    return 0;
  }
  std::printf("%s: %zu textual-inversion embedding%s (use them by name in prompts, --embeddings-dir %s)\n",
              dir.c_str(), lines.size(), lines.size() == 1 ? "" : "s", dir.c_str());
  for (const std::string& l : lines) std::printf("%s\n", l.c_str());
  for (const std::string& s : skipped) std::printf("  skipped: %s\n", s.c_str());
  return 0;
}

}  // namespace diffuse::tools
