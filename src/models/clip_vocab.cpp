// The CLIP BPE vocabulary (data/clip/bpe_simple_vocab_16e6.txt.gz, MIT licence in data/clip/LICENSE),
// embedded byte for byte with .incbin at build time; CMake passes the absolute path as
// DIFFUSE_CLIP_VOCAB_PATH and makes this file depend on it. Decompressed with zlib on demand.
#include <zlib.h>

#include <cstring>
#include <string>
#include <string_view>

#include "core/error.h"
#include "models/tokenizer.h"

#ifndef DIFFUSE_CLIP_VOCAB_PATH
#error "DIFFUSE_CLIP_VOCAB_PATH must name bpe_simple_vocab_16e6.txt.gz (set by src/models/CMakeLists.txt)"
#endif

asm(".pushsection .rodata\n"
    ".balign 16\n"
    ".global diffuse_clip_vocab_gz_begin\n"
    ".type diffuse_clip_vocab_gz_begin, @object\n"
    "diffuse_clip_vocab_gz_begin:\n"
    ".incbin \"" DIFFUSE_CLIP_VOCAB_PATH "\"\n"
    ".global diffuse_clip_vocab_gz_end\n"
    ".type diffuse_clip_vocab_gz_end, @object\n"
    "diffuse_clip_vocab_gz_end:\n"
    ".byte 0\n"
    ".popsection\n");

extern "C" const unsigned char diffuse_clip_vocab_gz_begin[];
extern "C" const unsigned char diffuse_clip_vocab_gz_end[];

namespace diffuse::detail {

std::string_view clip_vocab_gz() {
  return std::string_view(reinterpret_cast<const char*>(diffuse_clip_vocab_gz_begin),
                          static_cast<size_t>(diffuse_clip_vocab_gz_end - diffuse_clip_vocab_gz_begin));
}

std::string clip_vocab_text() {
  std::string_view gz = clip_vocab_gz();
  z_stream zs;
  std::memset(&zs, 0, sizeof zs);
  DF_CHECK(inflateInit2(&zs, 16 + MAX_WBITS) == Z_OK, "CLIP vocabulary: zlib init failed");
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(gz.data()));
  zs.avail_in = static_cast<uInt>(gz.size());
  std::string out;
  out.resize(gz.size() * 2 + 4096);
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    if (zs.total_out == out.size()) out.resize(out.size() * 2);
    zs.next_out = reinterpret_cast<Bytef*>(out.data() + zs.total_out);
    zs.avail_out = static_cast<uInt>(out.size() - zs.total_out);
    rc = inflate(&zs, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END) {
      std::string msg = zs.msg ? zs.msg : "";
      inflateEnd(&zs);
      fail("CLIP vocabulary: corrupt embedded gzip data (zlib ", rc, " ", msg, ")");
    }
    if (rc == Z_OK && zs.avail_in == 0 && zs.avail_out != 0) {
      inflateEnd(&zs);
      fail("CLIP vocabulary: embedded gzip data is truncated");
    }
  }
  out.resize(zs.total_out);
  inflateEnd(&zs);
  return out;
}

}  // namespace diffuse::detail
