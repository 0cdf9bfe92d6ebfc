// Outpainting and A1111's inpainting controls through the binary, on the tiny SD1 model:
// --outpaint makes the init's size plus the padding and keeps the original where the feathered
// mask leaves it (masked img2img, and a 9-channel inpainting model); --inpaint-only-masked pastes back into the init image's size, the rest untouched;
// --masked-content latent-nothing changes only what the mask covers; the PNG parameters carry
// A1111's entries and `diffuse info` reads them back; bad settings exit 1 naming the flag.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "cli_util.h"
#include "io/image.h"

namespace fs = std::filesystem;
using namespace clitest;

namespace {

// The tiny SD1 model: the shared fixtures' copy, else the repository's ("" neither).
const std::string& tiny_model() {
  static const std::string path =
      first_existing({std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1/model/tiny-sd1.safetensors",
                      std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors"});
  return path;
}

bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

diffuse::Image make_image(int w, int h, int channels, unsigned seed) {
  diffuse::Image im;
  im.width = w;
  im.height = h;
  im.channels = channels;
  std::mt19937 g(seed);
  for (int i = 0; i < w * h * channels; ++i) im.pixels.push_back(uint8_t(g() % 256));
  return im;
}

std::string params_of(const diffuse::Image& im) {
  for (const auto& [k, v] : im.text)
    if (k == "parameters") return v;
  return "";
}

uint8_t px(const diffuse::Image& im, int x, int y, int c) { return im.pixels[(size_t(y) * im.width + x) * 3 + c]; }

}  // namespace

TEST(CliInpaint, OutpaintSizeKeptAreaAndParameters) {
  const std::string model = tiny_model();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const fs::path dir = fs::path(temp_dir()) / "outpaint";
  fs::create_directories(dir);
  const diffuse::Image init = make_image(64, 48, 3, 1);
  diffuse::write_png((dir / "init.png").string(), init);
  const std::string out = (dir / "out.png").string();
  Result r = run({"generate", "-m", model, "-p", "a cat", "-i", (dir / "init.png").string(), "--outpaint", "16,8,0,16",
                  "--steps", "2", "-s", "3", "-o", out, "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const diffuse::Image o = diffuse::read_image(out);
  ASSERT_EQ(o.width, 64 + 16 + 8);
  ASSERT_EQ(o.height, 48 + 0 + 16);
  // The mask's black area is the original's shrunk by 2 · 4 on the padded sides: x [24, 72),
  // y [0, 40); blurred (sigma 4: 21 taps) it stays 0 from 11 pixels inside: x [34, 62), y [0, 30),
  // where the result is the init image exactly.
  for (int y = 0; y < 30; ++y)
    for (int x = 34; x < 62; ++x)
      for (int c = 0; c < 3; ++c) ASSERT_EQ(px(o, x, y, c), px(init, x - 16, y, c)) << x << "," << y;
  const std::string p = params_of(o);
  EXPECT_TRUE(has(p, "Size: 88x64")) << p;
  EXPECT_TRUE(has(p, "Mask blur: 4, Masked content: fill, Outpaint: \"16,8,0,16\"")) << p;
  Result info = run({"info", out});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_TRUE(has(info.out, "Masked content: fill")) << info.out;

  // latent-noise runs, differs from fill, same size.
  r = run({"generate", "-m", model, "-p", "a cat", "-i", (dir / "init.png").string(), "--outpaint", "0,0,8,0",
           "--masked-content", "latent-noise", "--mask-blur", "2", "--steps", "2", "-s", "3", "-o", out, "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const diffuse::Image o2 = diffuse::read_image(out);
  EXPECT_EQ(o2.width, 64);
  EXPECT_EQ(o2.height, 56);
  EXPECT_TRUE(has(params_of(o2), "Mask blur: 2, Masked content: latent noise")) << params_of(o2);
}

TEST(CliInpaint, OutpaintWithAnInpaintingModel) {
  // A 9-channel UNet gets the padded image, its mask and the masked image (strength 1 by default).
  const std::string model = first_existing(
      {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1-inpaint/model/tiny-sd1-inpaint.safetensors"});
  if (model.empty()) GTEST_SKIP() << "needs fixtures/sd1-inpaint/model/tiny-sd1-inpaint.safetensors";
  const fs::path dir = fs::path(temp_dir()) / "outpaint9";
  fs::create_directories(dir);
  const diffuse::Image init = make_image(48, 32, 3, 5);
  diffuse::write_png((dir / "init.png").string(), init);
  const std::string out = (dir / "out.png").string();
  Result r = run({"generate", "-m", model, "-p", "a cat", "-i", (dir / "init.png").string(), "--outpaint", "16,16,8,8",
                  "--mask-blur", "1", "--steps", "2", "-s", "4", "-o", out, "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const diffuse::Image o = diffuse::read_image(out);
  ASSERT_EQ(o.width, 80);
  ASSERT_EQ(o.height, 48);
  // Mask black over x [18, 62), y [10, 38) (shrunk by 2); blur 1 (7 taps) reaches 3 pixels: the
  // init image exactly over x [21, 59), y [13, 35).
  for (int y = 13; y < 35; ++y)
    for (int x = 21; x < 59; ++x)
      for (int c = 0; c < 3; ++c) ASSERT_EQ(px(o, x, y, c), px(init, x - 16, y - 8, c)) << x << "," << y;
  EXPECT_TRUE(has(params_of(o), "Denoising strength: 1, Mask blur: 1, Masked content: fill")) << params_of(o);
}

TEST(CliInpaint, OnlyMaskedPastesBackAndLatentNothing) {
  const std::string model = tiny_model();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const fs::path dir = fs::path(temp_dir()) / "inpaint-controls";
  fs::create_directories(dir);
  const diffuse::Image init = make_image(64, 48, 3, 2);
  diffuse::write_png((dir / "init.png").string(), init);
  diffuse::Image mask = make_image(64, 48, 1, 0);
  for (int y = 0; y < 48; ++y)
    for (int x = 0; x < 64; ++x) mask.pixels[size_t(y) * 64 + x] = x >= 40 && x < 48 && y >= 8 && y < 16 ? 255 : 0;
  diffuse::write_png((dir / "mask.png").string(), mask);
  const std::string out = (dir / "out.png").string();
  Result r = run({"generate", "-m", model, "-p", "a cat", "-i", (dir / "init.png").string(), "--mask",
                  (dir / "mask.png").string(), "--inpaint-only-masked", "--only-masked-padding", "4", "-W", "32", "-H",
                  "32", "--steps", "2", "-s", "3", "-o", out, "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const diffuse::Image o = diffuse::read_image(out);
  ASSERT_EQ(o.width, 64);
  ASSERT_EQ(o.height, 48);
  // The box: [40, 48) x [8, 16) grown by 4 -> [36, 52) x [4, 20), already square as 32x32.
  int changed = 0;
  for (int y = 0; y < 48; ++y)
    for (int x = 0; x < 64; ++x)
      for (int c = 0; c < 3; ++c) {
        if (!(x >= 36 && x < 52 && y >= 4 && y < 20)) ASSERT_EQ(px(o, x, y, c), px(init, x, y, c)) << x << "," << y;
        if (x >= 40 && x < 48 && y >= 8 && y < 16) changed += px(o, x, y, c) != px(init, x, y, c);
      }
  EXPECT_GT(changed, 0);
  const std::string p = params_of(o);
  EXPECT_TRUE(has(p, "Size: 32x32")) << p;
  EXPECT_TRUE(has(p, "Inpaint area: Only masked, Masked area padding: 4")) << p;

  // latent-nothing replaces the init latent only under the mask: an all-black mask gives the same
  // pixels as "original", an all-white one does not.
  auto run_fill = [&](uint8_t v, const std::string& content) {
    diffuse::Image m = make_image(64, 48, 1, 0);
    std::fill(m.pixels.begin(), m.pixels.end(), v);
    diffuse::write_png((dir / "m.png").string(), m);
    Result rr = run({"generate", "-m", model, "-p", "a cat", "-i", (dir / "init.png").string(), "--mask",
                     (dir / "m.png").string(), "--masked-content", content, "--steps", "2", "-s", "3", "-o", out, "-q"});
    EXPECT_EQ(rr.exit_code, 0) << rr.err;
    return diffuse::read_image(out);
  };
  const diffuse::Image black_orig = run_fill(0, "original"), black_nothing = run_fill(0, "latent-nothing");
  EXPECT_EQ(black_orig.pixels, black_nothing.pixels);
  EXPECT_TRUE(has(params_of(black_nothing), "Masked content: latent nothing")) << params_of(black_nothing);
  const diffuse::Image white_orig = run_fill(255, "original"), white_nothing = run_fill(255, "latent-nothing");
  EXPECT_NE(white_orig.pixels, white_nothing.pixels);
}

TEST(CliInpaint, BadSettingsExit1NamingTheFlag) {
  const std::string model = tiny_model();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const fs::path dir = fs::path(temp_dir()) / "inpaint-bad";
  fs::create_directories(dir);
  diffuse::write_png((dir / "init.png").string(), make_image(64, 48, 3, 1));
  const std::string init = (dir / "init.png").string(), out = (dir / "x.png").string();
  const struct {
    std::vector<std::string> args;
    std::string what;
  } cases[] = {
      {{"-i", init, "--outpaint", "-8,0,0,0"}, "--outpaint -8,0,0,0: padding must be >= 0"},
      {{"-i", init, "--outpaint", "8,8"}, "--outpaint 8,8: expected L,R,T,B"},
      {{"--outpaint", "8,0,0,0"}, "--outpaint needs an init image"},
      {{"-i", init, "--outpaint", "8,0,0,0", "-W", "64"}, "-W/--width, -H/--height do not apply with --outpaint"},
      {{"-i", init, "--outpaint", "4,0,0,0"}, "multiples of 8"},
      {{"-i", init, "--mask-blur", "4"}, "--mask-blur needs a mask"},
      {{"-i", init, "--mask", init, "--masked-content", "blue"}, "--masked-content blue: unknown"},
      {{"-i", init, "--mask", init, "--inpaint-only-masked", "--only-masked-padding", "999"}, "--only-masked-padding 999"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args = {"generate", "-m", model, "-p", "x", "--steps", "1", "-o", out};
    args.insert(args.end(), c.args.begin(), c.args.end());
    Result r = run(args);
    EXPECT_EQ(r.exit_code, 1) << c.what << "\n" << r.err;
    EXPECT_TRUE(has(r.err, c.what)) << r.err;
    EXPECT_FALSE(fs::exists(out));
  }
  Result help = run({"generate", "--help"});
  ASSERT_EQ(help.exit_code, 0);
  for (const char* flag : {"--outpaint", "--mask-blur", "--invert-mask", "--masked-content", "--inpaint-only-masked",
                           "--only-masked-padding"})
    EXPECT_TRUE(has(help.out, flag)) << flag;
}
