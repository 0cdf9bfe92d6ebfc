// PNG (libpng 1.6) and JPEG (libjpeg-turbo, jpeglib.h API) decoding and encoding. Files are
// written through write_file_safely (io/output_file.h).
//
// Error handling: libpng and libjpeg report fatal errors through callbacks that must not return.
// Ours copy the message into a plain context struct and longjmp back to a setjmp placed in a
// small "stage" function. Stage functions hold only trivially destructible locals and never
// throw, so the longjmp skips no C++ destructors; every C++ object (vectors, strings) lives in
// the callers, which turn a failed stage into a diffuse::Error after it has returned.
#include "io/image.h"

#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <png.h>
// jpeglib.h needs size_t and FILE declared before it.
#include <jpeglib.h>
#include <jerror.h>

#include "core/error.h"
#include "core/text.h"
#include "io/output_file.h"

namespace diffuse {
namespace {

constexpr size_t kMaxFileBytes = size_t(512) << 20;     // read_image refuses larger files
constexpr png_alloc_size_t kMaxPngChunk = 32u << 20;    // ancillary chunk (text) memory cap
constexpr int kMaxJpegScans = 1000;                     // progressive JPEG scan-count cap
constexpr size_t kMsgLen = 256;

void copy_msg(char* dst, const char* src) {
  std::snprintf(dst, kMsgLen, "%s", src ? src : "unknown error");
}

std::string latin1_to_utf8(const char* s, size_t n) {
  std::string out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out.push_back(char(c));
    } else {
      out.push_back(char(0xC0 | (c >> 6)));
      out.push_back(char(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

bool is_ascii(const std::string& s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// PNG decoding

struct PngReadCtx {
  jmp_buf jb;
  char msg[kMsgLen];
  const uint8_t* data = nullptr;
  size_t size = 0, pos = 0;
  png_structp png = nullptr;
  png_infop info = nullptr, end = nullptr;
  // Filled by png_stage_header.
  png_uint_32 width = 0, height = 0;
  int channels = 0;
  size_t rowbytes = 0;
  // Set by the caller before png_stage_pixels.
  png_bytepp rows = nullptr;
};

void png_error_cb(png_structp png, png_const_charp msg) {
  auto* ctx = static_cast<PngReadCtx*>(png_get_error_ptr(png));
  copy_msg(ctx->msg, msg);
  std::longjmp(ctx->jb, 1);
}

void png_warning_cb(png_structp, png_const_charp) {}  // warnings are not fatal; stay quiet

void png_read_cb(png_structp png, png_bytep out, size_t n) {
  auto* ctx = static_cast<PngReadCtx*>(png_get_io_ptr(png));
  if (n > ctx->size - ctx->pos) png_error(png, "truncated (unexpected end of data)");
  std::memcpy(out, ctx->data + ctx->pos, n);
  ctx->pos += n;
}

// Stage 1: create the reader, read up to the first IDAT, set the transformations.
bool png_stage_header(PngReadCtx* ctx) {
  if (setjmp(ctx->jb)) return false;
  ctx->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, ctx, png_error_cb, png_warning_cb);
  if (!ctx->png) { copy_msg(ctx->msg, "out of memory"); return false; }
  ctx->info = png_create_info_struct(ctx->png);
  ctx->end = png_create_info_struct(ctx->png);
  if (!ctx->info || !ctx->end) { copy_msg(ctx->msg, "out of memory"); return false; }
  png_set_user_limits(ctx->png, kMaxImageSide, kMaxImageSide);
  png_set_chunk_malloc_max(ctx->png, kMaxPngChunk);
  png_set_read_fn(ctx->png, ctx, png_read_cb);
  png_read_info(ctx->png, ctx->info);

  int bit_depth = png_get_bit_depth(ctx->png, ctx->info);
  int color_type = png_get_color_type(ctx->png, ctx->info);
  if (bit_depth == 16) png_set_scale_16(ctx->png);
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(ctx->png);
  if (color_type == PNG_COLOR_TYPE_GRAY && bit_depth < 8) png_set_expand_gray_1_2_4_to_8(ctx->png);
  if (png_get_valid(ctx->png, ctx->info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(ctx->png);
  png_set_interlace_handling(ctx->png);
  png_read_update_info(ctx->png, ctx->info);

  ctx->width = png_get_image_width(ctx->png, ctx->info);
  ctx->height = png_get_image_height(ctx->png, ctx->info);
  ctx->channels = png_get_channels(ctx->png, ctx->info);
  ctx->rowbytes = png_get_rowbytes(ctx->png, ctx->info);
  return true;
}

// Stage 2: decode all rows (all interlace passes), then the chunks after IDAT.
bool png_stage_pixels(PngReadCtx* ctx) {
  if (setjmp(ctx->jb)) return false;
  png_read_image(ctx->png, ctx->rows);
  png_read_end(ctx->png, ctx->end);
  return true;
}

struct PngReadGuard {
  PngReadCtx& ctx;
  ~PngReadGuard() {
    if (ctx.png) png_destroy_read_struct(&ctx.png, &ctx.info, &ctx.end);
  }
};

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

void collect_png_text(png_structp png, png_infop info,
                      std::vector<std::pair<std::string, std::string>>& out) {
  png_textp text = nullptr;
  int n = 0;
  png_get_text(png, info, &text, &n);
  for (int i = 0; i < n; ++i) {
    const png_text& t = text[i];
    std::string key = latin1_to_utf8(t.key, std::strlen(t.key));
    bool itxt = t.compression == PNG_ITXT_COMPRESSION_NONE || t.compression == PNG_ITXT_COMPRESSION_zTXt;
    size_t len = itxt ? t.itxt_length : t.text_length;
    const char* s = t.text ? t.text : "";
    if (!t.text) len = 0;
    // tEXt/zTXt are Latin-1; iTXt is UTF-8. Image::text is always UTF-8.
    out.emplace_back(std::move(key), itxt ? std::string(s, len) : latin1_to_utf8(s, len));
  }
}

Image decode_png(const uint8_t* data, size_t size, const std::string& name) {
  // Check the declared size ourselves before libpng allocates anything, so the message can say
  // what the file declares (libpng's user limits only produce "Invalid IHDR data").
  static const uint8_t kIhdr[4] = {'I', 'H', 'D', 'R'};
  if (size < 8 + 8 + 13 + 4) fail(name, ": bad PNG: truncated (", size, " bytes, no complete IHDR)");
  DF_CHECK(std::memcmp(data + 12, kIhdr, 4) == 0, name, ": bad PNG: first chunk is not IHDR");
  uint32_t w = be32(data + 16), h = be32(data + 20);
  DF_CHECK(w != 0 && h != 0, name, ": PNG declares an empty image of ", w, "x", h, " pixels");
  DF_CHECK(w <= uint32_t(kMaxImageSide) && h <= uint32_t(kMaxImageSide), name, ": PNG declares ",
           w, "x", h, " pixels; the limit is ", kMaxImageSide, " per side");

  PngReadCtx ctx;
  ctx.data = data;
  ctx.size = size;
  PngReadGuard guard{ctx};
  if (!png_stage_header(&ctx)) fail(name, ": bad PNG: ", ctx.msg);
  DF_ASSERT(ctx.width == w && ctx.height == h);
  DF_ASSERT(ctx.channels >= 1 && ctx.channels <= 4);
  DF_ASSERT(ctx.rowbytes == size_t(ctx.width) * size_t(ctx.channels));

  Image im;
  im.width = int(ctx.width);
  im.height = int(ctx.height);
  im.channels = ctx.channels;
  im.format = "png";
  im.pixels.resize(ctx.rowbytes * ctx.height);
  std::vector<png_bytep> rows(ctx.height);
  for (size_t y = 0; y < ctx.height; ++y) rows[y] = im.pixels.data() + y * ctx.rowbytes;
  ctx.rows = rows.data();
  if (!png_stage_pixels(&ctx)) fail(name, ": bad PNG: ", ctx.msg);
  collect_png_text(ctx.png, ctx.info, im.text);
  collect_png_text(ctx.png, ctx.end, im.text);
  return im;
}

// ---------------------------------------------------------------------------------------------
// JPEG decoding

struct JpegCtx {
  jpeg_decompress_struct cinfo;
  jpeg_error_mgr err;
  jpeg_progress_mgr progress;
  jmp_buf jb;
  char msg[kMsgLen];
  bool created = false;
  bool truncated = false;
  bool too_many_scans = false;
  const uint8_t* data = nullptr;
  size_t size = 0;
  uint8_t* pixels = nullptr;  // set by the caller before jpeg_stage_pixels
  size_t row_stride = 0;
};

JpegCtx* jpeg_ctx(j_common_ptr cinfo) {
  // cinfo is the first member of JpegCtx (standard layout), so the cast is valid.
  return reinterpret_cast<JpegCtx*>(cinfo);
}

void jpeg_error_exit_cb(j_common_ptr cinfo) {
  JpegCtx* ctx = jpeg_ctx(cinfo);
  char buf[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, buf);
  copy_msg(ctx->msg, buf);
  std::longjmp(ctx->jb, 1);
}

void jpeg_emit_message_cb(j_common_ptr cinfo, int level) {
  // Warnings (level -1) are tolerated, except running out of data: the library would fill the
  // rest of the image with grey and call it a success.
  if (level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
    JpegCtx* ctx = jpeg_ctx(cinfo);
    ctx->truncated = true;
    copy_msg(ctx->msg, "truncated (Premature end of JPEG file)");
    std::longjmp(ctx->jb, 1);
  }
  if (level == -1) cinfo->err->num_warnings++;
}

void jpeg_progress_cb(j_common_ptr cinfo) {
  auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (d->input_scan_number > kMaxJpegScans) {
    JpegCtx* ctx = jpeg_ctx(cinfo);
    ctx->too_many_scans = true;
    std::snprintf(ctx->msg, kMsgLen, "more than %d progressive scans", kMaxJpegScans);
    std::longjmp(ctx->jb, 1);
  }
}

// Stage 1: create the decoder and read the header up to the first SOS.
bool jpeg_stage_header(JpegCtx* ctx) {
  ctx->cinfo.err = jpeg_std_error(&ctx->err);
  ctx->err.error_exit = jpeg_error_exit_cb;
  ctx->err.emit_message = jpeg_emit_message_cb;
  if (setjmp(ctx->jb)) return false;
  jpeg_create_decompress(&ctx->cinfo);
  ctx->created = true;
  ctx->progress.progress_monitor = jpeg_progress_cb;
  ctx->cinfo.progress = &ctx->progress;
  jpeg_mem_src(&ctx->cinfo, ctx->data, static_cast<unsigned long>(ctx->size));
  jpeg_read_header(&ctx->cinfo, TRUE);
  return true;
}

// Stage 2: choose the output colour space and compute the output size (no big allocations).
bool jpeg_stage_setup(JpegCtx* ctx) {
  if (setjmp(ctx->jb)) return false;
  J_COLOR_SPACE in = ctx->cinfo.jpeg_color_space;
  if (in == JCS_GRAYSCALE) ctx->cinfo.out_color_space = JCS_GRAYSCALE;
  else if (in == JCS_CMYK || in == JCS_YCCK) ctx->cinfo.out_color_space = JCS_CMYK;
  else ctx->cinfo.out_color_space = JCS_RGB;
  jpeg_calc_output_dimensions(&ctx->cinfo);
  return true;
}

// Stage 3: decode every scanline into ctx->pixels.
bool jpeg_stage_pixels(JpegCtx* ctx) {
  if (setjmp(ctx->jb)) return false;
  jpeg_start_decompress(&ctx->cinfo);
  while (ctx->cinfo.output_scanline < ctx->cinfo.output_height) {
    JSAMPROW row = ctx->pixels + size_t(ctx->cinfo.output_scanline) * ctx->row_stride;
    jpeg_read_scanlines(&ctx->cinfo, &row, 1);
  }
  jpeg_finish_decompress(&ctx->cinfo);
  return true;
}

struct JpegGuard {
  JpegCtx& ctx;
  ~JpegGuard() {
    if (ctx.created) jpeg_destroy_decompress(&ctx.cinfo);
  }
};

Image decode_jpeg(const uint8_t* data, size_t size, const std::string& name) {
  JpegCtx ctx;
  ctx.data = data;
  ctx.size = size;
  JpegGuard guard{ctx};
  if (!jpeg_stage_header(&ctx)) fail(name, ": bad JPEG: ", ctx.msg);
  unsigned w = ctx.cinfo.image_width, h = ctx.cinfo.image_height;
  DF_CHECK(w != 0 && h != 0, name, ": JPEG declares an empty image of ", w, "x", h, " pixels");
  DF_CHECK(w <= unsigned(kMaxImageSide) && h <= unsigned(kMaxImageSide), name, ": JPEG declares ",
           w, "x", h, " pixels; the limit is ", kMaxImageSide, " per side");
  if (!jpeg_stage_setup(&ctx)) fail(name, ": bad JPEG: ", ctx.msg);
  int comps = ctx.cinfo.output_components;
  DF_ASSERT(ctx.cinfo.output_width == w && ctx.cinfo.output_height == h);
  DF_ASSERT(comps == 1 || comps == 3 || comps == 4);

  std::vector<uint8_t> buf(size_t(w) * h * size_t(comps));
  ctx.pixels = buf.data();
  ctx.row_stride = size_t(w) * size_t(comps);
  if (!jpeg_stage_pixels(&ctx)) fail(name, ": bad JPEG: ", ctx.msg);

  Image im;
  im.width = int(w);
  im.height = int(h);
  im.format = "jpeg";
  if (comps != 4) {
    im.channels = comps;
    im.pixels = std::move(buf);
    return im;
  }
  // CMYK -> RGB (naive, no colour management). Files with an Adobe marker (Photoshop and
  // libjpeg writers) store inverted CMYK, where 255 means no ink.
  bool inverted = ctx.cinfo.saw_Adobe_marker;
  im.channels = 3;
  im.pixels.resize(size_t(w) * h * 3);
  for (size_t i = 0, n = size_t(w) * h; i < n; ++i) {
    unsigned c = buf[4 * i], m = buf[4 * i + 1], yy = buf[4 * i + 2], k = buf[4 * i + 3];
    if (!inverted) { c = 255 - c; m = 255 - m; yy = 255 - yy; k = 255 - k; }
    im.pixels[3 * i + 0] = uint8_t((c * k + 127) / 255);
    im.pixels[3 * i + 1] = uint8_t((m * k + 127) / 255);
    im.pixels[3 * i + 2] = uint8_t((yy * k + 127) / 255);
  }
  return im;
}

// ---------------------------------------------------------------------------------------------
// PNG encoding

struct PngWriteCtx {
  jmp_buf jb;
  char msg[kMsgLen];
  png_structp png = nullptr;
  png_infop info = nullptr;
  std::vector<uint8_t>* out = nullptr;
  png_uint_32 width = 0, height = 0;
  int color_type = 0;
  png_bytepp rows = nullptr;
  png_textp text = nullptr;
  int ntext = 0;
};

void png_write_error_cb(png_structp png, png_const_charp msg) {
  auto* ctx = static_cast<PngWriteCtx*>(png_get_error_ptr(png));
  copy_msg(ctx->msg, msg);
  std::longjmp(ctx->jb, 1);
}

bool append_bytes(std::vector<uint8_t>* out, const uint8_t* p, size_t n) noexcept {
  try {
    out->insert(out->end(), p, p + n);
    return true;
  } catch (...) {
    return false;
  }
}

void png_write_cb(png_structp png, png_bytep p, size_t n) {
  auto* ctx = static_cast<PngWriteCtx*>(png_get_io_ptr(png));
  if (!append_bytes(ctx->out, p, n)) png_error(png, "out of memory");
}

void png_flush_cb(png_structp) {}

bool png_stage_write(PngWriteCtx* ctx) {
  if (setjmp(ctx->jb)) return false;
  ctx->png = png_create_write_struct(PNG_LIBPNG_VER_STRING, ctx, png_write_error_cb, png_warning_cb);
  if (!ctx->png) { copy_msg(ctx->msg, "out of memory"); return false; }
  ctx->info = png_create_info_struct(ctx->png);
  if (!ctx->info) { copy_msg(ctx->msg, "out of memory"); return false; }
  png_set_write_fn(ctx->png, ctx, png_write_cb, png_flush_cb);
  png_set_IHDR(ctx->png, ctx->info, ctx->width, ctx->height, 8, ctx->color_type, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (ctx->ntext > 0) png_set_text(ctx->png, ctx->info, ctx->text, ctx->ntext);
  png_write_info(ctx->png, ctx->info);
  png_write_image(ctx->png, ctx->rows);
  png_write_end(ctx->png, ctx->info);
  return true;
}

struct PngWriteGuard {
  PngWriteCtx& ctx;
  ~PngWriteGuard() {
    if (ctx.png) png_destroy_write_struct(&ctx.png, &ctx.info);
  }
};

// ---------------------------------------------------------------------------------------------
// JPEG encoding

struct JpegWriteCtx {
  jpeg_compress_struct cinfo;  // first member, as in JpegCtx
  jpeg_error_mgr err;
  jmp_buf jb;
  char msg[kMsgLen];
  bool created = false;
  unsigned width = 0, height = 0;
  int components = 0;  // 1 (grey) or 3 (RGB)
  int quality = 95;
  const uint8_t* pixels = nullptr;
  size_t row_stride = 0;
  const char* comment = nullptr;  // written as COM markers (may be empty)
  size_t comment_size = 0;
  // jpeg_mem_dest output: `own` is the buffer we allocate and hand over; libjpeg writes into it
  // and, only if it overflows, into buffers of its own, reporting the final one in out/out_size
  // at jpeg_finish_compress.
  unsigned char* own = nullptr;
  size_t own_size = 0;
  unsigned char* out = nullptr;
  unsigned long out_size = 0;
};

void jpeg_write_error_cb(j_common_ptr cinfo) {
  auto* ctx = reinterpret_cast<JpegWriteCtx*>(cinfo);
  char buf[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, buf);
  copy_msg(ctx->msg, buf);
  std::longjmp(ctx->jb, 1);
}

void jpeg_write_emit_cb(j_common_ptr cinfo, int level) {
  if (level == -1) cinfo->err->num_warnings++;  // stay quiet, like the reader
}

constexpr size_t kMaxComMarker = 65533;  // a marker's 16-bit length counts its own 2 bytes

// Creates the compressor and writes the whole image (no C++ objects here: see the file comment).
bool jpeg_stage_encode(JpegWriteCtx* ctx) {
  ctx->cinfo.err = jpeg_std_error(&ctx->err);
  ctx->err.error_exit = jpeg_write_error_cb;
  ctx->err.emit_message = jpeg_write_emit_cb;
  if (setjmp(ctx->jb)) return false;
  jpeg_create_compress(&ctx->cinfo);
  ctx->created = true;
  ctx->out = ctx->own;
  ctx->out_size = static_cast<unsigned long>(ctx->own_size);
  jpeg_mem_dest(&ctx->cinfo, &ctx->out, &ctx->out_size);
  ctx->cinfo.image_width = ctx->width;
  ctx->cinfo.image_height = ctx->height;
  ctx->cinfo.input_components = ctx->components;
  ctx->cinfo.in_color_space = ctx->components == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&ctx->cinfo);
  jpeg_set_quality(&ctx->cinfo, ctx->quality, TRUE);
  if (ctx->components == 3 && ctx->quality >= 90) {
    // Full-resolution chroma (4:4:4) at high quality: 4:2:0 visibly smears red/blue edges.
    ctx->cinfo.comp_info[0].h_samp_factor = 1;
    ctx->cinfo.comp_info[0].v_samp_factor = 1;
  }
  ctx->cinfo.optimize_coding = TRUE;
  jpeg_start_compress(&ctx->cinfo, TRUE);
  for (size_t at = 0; at < ctx->comment_size; at += kMaxComMarker) {
    size_t n = ctx->comment_size - at < kMaxComMarker ? ctx->comment_size - at : kMaxComMarker;
    jpeg_write_marker(&ctx->cinfo, JPEG_COM, reinterpret_cast<const JOCTET*>(ctx->comment + at),
                      unsigned(n));
  }
  while (ctx->cinfo.next_scanline < ctx->cinfo.image_height) {
    // libjpeg only reads the rows.
    JSAMPROW row = const_cast<JSAMPROW>(ctx->pixels + size_t(ctx->cinfo.next_scanline) * ctx->row_stride);
    jpeg_write_scanlines(&ctx->cinfo, &row, 1);
  }
  jpeg_finish_compress(&ctx->cinfo);
  return true;
}

struct JpegWriteGuard {
  JpegWriteCtx& ctx;
  ~JpegWriteGuard() {
    if (ctx.created) jpeg_destroy_compress(&ctx.cinfo);
    // After a successful finish, `out` may be a buffer libjpeg grew into (malloc'd, ours to free).
    // After a failure it still names `own` (libjpeg reports a grown buffer only when it
    // finishes), so a grown buffer is lost in that case: it happens only on out-of-memory.
    if (ctx.out && ctx.out != ctx.own) std::free(ctx.out);
    std::free(ctx.own);
  }
};

// PNG keywords: 1-79 printable Latin-1 characters, no leading, trailing or double spaces.
std::string png_keyword(const std::string& path, const std::string& key) {
  std::vector<uint32_t> cps;
  DF_CHECK(utf8_codepoints(key, cps), path, ": PNG text key is not valid UTF-8");
  std::string out;
  for (uint32_t cp : cps) {
    DF_CHECK((cp >= 32 && cp <= 126) || (cp >= 161 && cp <= 255), path, ": PNG text key '", key,
             "' has a character that is not printable Latin-1");
    out.push_back(char(static_cast<unsigned char>(cp)));
  }
  DF_CHECK(!out.empty() && out.size() <= 79, path, ": PNG text key '", key,
           "' must be 1 to 79 characters long");
  DF_CHECK(out.front() != ' ' && out.back() != ' ' && out.find("  ") == std::string::npos, path,
           ": PNG text key '", key, "' has leading, trailing or double spaces");
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Image decode_image(const uint8_t* data, size_t size, const std::string& name) {
  static const uint8_t kPngSig[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  DF_CHECK(size > 0 && data, name, ": empty file");
  if (size >= 8 && std::memcmp(data, kPngSig, 8) == 0) return decode_png(data, size, name);
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF)
    return decode_jpeg(data, size, name);
  if (size < 8 && std::memcmp(data, kPngSig, size) == 0)
    fail(name, ": bad PNG: truncated (", size, " bytes)");
  fail(name, ": not a PNG or JPEG image");
}

Image read_image(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct FdGuard {
    int fd;
    ~FdGuard() { ::close(fd); }
  } fd_guard{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path, ": cannot open: ", std::strerror(errno));
  DF_CHECK(S_ISREG(st.st_mode), path, ": not a regular file");
  DF_CHECK(st.st_size > 0, path, ": empty file");
  DF_CHECK(uint64_t(st.st_size) <= kMaxFileBytes, path, ": file is ", uint64_t(st.st_size),
           " bytes; the limit for images is ", kMaxFileBytes >> 20, " MiB");
  std::vector<uint8_t> bytes(size_t(st.st_size));
  size_t got = 0;
  while (got < bytes.size()) {
    ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(path, ": cannot read: ", std::strerror(errno));
    if (n == 0) break;  // file shrank while reading
    got += size_t(n);
  }
  bytes.resize(got);
  return decode_image(bytes.data(), bytes.size(), path);
}

Image to_rgb(const Image& im) {
  DF_CHECK(im.channels >= 1 && im.channels <= 4, "to_rgb: image has ", im.channels,
           " channels; expected 1 to 4");
  size_t n = size_t(im.width) * size_t(im.height);
  DF_CHECK(im.width >= 0 && im.height >= 0 && im.pixels.size() == n * size_t(im.channels),
           "to_rgb: ", im.width, "x", im.height, "x", im.channels, " image has ", im.pixels.size(),
           " bytes of pixels");
  Image out;
  out.width = im.width;
  out.height = im.height;
  out.channels = 3;
  out.text = im.text;
  out.format = im.format;
  if (im.channels == 3) {
    out.pixels = im.pixels;
    return out;
  }
  out.pixels.resize(n * 3);
  const int c = im.channels;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* s = im.pixels.data() + i * size_t(c);
    uint8_t* d = out.pixels.data() + i * 3;
    if (c <= 2) {
      d[0] = d[1] = d[2] = s[0];
    } else {
      d[0] = s[0];
      d[1] = s[1];
      d[2] = s[2];
    }
  }
  return out;
}

namespace {

// Checks an image handed to an encoder; `name` (a path or the function name) starts each message.
void check_encodable(const Image& im, const std::string& name, const char* format) {
  DF_CHECK(im.channels >= 1 && im.channels <= 4, name, ": cannot write a ", format, " with ", im.channels,
           " channels; expected 1 to 4");
  DF_CHECK(im.width > 0 && im.height > 0 && im.width <= kMaxImageSide && im.height <= kMaxImageSide,
           name, ": cannot write a ", im.width, "x", im.height, " image; sides must be 1 to ",
           kMaxImageSide);
  size_t rowbytes = size_t(im.width) * size_t(im.channels);
  DF_CHECK(im.pixels.size() == rowbytes * size_t(im.height), name, ": ", im.width, "x", im.height,
           "x", im.channels, " image has ", im.pixels.size(), " bytes of pixels; expected ",
           rowbytes * size_t(im.height));
}

std::vector<uint8_t> encode_png_named(const Image& im, const std::string& path) {
  check_encodable(im, path, "PNG");
  size_t rowbytes = size_t(im.width) * size_t(im.channels);
  // Text chunks: ASCII values as tEXt (what A1111 writes), anything else as UTF-8 iTXt.
  std::vector<std::string> keys, values;
  std::vector<bool> itxt;
  for (const auto& [key, value] : im.text) {
    keys.push_back(png_keyword(path, key));
    DF_CHECK(value.find('\0') == std::string::npos, path, ": PNG text '", key,
             "' contains a NUL byte");
    bool ascii = is_ascii(value);
    std::vector<uint32_t> cps;
    DF_CHECK(ascii || utf8_codepoints(value, cps), path, ": PNG text '", key,
             "' is not valid UTF-8");
    values.push_back(value);
    itxt.push_back(!ascii);
  }
  static char empty[1] = {0};
  std::vector<png_text> text(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    png_text& t = text[i];
    std::memset(&t, 0, sizeof t);
    t.key = keys[i].data();
    t.text = values[i].data();
    if (itxt[i]) {
      t.compression = PNG_ITXT_COMPRESSION_NONE;
      t.itxt_length = values[i].size();
      t.lang = empty;
      t.lang_key = empty;
    } else {
      t.compression = PNG_TEXT_COMPRESSION_NONE;
      t.text_length = values[i].size();
    }
  }

  static const int kColorTypes[5] = {0, PNG_COLOR_TYPE_GRAY, PNG_COLOR_TYPE_GRAY_ALPHA,
                                     PNG_COLOR_TYPE_RGB, PNG_COLOR_TYPE_RGB_ALPHA};
  std::vector<png_bytep> rows(size_t(im.height));
  for (size_t y = 0; y < rows.size(); ++y)
    rows[y] = const_cast<png_bytep>(im.pixels.data() + y * rowbytes);  // libpng only reads them

  std::vector<uint8_t> bytes;
  bytes.reserve(im.pixels.size() / 2 + 1024);
  PngWriteCtx ctx;
  ctx.out = &bytes;
  ctx.width = png_uint_32(im.width);
  ctx.height = png_uint_32(im.height);
  ctx.color_type = kColorTypes[im.channels];
  ctx.rows = rows.data();
  ctx.text = text.empty() ? nullptr : text.data();
  ctx.ntext = int(text.size());
  {
    PngWriteGuard guard{ctx};
    if (!png_stage_write(&ctx)) fail(path, ": cannot encode PNG: ", ctx.msg);
  }
  return bytes;
}

std::vector<uint8_t> encode_jpeg_named(const Image& im, int quality, const std::string& name) {
  check_encodable(im, name, "JPEG");
  DF_CHECK(quality >= 1 && quality <= 100, name, ": JPEG quality ", quality, " is out of range 1 to 100");

  // Alpha is dropped: grey+alpha -> grey, RGBA -> RGB.
  const int comps = im.channels <= 2 ? 1 : 3;
  const size_t npix = size_t(im.width) * size_t(im.height);
  std::vector<uint8_t> stripped;
  const uint8_t* pixels = im.pixels.data();
  if (im.channels == 2 || im.channels == 4) {
    stripped.resize(npix * size_t(comps));
    for (size_t i = 0; i < npix; ++i)
      for (int c = 0; c < comps; ++c)
        stripped[i * size_t(comps) + size_t(c)] = im.pixels[i * size_t(im.channels) + size_t(c)];
    pixels = stripped.data();
  }

  std::string comment;
  for (const auto& [key, value] : im.text)
    if (key == "parameters") {
      comment = value;
      break;
    }

  JpegWriteCtx ctx;
  ctx.width = unsigned(im.width);
  ctx.height = unsigned(im.height);
  ctx.components = comps;
  ctx.quality = quality;
  ctx.pixels = pixels;
  ctx.row_stride = size_t(im.width) * size_t(comps);
  ctx.comment = comment.data();
  ctx.comment_size = comment.size();
  // The initial output buffer: raw size plus headroom, so libjpeg essentially never has to grow it
  // (untouched pages of a large malloc cost nothing).
  ctx.own_size = npix * size_t(comps) + comment.size() + comment.size() / 65533 * 4 + 65536;
  ctx.own = static_cast<unsigned char*>(std::malloc(ctx.own_size));
  if (!ctx.own) throw std::bad_alloc();
  JpegWriteGuard guard{ctx};
  if (!jpeg_stage_encode(&ctx)) fail(name, ": cannot encode JPEG: ", ctx.msg);
  return std::vector<uint8_t>(ctx.out, ctx.out + ctx.out_size);
}

}  // namespace

std::vector<uint8_t> encode_png(const Image& im) { return encode_png_named(im, "encode_png"); }

void write_png(const std::string& path, const Image& im) {
  std::vector<uint8_t> bytes = encode_png_named(im, path);
  write_file_safely(path, bytes.data(), bytes.size());
}

std::vector<uint8_t> encode_jpeg(const Image& im, int quality) {
  return encode_jpeg_named(im, quality, "encode_jpeg");
}

void write_jpeg(const std::string& path, const Image& im, int quality) {
  std::vector<uint8_t> bytes = encode_jpeg_named(im, quality, path);
  write_file_safely(path, bytes.data(), bytes.size());
}

}  // namespace diffuse
