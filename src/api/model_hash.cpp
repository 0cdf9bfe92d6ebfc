#include "api/model_hash.h"

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/sha256.h"
#include "io/output_file.h"
#include "models/lora.h"

namespace diffuse::api {

namespace fs = std::filesystem;

HashCache::HashCache(std::string dir) : dir_(std::move(dir)) {
  if (!dir_.empty()) file_ = (fs::path(dir_) / "hashes.json").string();
}

namespace {

nlohmann::json read_cache(const std::string& file) {
  if (file.empty()) return nlohmann::json::object();
  std::ifstream f(file);
  if (!f) return nlohmann::json::object();
  nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  return j.is_object() ? j : nlohmann::json::object();
}

}  // namespace

std::string HashCache::lookup_or_compute(const std::string& kind, const std::string& path,
                                         const std::function<std::string()>& compute,
                                         const std::function<void()>& on_compute) {
  struct stat st {};
  DF_CHECK(::stat(path.c_str(), &st) == 0, path, ": cannot read it to hash it");
  std::error_code ec;
  const std::string key = kind + ":" + fs::absolute(path, ec).lexically_normal().string();
  const int64_t size = int64_t(st.st_size);
  const int64_t mtime = int64_t(st.st_mtim.tv_sec) * 1000000000 + int64_t(st.st_mtim.tv_nsec);
  {
    std::lock_guard<std::mutex> lk(mu_);
    nlohmann::json j = read_cache(file_);
    if (j.contains("files") && j["files"].is_object() && j["files"].contains(key)) {
      const nlohmann::json& e = j["files"][key];
      if (e.is_object() && e.value("size", int64_t(-1)) == size && e.value("mtime_ns", int64_t(-1)) == mtime &&
          e.contains("sha256") && e["sha256"].is_string())
        return e["sha256"].get<std::string>();
    }
  }
  if (on_compute) on_compute();
  const std::string h = compute();  // outside the lock: other files' lookups go on
  std::lock_guard<std::mutex> lk(mu_);
  if (file_.empty() || h.empty()) return h;
  try {
    fs::create_directories(dir_, ec);
    nlohmann::json j = read_cache(file_);  // again: another process may have added entries
    if (!j.contains("files") || !j["files"].is_object()) j["files"] = nlohmann::json::object();
    j["version"] = 1;
    j["files"][key] = {{"size", size}, {"mtime_ns", mtime}, {"sha256", h}};
    const std::string text = j.dump(1);
    write_file_safely(file_, text.data(), text.size());
  } catch (const std::exception&) {
    // An unwritable cache only means hashing again next time.
  }
  return h;
}

std::string HashCache::sha256(const std::string& path, const std::function<void()>& on_compute) {
  return lookup_or_compute("checkpoint", path, [&] { return sha256_file(path); }, on_compute);
}

std::string HashCache::lora_hash(const std::string& path) {
  return lookup_or_compute("lora", path, [&] { return diffuse::lora_hash(path); }, {});
}

}  // namespace diffuse::api
