// Read-only ZIP archive reader over a memory buffer (normally a MappedFile), as used by PyTorch
// checkpoints (torch.save since 1.6). Supports the end-of-central-directory record, ZIP64
// records and extra fields, STORED entries (returned as a view into the buffer, no copy) and
// DEFLATE entries (inflated with zlib under a hard size cap).
//
// Every offset and size is validated against the buffer before use; errors are diffuse::Error
// with one line that starts with the archive path. Zip-bomb defence: an entry is inflated only
// if its declared size is below the caller's cap and within deflate's maximum ratio of its
// compressed size, and inflation stops as soon as output would exceed the declared size.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace diffuse {

struct ZipEntry {
  std::string name;
  uint16_t method = 0;       // 0 = STORED, 8 = DEFLATE
  uint16_t flags = 0;
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t uncompressed_size = 0;
  uint64_t local_header_offset = 0;
  uint64_t data_offset = 0;  // start of the entry's (compressed) bytes, validated
};

class ZipReader {
 public:
  // Hard limits on what an archive may declare.
  static constexpr size_t kMaxEntries = 1u << 20;
  static constexpr size_t kMaxNameLength = 4096;

  // Parses the central directory and every local header; `data` must outlive the reader.
  ZipReader(const uint8_t* data, size_t size, std::string path);

  const std::string& path() const { return path_; }
  const std::vector<ZipEntry>& entries() const { return entries_; }
  const ZipEntry* find(std::string_view name) const;  // nullptr if absent

  // Pointer to the bytes of a STORED entry inside the buffer (size = uncompressed_size).
  // Throws if the entry is compressed.
  const uint8_t* stored_data(const ZipEntry& e) const;

  // A copy of the entry's bytes (STORED or DEFLATE); throws if its declared size exceeds
  // `max_bytes`, if inflation yields more or fewer bytes than declared, or if `check_crc` and
  // the CRC-32 differs.
  std::vector<uint8_t> read(const ZipEntry& e, uint64_t max_bytes, bool check_crc = true) const;

  // Throws unless the entry may be read under `max_bytes`: its declared size is within the cap
  // and, if compressed, within what deflate can produce from its compressed size. Call before
  // allocating a buffer for inflate_into.
  void check_declared_size(const ZipEntry& e, uint64_t max_bytes) const;

  // Inflates a DEFLATE entry into `out` (exactly e.uncompressed_size bytes, caller-allocated).
  void inflate_into(const ZipEntry& e, uint8_t* out, bool check_crc) const;

 private:
  void parse();
  const uint8_t* data_;
  size_t size_;
  std::string path_;
  std::vector<ZipEntry> entries_;
  std::unordered_map<std::string, size_t> by_name_;
};

// True if the buffer looks like a zip archive (local-file or empty-archive signature first).
bool is_zip(const uint8_t* data, size_t size);

// For libFuzzer harnesses: parses a zip buffer, reads every entry under a small cap and then
// runs the checkpoint loader over it (parse_ckpt); diffuse::Error is swallowed, anything else
// (a crash, a sanitizer report, a different exception) is a bug.
void fuzz_zip(const uint8_t* data, size_t size);

}  // namespace diffuse
