// Hostile and broken inputs through the CLI: each must give exit code 1 and ONE line on stderr
// naming the file and the problem; never a crash (signal), hang or huge allocation. These run in
// the sanitizer build too.
#include <sys/stat.h>
#include <zlib.h>

#include <cstring>
#include <string>

#include "cli_util.h"

using namespace clitest;

namespace {

std::string le32(uint32_t v) { return std::string{char(v), char(v >> 8), char(v >> 16), char(v >> 24)}; }
std::string le16(uint16_t v) { return std::string{char(v), char(v >> 8)}; }
std::string le64(uint64_t v) { return le32(uint32_t(v)) + le32(uint32_t(v >> 32)); }
std::string be32(uint32_t v) { return std::string{char(v >> 24), char(v >> 16), char(v >> 8), char(v)}; }

std::string safetensors(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// A zip archive of (name, bytes, method, declared uncompressed size) entries.
struct ZipEntry {
  std::string name, stored;  // `stored`: the bytes as they appear in the archive
  uint16_t method = 0;       // 0 stored, 8 deflate
  uint32_t crc = 0, usize = 0;
};

ZipEntry stored_entry(const std::string& name, const std::string& bytes) {
  ZipEntry e{name, bytes, 0, 0, uint32_t(bytes.size())};
  e.crc = uint32_t(crc32(0, reinterpret_cast<const Bytef*>(bytes.data()), uInt(bytes.size())));
  return e;
}

std::string raw_deflate(const std::string& in) {
  z_stream z{};
  deflateInit2(&z, 9, Z_DEFLATED, -15, 9, Z_DEFAULT_STRATEGY);
  std::string out(deflateBound(&z, uLong(in.size())), '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = uInt(in.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = uInt(out.size());
  deflate(&z, Z_FINISH);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

std::string zip(const std::vector<ZipEntry>& entries) {
  std::string body, cd;
  for (const ZipEntry& e : entries) {
    uint32_t off = uint32_t(body.size());
    body += le32(0x04034b50) + le16(20) + le16(0) + le16(e.method) + le16(0) + le16(0) + le32(e.crc) +
            le32(uint32_t(e.stored.size())) + le32(e.usize) + le16(uint16_t(e.name.size())) + le16(0) +
            e.name + e.stored;
    cd += le32(0x02014b50) + le16(20) + le16(20) + le16(0) + le16(e.method) + le16(0) + le16(0) +
          le32(e.crc) + le32(uint32_t(e.stored.size())) + le32(e.usize) + le16(uint16_t(e.name.size())) +
          le16(0) + le16(0) + le16(0) + le16(0) + le32(0) + le32(off) + e.name;
  }
  std::string eocd = le32(0x06054b50) + le16(0) + le16(0) + le16(uint16_t(entries.size())) +
                     le16(uint16_t(entries.size())) + le32(uint32_t(cd.size())) + le32(uint32_t(body.size())) +
                     le16(0);
  return body + cd + eocd;
}

// Pickle protocol 2: GLOBAL module.name, then call it with one string argument.
std::string pickle_call(const std::string& module, const std::string& name, const std::string& arg) {
  return std::string("\x80\x02", 2) + "c" + module + "\n" + name + "\n" + "X" + le32(uint32_t(arg.size())) + arg +
         "\x85" + "R" + ".";
}

std::string png_chunk(const std::string& type, const std::string& data) {
  std::string td = type + data;
  uint32_t crc = uint32_t(crc32(0, reinterpret_cast<const Bytef*>(td.data()), uInt(td.size())));
  return be32(uint32_t(data.size())) + td + be32(crc);
}

std::string png_header(uint32_t w, uint32_t h) {
  std::string ihdr = be32(w) + be32(h) + std::string("\x08\x02\x00\x00\x00", 5);
  return std::string("\x89PNG\r\n\x1a\n", 8) + png_chunk("IHDR", ihdr);
}

std::string png_image(uint32_t w, uint32_t h) {
  std::string raw;
  for (uint32_t y = 0; y < h; ++y) raw += std::string(1, '\0') + std::string(w * 3, char(y * 7));
  std::string comp(compressBound(uLong(raw.size())), '\0');
  uLongf n = comp.size();
  compress(reinterpret_cast<Bytef*>(comp.data()), &n, reinterpret_cast<const Bytef*>(raw.data()), uLong(raw.size()));
  comp.resize(n);
  return png_header(w, h) + png_chunk("IDAT", comp) + png_chunk("IEND", "");
}

// The expectation for every case: exit 1, one stderr line naming the file and containing `what`.
void expect_clean_error(const std::string& file, const std::string& what) {
  Result r = run({"info", file});
  EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << "\n" << r.err;
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find(file), std::string::npos) << "error does not name the file: " << r.err;
  EXPECT_NE(r.err.find(what), std::string::npos) << "error does not say '" << what << "': " << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "error is not one line: " << r.err;
}

std::string path(const std::string& name) { return temp_dir() + "/" + name; }

}  // namespace

TEST(BadInput, MissingFile) { expect_clean_error(path("does-not-exist.safetensors"), "no such file"); }

TEST(BadInput, SafetensorsTruncatedHeader) {
  std::string full = safetensors(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(16, '\0'));
  write_file(path("trunc-header.safetensors"), full.substr(0, 20));
  expect_clean_error(path("trunc-header.safetensors"), "header");
}

TEST(BadInput, SafetensorsTruncatedData) {
  std::string full = safetensors(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(16, '\0'));
  write_file(path("trunc-data.safetensors"), full.substr(0, full.size() - 5));
  expect_clean_error(path("trunc-data.safetensors"), "a");
}

TEST(BadInput, SafetensorsHugeHeaderLength) {
  write_file(path("huge.safetensors"), le64(uint64_t(1) << 62) + "{}");
  expect_clean_error(path("huge.safetensors"), "header");
}

TEST(BadInput, SafetensorsOffsetsPastEnd) {
  write_file(path("past.safetensors"),
             safetensors(R"({"w":{"dtype":"F16","shape":[1000,1000],"data_offsets":[0,2000000]}})", "xx"));
  expect_clean_error(path("past.safetensors"), "w");
}

TEST(BadInput, SafetensorsOverlap) {
  write_file(path("overlap.safetensors"),
             safetensors(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                         R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                         std::string(24, '\0')));
  expect_clean_error(path("overlap.safetensors"), "overlap");
}

TEST(BadInput, SafetensorsUnknownDtype) {
  write_file(path("dtype.safetensors"),
             safetensors(R"({"q":{"dtype":"Q4_K","shape":[4],"data_offsets":[0,4]}})", std::string(4, '\0')));
  expect_clean_error(path("dtype.safetensors"), "Q4_K");
}

TEST(BadInput, PickleOsSystem) {
  write_file(path("evil-os.ckpt"), zip({stored_entry("archive/data.pkl", pickle_call("os", "system", "touch /tmp/pwned"))}));
  expect_clean_error(path("evil-os.ckpt"), "os.system");
}

TEST(BadInput, PickleBuiltinsEval) {
  write_file(path("evil-eval.ckpt"),
             zip({stored_entry("archive/data.pkl", pickle_call("builtins", "eval", "__import__('os')"))}));
  expect_clean_error(path("evil-eval.ckpt"), "builtins.eval");
}

TEST(BadInput, ZipBombDeclaredHuge) {
  // 64 MiB of zeros deflate to ~64 KiB; the entry declares 4 GB uncompressed.
  std::string zeros(64u << 20, '\0');
  ZipEntry e{"archive/data.pkl", raw_deflate(zeros), 8, 0, 0xfffffff0u};
  write_file(path("bomb-huge.ckpt"), zip({e}));
  expect_clean_error(path("bomb-huge.ckpt"), "data.pkl");
}

TEST(BadInput, ZipBombLyingSize) {
  // Declares 100 bytes but inflates to 64 MiB: inflation must stop at the declared size.
  std::string zeros(64u << 20, '\0');
  ZipEntry e{"archive/data.pkl", raw_deflate(zeros), 8, 0, 100};
  write_file(path("bomb-lie.ckpt"), zip({e}));
  expect_clean_error(path("bomb-lie.ckpt"), "data.pkl");
}

TEST(BadInput, TextFileNamedPng) {
  write_file(path("notes.png"), "this is not an image\n");
  expect_clean_error(path("notes.png"), "not a PNG or JPEG");
}

TEST(BadInput, EmptyPng) {
  write_file(path("empty.png"), "");
  expect_clean_error(path("empty.png"), "empty");
}

TEST(BadInput, ZeroByZeroPng) {
  write_file(path("zero.png"), png_header(0, 0) + png_chunk("IEND", ""));
  expect_clean_error(path("zero.png"), "zero.png");
}

TEST(BadInput, TruncatedPng) {
  std::string full = png_image(40, 30);
  for (size_t cut : {size_t(10), size_t(30), full.size() / 2, full.size() - 13}) {
    std::string p = path("trunc" + std::to_string(cut) + ".png");
    write_file(p, full.substr(0, cut));
    expect_clean_error(p, "trunc" + std::to_string(cut) + ".png");
  }
}

TEST(BadInput, HugeDeclaredPng) {
  write_file(path("huge.png"), png_header(200000, 200000) + png_chunk("IEND", ""));
  expect_clean_error(path("huge.png"), "200000");
}

TEST(BadInput, ValidPngStillReads) {  // the control case: the crafting above is right
  write_file(path("ok.png"), png_image(40, 30));
  Result r = run({"info", path("ok.png")});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("40x30"), std::string::npos) << r.out;
}

TEST(BadInput, DirectoryThatIsNotAModel) {
  std::string d = path("not-a-model");
  mkdir(d.c_str(), 0755);
  expect_clean_error(d, "not-a-model");
}
