// A1111's model hashes, computed once per file: the full sha256 of a checkpoint (A1111's
// "Model hash" shows its first 10 digits) is kept in `<cache dir>/hashes.json`, keyed by the
// file's absolute path, size and modification time, as A1111 keeps its cache.json. A changed file
// (size or time) is hashed again. LoRA hashes (A1111's "addnet" hash, models/lora.h) are kept in
// the same file. An unwritable cache folder only costs re-hashing.
#pragma once
#include <functional>
#include <mutex>
#include <string>

namespace diffuse::api {

class HashCache {
 public:
  explicit HashCache(std::string dir);  // "" keeps hashes in memory only
  // The full hex sha256 of `path`; `on_compute` is called before a file is actually read.
  std::string sha256(const std::string& path, const std::function<void()>& on_compute = {});
  // The LoRA file's A1111 hash (lora_hash()), cached the same way.
  std::string lora_hash(const std::string& path);
  const std::string& file() const { return file_; }

 private:
  std::string lookup_or_compute(const std::string& kind, const std::string& path,
                                const std::function<std::string()>& compute, const std::function<void()>& on_compute);
  std::string dir_, file_;
  std::mutex mu_;
};

}  // namespace diffuse::api
