// Image I/O: PNG round trips, libpng/libjpeg-written inputs, and hostile or broken files.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <png.h>
#include <jpeglib.h>
#include <unistd.h>
#include <zlib.h>

#include "core/error.h"
#include "io/image.h"

namespace fs = std::filesystem;
using diffuse::Image;
using Bytes = std::vector<uint8_t>;

namespace {

class ImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("diffuse_test_image_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

Bytes read_bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& p, const Bytes& b) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const diffuse::Error& e) {
    return e.what();
  }
  return "<no error>";
}

std::string decode_error(const Bytes& b, const std::string& name) {
  return error_of([&] { diffuse::decode_image(b.data(), b.size(), name); });
}

bool contains(const Bytes& hay, const std::string& needle) {
  Bytes n(needle.begin(), needle.end());
  return std::search(hay.begin(), hay.end(), n.begin(), n.end()) != hay.end();
}

Image make_image(int w, int h, int c, unsigned seed) {
  Image im;
  im.width = w;
  im.height = h;
  im.channels = c;
  im.pixels.resize(size_t(w) * h * c);
  std::mt19937 rng(seed);
  for (auto& p : im.pixels) p = uint8_t(rng());
  return im;
}

// ----- PNG construction helpers --------------------------------------------------------------

void put32(Bytes& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(uint8_t(v >> s));
}

void add_chunk(Bytes& b, const char* type, const Bytes& data) {
  put32(b, uint32_t(data.size()));
  size_t start = b.size();
  b.insert(b.end(), type, type + 4);
  b.insert(b.end(), data.begin(), data.end());
  put32(b, uint32_t(crc32(0, b.data() + start, uInt(b.size() - start))));
}

Bytes png_signature() { return {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A}; }

Bytes ihdr_data(uint32_t w, uint32_t h, uint8_t depth = 8, uint8_t color = 2) {
  Bytes d;
  put32(d, w);
  put32(d, h);
  d.insert(d.end(), {depth, color, 0, 0, 0});
  return d;
}

// A PNG with valid CRCs whose IHDR declares w x h, followed by a tiny IDAT and IEND.
Bytes crafted_png(uint32_t w, uint32_t h) {
  Bytes b = png_signature();
  add_chunk(b, "IHDR", ihdr_data(w, h));
  Bytes raw(4, 0);  // one filter byte + one RGB pixel
  Bytes z(64);
  uLongf zlen = z.size();
  compress(z.data(), &zlen, raw.data(), raw.size());
  z.resize(zlen);
  add_chunk(b, "IDAT", z);
  add_chunk(b, "IEND", {});
  return b;
}

// Finds the offset of the first chunk of the given type (offset of its length field).
size_t find_chunk(const Bytes& b, const char* type) {
  size_t pos = 8;
  while (pos + 8 <= b.size()) {
    uint32_t len = (uint32_t(b[pos]) << 24) | (b[pos + 1] << 16) | (b[pos + 2] << 8) | b[pos + 3];
    if (std::memcmp(&b[pos + 4], type, 4) == 0) return pos;
    pos += 12 + len;
  }
  return std::string::npos;
}

void png_write_vec(png_structp png, png_bytep p, size_t n) {
  auto* out = static_cast<Bytes*>(png_get_io_ptr(png));
  out->insert(out->end(), p, p + n);
}

struct RawPng {
  int width = 0, height = 0, bit_depth = 8, color_type = PNG_COLOR_TYPE_RGB;
  int interlace = PNG_INTERLACE_NONE;
  std::vector<Bytes> rows;  // packed rows in the file's own format (16-bit big-endian)
  std::vector<png_color> palette;
  Bytes trns;
  png_color_16 trns_grey{};
  bool use_trns_grey = false;
  std::vector<std::pair<std::string, std::string>> text_before, text_after;  // tEXt, Latin-1
};

// Writes a PNG with libpng directly (no error recovery: inputs here are valid).
Bytes write_raw_png(RawPng& r) {
  Bytes out;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  png_set_write_fn(png, &out, png_write_vec, nullptr);
  png_set_IHDR(png, info, r.width, r.height, r.bit_depth, r.color_type, r.interlace,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (!r.palette.empty()) png_set_PLTE(png, info, r.palette.data(), int(r.palette.size()));
  if (!r.trns.empty()) png_set_tRNS(png, info, r.trns.data(), int(r.trns.size()), nullptr);
  if (r.use_trns_grey) png_set_tRNS(png, info, nullptr, 0, &r.trns_grey);
  auto to_text = [](std::vector<std::pair<std::string, std::string>>& kv) {
    std::vector<png_text> t(kv.size());
    for (size_t i = 0; i < kv.size(); ++i) {
      std::memset(&t[i], 0, sizeof t[i]);
      t[i].compression = i % 2 ? PNG_TEXT_COMPRESSION_zTXt : PNG_TEXT_COMPRESSION_NONE;
      t[i].key = kv[i].first.data();
      t[i].text = kv[i].second.data();
      t[i].text_length = kv[i].second.size();
    }
    return t;
  };
  auto before = to_text(r.text_before);
  if (!before.empty()) png_set_text(png, info, before.data(), int(before.size()));
  png_write_info(png, info);
  std::vector<png_bytep> rows;
  for (auto& row : r.rows) rows.push_back(row.data());
  int passes = png_set_interlace_handling(png);
  for (int p = 0; p < passes; ++p)
    for (auto* row : rows) png_write_row(png, row);
  auto after = to_text(r.text_after);
  if (!after.empty()) png_set_text(png, info, after.data(), int(after.size()));
  png_write_end(png, info);
  png_destroy_write_struct(&png, &info);
  return out;
}

// ----- JPEG construction helper --------------------------------------------------------------

Bytes write_jpeg(int w, int h, int comps, J_COLOR_SPACE cs, const Bytes& pixels,
                 bool progressive = false) {
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* mem = nullptr;
  unsigned long mem_size = 0;
  jpeg_mem_dest(&c, &mem, &mem_size);
  c.image_width = JDIMENSION(w);
  c.image_height = JDIMENSION(h);
  c.input_components = comps;
  c.in_color_space = cs;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 95, TRUE);
  if (progressive) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<JSAMPROW>(pixels.data() + size_t(c.next_scanline) * w * comps);
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  Bytes out(mem, mem + mem_size);
  jpeg_destroy_compress(&c);
  free(mem);
  return out;
}

Bytes solid(int w, int h, std::initializer_list<uint8_t> px) {
  Bytes b;
  for (int i = 0; i < w * h; ++i) b.insert(b.end(), px);
  return b;
}

void expect_all_near(const Image& im, std::initializer_list<int> px, int tol) {
  ASSERT_EQ(size_t(im.channels), px.size());
  ASSERT_EQ(im.pixels.size(), size_t(im.width) * im.height * im.channels);
  for (size_t i = 0; i < im.pixels.size(); ++i)
    ASSERT_NEAR(int(im.pixels[i]), *(px.begin() + i % px.size()), tol) << "byte " << i;
}

}  // namespace

// ===== round trips ===========================================================================

struct RoundTripCase {
  int w, h, c;
};

class PngRoundTrip : public ImageTest, public ::testing::WithParamInterface<RoundTripCase> {};

TEST_P(PngRoundTrip, PixelsAndTextSurvive) {
  auto [w, h, c] = GetParam();
  Image im = make_image(w, h, c, unsigned(w * 100 + h * 10 + c));
  im.text = {{"parameters", "a cat on a mat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a"},
             {"prompt", "caf\xC3\xA9 \xE2\x98\x95 \xE6\x97\xA5\xE6\x9C\xAC"},  // café ☕ 日本
             {"empty", ""},
             {"latin", "na\xC3\xAFve"}};
  std::string p = path("out.png");
  diffuse::write_png(p, im);
  EXPECT_FALSE(fs::exists(p + ".tmp"));

  Bytes file = read_bytes(p);
  EXPECT_TRUE(contains(file, std::string("tEXtparameters")));  // ASCII stays tEXt
  EXPECT_TRUE(contains(file, std::string("iTXtprompt")));      // UTF-8 goes to iTXt
  EXPECT_TRUE(contains(file, std::string("iTXtlatin")));

  Image back = diffuse::read_image(p);
  EXPECT_EQ(back.format, "png");
  EXPECT_EQ(back.width, w);
  EXPECT_EQ(back.height, h);
  EXPECT_EQ(back.channels, c);
  EXPECT_EQ(back.pixels, im.pixels);
  EXPECT_EQ(back.text, im.text);
}

INSTANTIATE_TEST_SUITE_P(Sizes, PngRoundTrip,
                         ::testing::Values(RoundTripCase{7, 5, 1}, RoundTripCase{7, 5, 2},
                                           RoundTripCase{7, 5, 3}, RoundTripCase{7, 5, 4},
                                           RoundTripCase{1, 1, 1}, RoundTripCase{1, 1, 2},
                                           RoundTripCase{1, 1, 3}, RoundTripCase{1, 1, 4},
                                           RoundTripCase{33, 1, 3}, RoundTripCase{1, 17, 4}),
                         [](const auto& info) {
                           return std::to_string(info.param.w) + "x" + std::to_string(info.param.h) +
                                  "x" + std::to_string(info.param.c);
                         });

TEST_F(ImageTest, WritePngOverwritesAtomically) {
  std::string p = path("a.png");
  write_bytes(p, {'o', 'l', 'd'});
  diffuse::write_png(p, make_image(3, 2, 3, 1));
  EXPECT_EQ(diffuse::read_image(p).width, 3);
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

TEST_F(ImageTest, WritePngErrorsNameThePath) {
  std::string p = path("missing_dir/x.png");
  std::string e = error_of([&] { diffuse::write_png(p, make_image(2, 2, 3, 1)); });
  EXPECT_NE(e.find(p), std::string::npos) << e;
  EXPECT_NE(e.find("No such file or directory"), std::string::npos) << e;

  std::string q = path("q.png");
  Image five = make_image(2, 2, 3, 1);
  five.channels = 5;
  e = error_of([&] { diffuse::write_png(q, five); });
  EXPECT_EQ(e.rfind(q, 0), 0u) << e;
  EXPECT_NE(e.find("5 channels"), std::string::npos) << e;

  Image short_px = make_image(2, 2, 3, 1);
  short_px.pixels.pop_back();
  e = error_of([&] { diffuse::write_png(q, short_px); });
  EXPECT_NE(e.find("bytes of pixels"), std::string::npos) << e;

  Image bad_key = make_image(2, 2, 3, 1);
  bad_key.text = {{std::string(80, 'k'), "v"}};
  e = error_of([&] { diffuse::write_png(q, bad_key); });
  EXPECT_NE(e.find("1 to 79"), std::string::npos) << e;
  bad_key.text = {{"", "v"}};
  e = error_of([&] { diffuse::write_png(q, bad_key); });
  EXPECT_NE(e.find("1 to 79"), std::string::npos) << e;
  bad_key.text = {{"k\xE2\x98\x95", "v"}};  // ☕ is not Latin-1
  e = error_of([&] { diffuse::write_png(q, bad_key); });
  EXPECT_NE(e.find("Latin-1"), std::string::npos) << e;
  bad_key.text = {{"k", "bad \xC3 utf8"}};
  e = error_of([&] { diffuse::write_png(q, bad_key); });
  EXPECT_NE(e.find("UTF-8"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(q));
  EXPECT_FALSE(fs::exists(q + ".tmp"));
}

TEST_F(ImageTest, LatinOneKeyIsWrittenAsLatinOne) {
  Image im = make_image(2, 2, 1, 3);
  im.text = {{"caf\xC3\xA9", "x"}};  // "café" as UTF-8; the keyword is stored as Latin-1
  std::string p = path("k.png");
  diffuse::write_png(p, im);
  EXPECT_TRUE(contains(read_bytes(p), std::string("tEXtcaf\xE9")));
  EXPECT_EQ(diffuse::read_image(p).text, im.text);
}

// ===== PNG variants written with libpng directly ==============================================

TEST_F(ImageTest, Reads16BitRgbAndGreyAlpha) {
  RawPng r;
  r.width = 3;
  r.height = 2;
  r.bit_depth = 16;
  const uint16_t vals[6][3] = {{0, 0xFFFF, 0x1234}, {0x8000, 0x7FFF, 0x00FF},
                               {0xFF00, 0x0100, 0xABCD}, {1, 2, 3},
                               {0xFFFE, 0x4000, 0xC000}, {0x0080, 0x0180, 0x7F80}};
  for (int y = 0; y < 2; ++y) {
    Bytes row;
    for (int x = 0; x < 3; ++x)
      for (int c = 0; c < 3; ++c) {
        row.push_back(uint8_t(vals[y * 3 + x][c] >> 8));
        row.push_back(uint8_t(vals[y * 3 + x][c]));
      }
    r.rows.push_back(row);
  }
  Bytes b = write_raw_png(r);
  Image im = diffuse::decode_image(b.data(), b.size(), "16.png");
  ASSERT_EQ(im.channels, 3);
  ASSERT_EQ(im.width, 3);
  ASSERT_EQ(im.height, 2);
  for (int i = 0; i < 6; ++i)
    for (int c = 0; c < 3; ++c)
      EXPECT_NEAR(int(im.pixels[i * 3 + c]), vals[i][c] / 257.0, 0.51) << i << "," << c;

  RawPng ga;
  ga.width = 2;
  ga.height = 1;
  ga.bit_depth = 16;
  ga.color_type = PNG_COLOR_TYPE_GRAY_ALPHA;
  ga.rows = {{0xFF, 0xFF, 0x00, 0x00, 0x80, 0x80, 0xFF, 0xFF}};
  b = write_raw_png(ga);
  im = diffuse::decode_image(b.data(), b.size(), "ga16.png");
  ASSERT_EQ(im.channels, 2);
  EXPECT_EQ(im.pixels, (Bytes{255, 0, 128, 255}));
}

TEST_F(ImageTest, ReadsPaletteWithAndWithoutTransparency) {
  RawPng r;
  r.width = 5;
  r.height = 3;
  r.color_type = PNG_COLOR_TYPE_PALETTE;
  r.palette = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {10, 20, 30}};
  for (int y = 0; y < 3; ++y) {
    Bytes row;
    for (int x = 0; x < 5; ++x) row.push_back(uint8_t((x + y) % 4));
    r.rows.push_back(row);
  }
  Bytes b = write_raw_png(r);
  Image im = diffuse::decode_image(b.data(), b.size(), "pal.png");
  ASSERT_EQ(im.channels, 3);
  for (int y = 0; y < 3; ++y)
    for (int x = 0; x < 5; ++x) {
      const png_color& c = r.palette[(x + y) % 4];
      const uint8_t* p = &im.pixels[(y * 5 + x) * 3];
      EXPECT_EQ(p[0], c.red);
      EXPECT_EQ(p[1], c.green);
      EXPECT_EQ(p[2], c.blue);
    }

  r.trns = {0, 128};  // entries 0 and 1 get alpha; 2 and 3 stay opaque
  b = write_raw_png(r);
  im = diffuse::decode_image(b.data(), b.size(), "palt.png");
  ASSERT_EQ(im.channels, 4);
  for (int y = 0; y < 3; ++y)
    for (int x = 0; x < 5; ++x) {
      int idx = (x + y) % 4;
      const uint8_t* p = &im.pixels[(y * 5 + x) * 4];
      EXPECT_EQ(p[0], r.palette[idx].red);
      EXPECT_EQ(p[3], idx == 0 ? 0 : idx == 1 ? 128 : 255);
    }
}

TEST_F(ImageTest, ReadsLowBitDepthGreyAndGreyTrns) {
  RawPng r;
  r.width = 9;  // 9 one-bit pixels: the row spans two bytes
  r.height = 1;
  r.bit_depth = 1;
  r.color_type = PNG_COLOR_TYPE_GRAY;
  r.rows = {{0xA5, 0x80}};  // 1010 0101 1
  Bytes b = write_raw_png(r);
  Image im = diffuse::decode_image(b.data(), b.size(), "g1.png");
  ASSERT_EQ(im.channels, 1);
  EXPECT_EQ(im.pixels, (Bytes{255, 0, 255, 0, 0, 255, 0, 255, 255}));

  RawPng g4;
  g4.width = 2;
  g4.height = 1;
  g4.bit_depth = 4;
  g4.color_type = PNG_COLOR_TYPE_GRAY;
  g4.rows = {{0xF3}};
  g4.trns_grey.gray = 3;
  g4.use_trns_grey = true;
  b = write_raw_png(g4);
  im = diffuse::decode_image(b.data(), b.size(), "g4.png");
  ASSERT_EQ(im.channels, 2);  // tRNS becomes an alpha channel
  EXPECT_EQ(im.pixels, (Bytes{255, 255, 0x33, 0}));
}

TEST_F(ImageTest, ReadsInterlacedPng) {
  Image src = make_image(13, 9, 3, 42);
  RawPng r;
  r.width = 13;
  r.height = 9;
  r.interlace = PNG_INTERLACE_ADAM7;
  for (int y = 0; y < 9; ++y)
    r.rows.emplace_back(src.pixels.begin() + y * 39, src.pixels.begin() + (y + 1) * 39);
  Bytes b = write_raw_png(r);
  Image im = diffuse::decode_image(b.data(), b.size(), "adam7.png");
  EXPECT_EQ(im.width, 13);
  EXPECT_EQ(im.height, 9);
  EXPECT_EQ(im.pixels, src.pixels);
}

TEST_F(ImageTest, CollectsTextBeforeAndAfterIdatAndDecodesLatinOne) {
  RawPng r;
  r.width = 2;
  r.height = 2;
  r.rows = {Bytes(6, 1), Bytes(6, 2)};
  r.text_before = {{"parameters", "steps: 20\nseed: 1"}, {"Comment", "zipped \xE9t\xE9"}};
  r.text_after = {{"after", "written after IDAT"}};
  Bytes b = write_raw_png(r);
  // "after" really follows IDAT in the file.
  std::string bs(b.begin(), b.end());
  ASSERT_NE(bs.find("tEXtafter"), std::string::npos);
  ASSERT_GT(bs.find("tEXtafter"), bs.find("IDAT"));
  Image im = diffuse::decode_image(b.data(), b.size(), "t.png");
  ASSERT_EQ(im.text.size(), 3u);
  EXPECT_EQ(im.text[0], (std::pair<std::string, std::string>{"parameters", "steps: 20\nseed: 1"}));
  EXPECT_EQ(im.text[1].first, "Comment");
  EXPECT_EQ(im.text[1].second, "zipped \xC3\xA9t\xC3\xA9");  // zTXt Latin-1 -> UTF-8
  EXPECT_EQ(im.text[2].first, "after");
  EXPECT_EQ(im.text[2].second, "written after IDAT");
}

// ===== JPEG ==================================================================================

TEST_F(ImageTest, ReadsRgbJpeg) {
  Bytes b = write_jpeg(16, 8, 3, JCS_RGB, solid(16, 8, {200, 40, 90}));
  std::string p = path("photo.jpg");
  write_bytes(p, b);
  Image im = diffuse::read_image(p);
  EXPECT_EQ(im.format, "jpeg");
  EXPECT_EQ(im.width, 16);
  EXPECT_EQ(im.height, 8);
  expect_all_near(im, {200, 40, 90}, 6);
  EXPECT_TRUE(im.text.empty());
}

TEST_F(ImageTest, ReadsOddSizedProgressiveJpeg) {
  Bytes b = write_jpeg(7, 5, 3, JCS_RGB, solid(7, 5, {10, 120, 240}), /*progressive=*/true);
  Image im = diffuse::decode_image(b.data(), b.size(), "prog.jpg");
  EXPECT_EQ(im.width, 7);
  EXPECT_EQ(im.height, 5);
  expect_all_near(im, {10, 120, 240}, 6);
}

TEST_F(ImageTest, ReadsGreyJpegAsOneChannel) {
  Bytes b = write_jpeg(9, 3, 1, JCS_GRAYSCALE, solid(9, 3, {77}));
  Image im = diffuse::decode_image(b.data(), b.size(), "grey.jpg");
  EXPECT_EQ(im.channels, 1);
  expect_all_near(im, {77}, 2);
  Image rgb = diffuse::to_rgb(im);
  expect_all_near(rgb, {77, 77, 77}, 2);
}

TEST_F(ImageTest, ConvertsAdobeCmykJpegToRgb) {
  // libjpeg writes an Adobe marker for CMYK; by that convention values are inverted (255 = no
  // ink). Pure red = no cyan, full magenta and yellow, no black.
  Bytes b = write_jpeg(8, 8, 4, JCS_CMYK, solid(8, 8, {255, 0, 0, 255}));
  Image im = diffuse::decode_image(b.data(), b.size(), "cmyk.jpg");
  EXPECT_EQ(im.channels, 3);
  expect_all_near(im, {255, 0, 0}, 6);
}

TEST_F(ImageTest, DetectsFormatByContentNotExtension) {
  std::string p = path("really_a_jpeg.png");
  write_bytes(p, write_jpeg(4, 4, 3, JCS_RGB, solid(4, 4, {0, 0, 0})));
  EXPECT_EQ(diffuse::read_image(p).format, "jpeg");
}

// ===== to_rgb ================================================================================

TEST(ToRgb, ConvertsEveryChannelCount) {
  Image g;
  g.width = 2;
  g.height = 1;
  g.channels = 1;
  g.pixels = {5, 250};
  g.text = {{"k", "v"}};
  g.format = "png";
  Image r = diffuse::to_rgb(g);
  EXPECT_EQ(r.channels, 3);
  EXPECT_EQ(r.pixels, (Bytes{5, 5, 5, 250, 250, 250}));
  EXPECT_EQ(r.text, g.text);
  EXPECT_EQ(r.format, "png");

  g.channels = 2;
  g.pixels = {5, 0, 250, 255};
  EXPECT_EQ(diffuse::to_rgb(g).pixels, (Bytes{5, 5, 5, 250, 250, 250}));

  g.channels = 4;
  g.pixels = {1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_EQ(diffuse::to_rgb(g).pixels, (Bytes{1, 2, 3, 5, 6, 7}));

  g.channels = 3;
  g.pixels = {1, 2, 3, 4, 5, 6};
  EXPECT_EQ(diffuse::to_rgb(g).pixels, g.pixels);

  g.channels = 3;
  g.pixels = {1, 2, 3};
  EXPECT_THROW(diffuse::to_rgb(g), diffuse::Error);
  g.channels = 0;
  EXPECT_THROW(diffuse::to_rgb(g), diffuse::Error);
}

// ===== bad inputs ============================================================================

TEST_F(ImageTest, TextFileNamedPng) {
  std::string p = path("notes.png");
  write_bytes(p, Bytes{'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd', '\n'});
  EXPECT_EQ(error_of([&] { diffuse::read_image(p); }), p + ": not a PNG or JPEG image");
  Bytes two{'h', 'i'};
  EXPECT_EQ(decode_error(two, "x.png"), "x.png: not a PNG or JPEG image");
}

TEST_F(ImageTest, EmptyAndMissingFiles) {
  std::string p = path("empty.png");
  write_bytes(p, {});
  EXPECT_EQ(error_of([&] { diffuse::read_image(p); }), p + ": empty file");
  EXPECT_EQ(decode_error({}, "mem.png"), "mem.png: empty file");

  std::string m = path("nope.png");
  EXPECT_EQ(error_of([&] { diffuse::read_image(m); }), m + ": cannot open: No such file or directory");

  std::string d = path("adir.png");
  fs::create_directories(d);
  EXPECT_EQ(error_of([&] { diffuse::read_image(d); }), d + ": not a regular file");
}

TEST_F(ImageTest, RefusesHugeFileBeforeReadingIt) {
  std::string p = path("huge.png");
  write_bytes(p, crafted_png(1, 1));
  fs::resize_file(p, (uintmax_t(513) << 20));  // sparse: costs no disk
  std::string e = error_of([&] { diffuse::read_image(p); });
  EXPECT_EQ(e.rfind(p + ": file is ", 0), 0u) << e;
  EXPECT_NE(e.find("512 MiB"), std::string::npos) << e;
}

TEST_F(ImageTest, CraftedPngIsValidWhenSane) {
  // Guard for the crafted-header tests below: the same construction at 1x1 decodes.
  Bytes b = crafted_png(1, 1);
  Image im = diffuse::decode_image(b.data(), b.size(), "ok.png");
  EXPECT_EQ(im.width, 1);
  EXPECT_EQ(im.channels, 3);
}

TEST_F(ImageTest, ZeroSizedPng) {
  for (auto [w, h] : {std::pair<uint32_t, uint32_t>{0, 0}, {0, 5}, {5, 0}}) {
    std::string e = decode_error(crafted_png(w, h), "zero.png");
    EXPECT_EQ(e.rfind("zero.png: ", 0), 0u) << e;
    EXPECT_NE(e.find(std::to_string(w) + "x" + std::to_string(h)), std::string::npos) << e;
    EXPECT_NE(e.find("empty"), std::string::npos) << e;
  }
}

// The header's size is checked before any pixel buffer exists: the exact message below is the
// header check's (decoding 200000² pixels would need 120 GB first).
TEST_F(ImageTest, HugeDeclaredPngRefusedBeforeAllocating) {
  Bytes b = crafted_png(200000, 200000);
  EXPECT_LT(b.size(), 100u);
  std::string p = path("bomb.png");
  write_bytes(p, b);
  std::string e = error_of([&] { diffuse::read_image(p); });
  EXPECT_EQ(e, p + ": PNG declares 200000x200000 pixels; the limit is 16384 per side");

  e = decode_error(crafted_png(16385, 1), "wide.png");
  EXPECT_NE(e.find("wide.png: PNG declares 16385x1 pixels"), std::string::npos) << e;
  e = decode_error(crafted_png(1, 16385), "tall.png");
  EXPECT_NE(e.find("1x16385"), std::string::npos) << e;
  e = decode_error(crafted_png(0x80000000u, 1), "neg.png");  // would be negative as int32
  EXPECT_NE(e.find("2147483648x1"), std::string::npos) << e;
}

TEST_F(ImageTest, TruncatedPngAtManyOffsets) {
  Image src = make_image(20, 10, 4, 9);
  src.text = {{"parameters", "x"}};
  std::string p = path("full.png");
  diffuse::write_png(p, src);
  Bytes full = read_bytes(p);
  size_t idat = find_chunk(full, "IDAT");
  ASSERT_LT(idat, full.size());
  std::vector<size_t> cuts = {1, 4, 7, 8, 12, 20, 32, 33, idat, idat + 4, idat + 8, idat + 20,
                              full.size() - 20, full.size() - 12, full.size() - 4, full.size() - 1};
  for (size_t cut : cuts) {
    ASSERT_LT(cut, full.size());
    Bytes part(full.begin(), full.begin() + cut);
    std::string e = decode_error(part, "cut.png");
    EXPECT_EQ(e.rfind("cut.png: ", 0), 0u) << cut << ": " << e;
    EXPECT_NE(e.find("truncated"), std::string::npos) << cut << ": " << e;
  }
}

TEST_F(ImageTest, CorruptIdat) {
  diffuse::write_png(path("c.png"), make_image(16, 16, 3, 5));
  Bytes good = read_bytes(path("c.png"));
  size_t idat = find_chunk(good, "IDAT");
  ASSERT_LT(idat, good.size());
  uint32_t len = (uint32_t(good[idat]) << 24) | (good[idat + 1] << 16) | (good[idat + 2] << 8) |
                 good[idat + 3];
  ASSERT_GT(len, 8u);

  // 1a: data damaged, CRC left alone -> zlib's checksum or libpng's CRC check, for IDAT.
  Bytes bad = good;
  bad[idat + 8 + len / 2] ^= 0x5A;
  std::string e = decode_error(bad, "crc.png");
  EXPECT_EQ(e.rfind("crc.png: bad PNG: ", 0), 0u) << e;
  EXPECT_NE(e.find("IDAT"), std::string::npos) << e;
  // 1b: data intact, CRC damaged -> libpng's CRC check.
  bad = good;
  bad[idat + 8 + len] ^= 0x01;
  e = decode_error(bad, "crc2.png");
  EXPECT_EQ(e.rfind("crc2.png: bad PNG: ", 0), 0u) << e;
  EXPECT_NE(e.find("CRC"), std::string::npos) << e;

  // 2: garbage deflate data with a correct CRC -> zlib's error, reported for IDAT.
  Bytes body(good.begin() + idat + 4, good.begin() + idat + 8 + len);  // type + data
  for (size_t i = 4 + 2; i < body.size(); ++i) body[i] = uint8_t(0xFF - i);
  Bytes z = good;
  std::copy(body.begin(), body.end(), z.begin() + idat + 4);
  uint32_t crc = uint32_t(crc32(0, body.data(), uInt(body.size())));
  for (int k = 0; k < 4; ++k) z[idat + 8 + len + k] = uint8_t(crc >> (24 - 8 * k));
  e = decode_error(z, "zlib.png");
  EXPECT_EQ(e.rfind("zlib.png: bad PNG: ", 0), 0u) << e;
  EXPECT_NE(e.find("IDAT"), std::string::npos) << e;

  // 3: first chunk is not IHDR.
  Bytes noihdr = png_signature();
  add_chunk(noihdr, "tEXt", Bytes(20, 'a'));
  e = decode_error(noihdr, "noihdr.png");
  EXPECT_EQ(e, "noihdr.png: bad PNG: first chunk is not IHDR");

  // 4: invalid IHDR field (bit depth 3).
  Bytes bad_depth = png_signature();
  add_chunk(bad_depth, "IHDR", ihdr_data(4, 4, 3, 2));
  add_chunk(bad_depth, "IEND", {});
  e = decode_error(bad_depth, "depth.png");
  EXPECT_EQ(e.rfind("depth.png: bad PNG: ", 0), 0u) << e;
}

TEST_F(ImageTest, TruncatedJpeg) {
  Bytes full = write_jpeg(32, 24, 3, JCS_RGB, make_image(32, 24, 3, 2).pixels);
  for (size_t cut : {size_t(3), size_t(4), size_t(20), size_t(100), full.size() / 2,
                     full.size() - 10, full.size() - 1}) {
    Bytes part(full.begin(), full.begin() + cut);
    std::string e = decode_error(part, "cut.jpg");
    EXPECT_EQ(e.rfind("cut.jpg: bad JPEG: ", 0), 0u) << cut << ": " << e;
    EXPECT_NE(e.find("truncated"), std::string::npos) << cut << ": " << e;
  }
}

namespace {
// SOI + SOF0 declaring w x h, 3 components, + SOS: enough for jpeg_read_header to succeed.
Bytes crafted_jpeg(uint16_t w, uint16_t h) {
  Bytes b;
  auto put = [&b](std::initializer_list<int> v) {
    for (int x : v) b.push_back(uint8_t(x));
  };
  put({0xFF, 0xD8, 0xFF, 0xC0, 0, 17, 8, h >> 8, h & 0xFF, w >> 8, w & 0xFF, 3});
  for (int id = 1; id <= 3; ++id) put({id, 0x11, 0});
  put({0xFF, 0xDA, 0, 12, 3, 1, 0x00, 2, 0x11, 3, 0x11, 0, 63, 0});
  for (int i = 0; i < 64; ++i) put({0});
  put({0xFF, 0xD9});
  return b;
}
}  // namespace

TEST_F(ImageTest, HugeDeclaredJpegIsRefused) {
  std::string e = decode_error(crafted_jpeg(65000, 65000), "bomb.jpg");
  EXPECT_EQ(e, "bomb.jpg: JPEG declares 65000x65000 pixels; the limit is 16384 per side");
  e = decode_error(crafted_jpeg(16385, 8), "wide.jpg");
  EXPECT_NE(e.find("16385x8"), std::string::npos) << e;
  // The same crafted header at a sane size gets past the size check and fails later (it has
  // no quantisation or Huffman tables), still as a diffuse::Error.
  e = decode_error(crafted_jpeg(8, 8), "small.jpg");
  EXPECT_EQ(e.rfind("small.jpg: bad JPEG: ", 0), 0u) << e;
}

TEST_F(ImageTest, RandomCorruptionNeverCrashes) {
  Image src = make_image(12, 9, 3, 77);
  src.text = {{"parameters", "hello"}};
  diffuse::write_png(path("r.png"), src);
  std::vector<Bytes> seeds = {read_bytes(path("r.png")),
                              write_jpeg(12, 9, 3, JCS_RGB, src.pixels),
                              write_jpeg(12, 9, 3, JCS_RGB, src.pixels, true)};
  std::mt19937 rng(1234);
  int errors = 0, ok = 0;
  for (const Bytes& seed : seeds) {
    for (int iter = 0; iter < 300; ++iter) {
      Bytes b = seed;
      int flips = 1 + int(rng() % 4);
      for (int k = 0; k < flips; ++k) b[3 + rng() % (b.size() - 3)] = uint8_t(rng());
      if (rng() % 4 == 0) b.resize(3 + rng() % (b.size() - 3));
      try {
        Image im = diffuse::decode_image(b.data(), b.size(), "fuzz");
        ASSERT_EQ(im.pixels.size(), size_t(im.width) * im.height * im.channels);
        ++ok;
      } catch (const diffuse::Error& e) {
        ASSERT_EQ(std::string(e.what()).rfind("fuzz: ", 0), 0u) << e.what();
        ++errors;
      }
    }
  }
  EXPECT_GT(errors, 0);
  EXPECT_EQ(ok + errors, 900);
}

// ===== shared fixtures =======================================================================

TEST(ImageFixtures, ReadsSharedPngs) {
  const std::string root = DIFFUSE_SHARED_DIR;
  int found = 0;
  for (const char* rel : {"/fixtures/sd1/init.png", "/fixtures/sd1-inpaint/mask.png",
                          "/fixtures/sd1-inpaint/init.png", "/fixtures/sd1-controlnet/control.png"}) {
    std::string p = root + rel;
    if (!fs::exists(p)) continue;
    ++found;
    Image im = diffuse::read_image(p);
    EXPECT_EQ(im.format, "png") << p;
    EXPECT_GT(im.width, 0) << p;
    EXPECT_GT(im.height, 0) << p;
    EXPECT_GE(im.channels, 1) << p;
    EXPECT_EQ(im.pixels.size(), size_t(im.width) * im.height * im.channels) << p;
    Image rgb = diffuse::to_rgb(im);
    EXPECT_EQ(rgb.channels, 3);
  }
  if (found == 0) GTEST_SKIP() << "no fixture images under " << root;
}
