#include "io/zip.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "core/error.h"
#include "io/tensor_file.h"

namespace diffuse {

namespace {

constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr size_t kEocdSize = 22;
constexpr size_t kZip64LocatorSize = 20;
constexpr size_t kZip64EocdSize = 56;
constexpr size_t kCentralSize = 46;
constexpr size_t kLocalSize = 30;
// Deflate cannot compress better than about 1032:1; a larger declared ratio is a lie.
constexpr uint64_t kMaxDeflateRatio = 1032;

uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
uint32_t rd32(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24); }
uint64_t rd64(const uint8_t* p) { return uint64_t(rd32(p)) | (uint64_t(rd32(p + 4)) << 32); }

// A printable, bounded rendering of an entry name for error messages (keeps errors one line).
std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 200)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (s.size() > 200) out += "...";
  return out;
}

// True if [off, off+len) lies inside a buffer of `size` bytes (overflow-safe).
bool in_bounds(uint64_t off, uint64_t len, uint64_t size) { return off <= size && len <= size - off; }

}  // namespace

bool is_zip(const uint8_t* data, size_t size) {
  if (size < 4) return false;
  uint32_t sig = rd32(data);
  return sig == kLocalSig || sig == kEocdSig;
}

ZipReader::ZipReader(const uint8_t* data, size_t size, std::string path)
    : data_(data), size_(size), path_(std::move(path)) {
  parse();
}

void ZipReader::parse() {
  const std::string& P = path_;
  DF_CHECK(size_ >= kEocdSize, P, ": not a zip archive: file is only ", size_, " bytes");
  // End of central directory: the last record whose comment reaches exactly to the end, or
  // failing that the last one whose comment fits.
  size_t lowest = size_ - kEocdSize > 0xffff ? size_ - kEocdSize - 0xffff : 0;
  size_t eocd = SIZE_MAX, loose = SIZE_MAX;
  for (size_t pos = size_ - kEocdSize + 1; pos-- > lowest;) {
    if (rd32(data_ + pos) != kEocdSig) continue;
    size_t comment = rd16(data_ + pos + 20);
    if (pos + kEocdSize + comment == size_) {
      eocd = pos;
      break;
    }
    if (loose == SIZE_MAX && pos + kEocdSize + comment <= size_) loose = pos;
  }
  if (eocd == SIZE_MAX) eocd = loose;
  DF_CHECK(eocd != SIZE_MAX, P, ": not a zip archive or truncated: no end-of-central-directory record");
  const uint8_t* e = data_ + eocd;
  uint64_t disk = rd16(e + 4), cd_disk = rd16(e + 6);
  uint64_t count_disk = rd16(e + 8), count = rd16(e + 10);
  uint64_t cd_size = rd32(e + 12), cd_off = rd32(e + 16);

  // ZIP64: a locator right before the EOCD points at the 64-bit record.
  if (eocd >= kZip64LocatorSize && rd32(data_ + eocd - kZip64LocatorSize) == kZip64LocatorSig) {
    const uint8_t* loc = data_ + eocd - kZip64LocatorSize;
    uint64_t off = rd64(loc + 8);
    DF_CHECK(in_bounds(off, kZip64EocdSize, eocd - kZip64LocatorSize), P,
             ": bad zip: ZIP64 end-of-central-directory offset ", off, " is outside the file");
    const uint8_t* z = data_ + off;
    DF_CHECK(rd32(z) == kZip64EocdSig, P, ": bad zip: no ZIP64 end-of-central-directory record at offset ", off);
    disk = rd32(z + 16);
    cd_disk = rd32(z + 20);
    count_disk = rd64(z + 24);
    count = rd64(z + 32);
    cd_size = rd64(z + 40);
    cd_off = rd64(z + 48);
  } else {
    DF_CHECK(count != 0xffff && cd_size != 0xffffffffu && cd_off != 0xffffffffu, P,
             ": bad zip: ZIP64 sizes announced but no ZIP64 end-of-central-directory locator");
  }
  DF_CHECK(disk == 0 && cd_disk == 0 && count_disk == count, P, ": multi-disk zip archives are not supported");
  DF_CHECK(count <= kMaxEntries, P, ": bad zip: ", count, " entries exceeds the limit of ", kMaxEntries);
  DF_CHECK(in_bounds(cd_off, cd_size, size_), P, ": bad zip: central directory (offset ", cd_off, ", ", cd_size,
           " bytes) extends past the end of the ", size_, "-byte file");
  DF_CHECK(count * kCentralSize <= cd_size, P, ": bad zip: central directory of ", cd_size,
           " bytes cannot hold ", count, " entries");

  entries_.reserve(count);
  uint64_t pos = cd_off, end = cd_off + cd_size;
  for (uint64_t i = 0; i < count; ++i) {
    DF_CHECK(in_bounds(pos, kCentralSize, end), P, ": bad zip: central directory entry ", i, " is truncated");
    const uint8_t* c = data_ + pos;
    DF_CHECK(rd32(c) == kCentralSig, P, ": bad zip: bad signature for central directory entry ", i, " at offset ", pos);
    ZipEntry en;
    en.flags = rd16(c + 8);
    en.method = rd16(c + 10);
    en.crc32 = rd32(c + 16);
    en.compressed_size = rd32(c + 20);
    en.uncompressed_size = rd32(c + 24);
    size_t name_len = rd16(c + 28), extra_len = rd16(c + 30), comment_len = rd16(c + 32);
    uint32_t start_disk = rd16(c + 34);
    en.local_header_offset = rd32(c + 42);
    uint64_t rec = kCentralSize + name_len + extra_len + comment_len;
    DF_CHECK(in_bounds(pos, rec, end), P, ": bad zip: central directory entry ", i, " is truncated");
    DF_CHECK(name_len <= kMaxNameLength, P, ": bad zip: entry ", i, " name is ", name_len, " bytes");
    en.name.assign(reinterpret_cast<const char*>(c + kCentralSize), name_len);
    // ZIP64 extended information: 64-bit values for the fields that hold all-ones.
    const uint8_t* x = c + kCentralSize + name_len;
    const uint8_t* xend = x + extra_len;
    while (xend - x >= 4) {
      uint16_t id = rd16(x), len = rd16(x + 2);
      DF_CHECK(xend - (x + 4) >= len, P, ": bad zip: entry ", printable(en.name), " has a truncated extra field");
      if (id == 0x0001) {
        const uint8_t* v = x + 4;
        const uint8_t* vend = v + len;
        auto take = [&](uint64_t& field) {
          DF_CHECK(vend - v >= 8, P, ": bad zip: entry ", printable(en.name), " has a short ZIP64 extra field");
          field = rd64(v);
          v += 8;
        };
        if (en.uncompressed_size == 0xffffffffu) take(en.uncompressed_size);
        if (en.compressed_size == 0xffffffffu) take(en.compressed_size);
        if (en.local_header_offset == 0xffffffffu) take(en.local_header_offset);
        if (start_disk == 0xffff && vend - v >= 4) start_disk = rd32(v);
      }
      x += 4 + len;
    }
    DF_CHECK(start_disk == 0, P, ": multi-disk zip archives are not supported");
    DF_CHECK(!(en.flags & 1), P, ": entry ", printable(en.name), " is encrypted");
    // Local header: its own name/extra lengths decide where the data starts.
    DF_CHECK(in_bounds(en.local_header_offset, kLocalSize, size_), P, ": bad zip: entry ", printable(en.name),
             " local header offset ", en.local_header_offset, " is past the end of the file");
    const uint8_t* l = data_ + en.local_header_offset;
    DF_CHECK(rd32(l) == kLocalSig, P, ": bad zip: entry ", printable(en.name), " has no local header at offset ",
             en.local_header_offset);
    en.data_offset = en.local_header_offset + kLocalSize + rd16(l + 26) + rd16(l + 28);
    DF_CHECK(in_bounds(en.data_offset, en.compressed_size, size_), P, ": bad zip: entry ", printable(en.name),
             " data (", en.compressed_size, " bytes at offset ", en.data_offset, ") extends past the end of the ",
             size_, "-byte file");
    if (en.method == 0)
      DF_CHECK(en.compressed_size == en.uncompressed_size, P, ": bad zip: stored entry ", printable(en.name),
               " has compressed size ", en.compressed_size, " but uncompressed size ", en.uncompressed_size);
    by_name_.emplace(en.name, entries_.size());
    entries_.push_back(std::move(en));
    pos += rec;
  }
}

const ZipEntry* ZipReader::find(std::string_view name) const {
  auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &entries_[it->second];
}

const uint8_t* ZipReader::stored_data(const ZipEntry& e) const {
  DF_CHECK(e.method == 0, path_, ": zip entry ", printable(e.name), " is compressed (method ", e.method,
           "), expected stored");
  return data_ + e.data_offset;
}

void ZipReader::inflate_into(const ZipEntry& e, uint8_t* out, bool check_crc) const {
  const std::string& P = path_;
  std::string name = printable(e.name);
  DF_CHECK(e.method == 8, P, ": zip entry ", name, " is not deflate-compressed");
  check_declared_size(e, UINT64_MAX);
  z_stream zs;
  std::memset(&zs, 0, sizeof zs);
  DF_CHECK(inflateInit2(&zs, -MAX_WBITS) == Z_OK, P, ": zlib inflateInit failed");
  std::unique_ptr<z_stream, void (*)(z_stream*)> guard(&zs, [](z_stream* s) { inflateEnd(s); });
  const uint8_t* in = data_ + e.data_offset;
  uint64_t in_left = e.compressed_size, out_left = e.uncompressed_size;
  constexpr uint64_t kChunk = 1u << 30;
  uint8_t sink[1];
  bool in_sink = false;
  for (;;) {
    if (zs.avail_in == 0 && in_left > 0) {
      uint64_t n = std::min(in_left, kChunk);
      zs.next_in = const_cast<Bytef*>(in);
      zs.avail_in = uInt(n);
      in += n;
      in_left -= n;
    }
    if (zs.avail_out == 0) {
      if (in_sink) fail(P, ": zip entry ", name, " inflates beyond its declared size of ", e.uncompressed_size,
                        " bytes (zip bomb?)");
      if (out_left > 0) {
        uint64_t n = std::min(out_left, kChunk);
        zs.next_out = out;
        zs.avail_out = uInt(n);
        out += n;
        out_left -= n;
      } else {
        zs.next_out = sink;
        zs.avail_out = 1;
        in_sink = true;
      }
    }
    int ret = inflate(&zs, Z_NO_FLUSH);
    if (ret == Z_STREAM_END) break;
    if (ret == Z_BUF_ERROR && zs.avail_in == 0 && in_left == 0)
      fail(P, ": zip entry ", name, " compressed data is truncated");
    DF_CHECK(ret == Z_OK, P, ": zip entry ", name, " has corrupt deflate data",
             zs.msg ? cat(" (", zs.msg, ")") : std::string());
    if (in_sink && zs.avail_out == 0)
      fail(P, ": zip entry ", name, " inflates beyond its declared size of ", e.uncompressed_size,
           " bytes (zip bomb?)");
  }
  DF_CHECK(!(in_sink && zs.avail_out == 0), P, ": zip entry ", name, " inflates beyond its declared size of ",
           e.uncompressed_size, " bytes (zip bomb?)");
  DF_CHECK(out_left == 0 && (in_sink || zs.avail_out == 0), P, ": zip entry ", name,
           " inflates to fewer bytes than its declared size of ", e.uncompressed_size);
  if (check_crc) {
    uLong crc = crc32_z(0, out - e.uncompressed_size, e.uncompressed_size);
    DF_CHECK(crc == e.crc32, P, ": zip entry ", name, " fails its CRC-32 check");
  }
}

void ZipReader::check_declared_size(const ZipEntry& e, uint64_t max_bytes) const {
  std::string name = printable(e.name);
  DF_CHECK(e.uncompressed_size <= max_bytes, path_, ": zip entry ", name, " declares ", e.uncompressed_size,
           " bytes, more than the limit of ", max_bytes, " bytes for it");
  if (e.method == 0) return;
  DF_CHECK(e.method == 8, path_, ": zip entry ", name, " uses unsupported compression method ", e.method);
  DF_CHECK(e.uncompressed_size <= e.compressed_size * kMaxDeflateRatio + 1024, path_, ": zip entry ", name,
           " declares ", e.uncompressed_size, " bytes from ", e.compressed_size,
           " compressed bytes, beyond what deflate can produce (zip bomb?)");
}

std::vector<uint8_t> ZipReader::read(const ZipEntry& e, uint64_t max_bytes, bool check_crc) const {
  check_declared_size(e, max_bytes);
  std::vector<uint8_t> out(e.uncompressed_size);
  if (e.method == 0) {
    if (!out.empty()) std::memcpy(out.data(), data_ + e.data_offset, out.size());
    if (check_crc)
      DF_CHECK(crc32_z(0, out.data(), out.size()) == e.crc32, path_, ": zip entry ", printable(e.name),
               " fails its CRC-32 check");
    return out;
  }
  inflate_into(e, out.data(), check_crc);
  return out;
}

void fuzz_zip(const uint8_t* data, size_t size) {
  try {
    ZipReader z(data, size, "<fuzz>");
    for (const ZipEntry& e : z.entries()) {
      try {
        z.read(e, 64u << 10);
      } catch (const Error&) {
      }
    }
  } catch (const Error&) {
  }
  try {
    parse_ckpt(data, size, "<fuzz>", nullptr);
  } catch (const Error&) {
  }
}

}  // namespace diffuse
