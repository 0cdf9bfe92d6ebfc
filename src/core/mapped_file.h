// Read-only memory-mapped file. Tensors borrow from it and keep it alive via shared_ptr.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace diffuse {

class MappedFile {
 public:
  // Throws diffuse::Error naming the path if it cannot be opened or mapped.
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace diffuse
