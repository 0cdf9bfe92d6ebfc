// `diffuse upscale`: a tiny random RRDBNet written here (Real-ESRGAN names, safetensors; BasicSR
// params_ema .pth), output sizes and formats, tiling flags, and bad input (exit 1, one line).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../common/torch_pth.h"
#include "cli_util.h"
#include "core/tensor.h"
#include "io/image.h"
#include "io/tensor_file.h"

using namespace clitest;

namespace {

// nf 8, grow 4, one block, x4 (two upsamples); the Real-ESRGAN names.
std::vector<torch_pth::Tensor> tiny_rrdbnet() {
  std::mt19937 g(7);
  std::vector<torch_pth::Tensor> ts;
  auto conv = [&](const std::string& name, int in, int out) {
    std::uniform_real_distribution<float> d(-std::sqrt(3.0f / float(9 * in)), std::sqrt(3.0f / float(9 * in)));
    torch_pth::Tensor w{name + ".weight", {out, in, 3, 3}, std::vector<float>(size_t(out * in * 9))};
    for (float& v : w.values) v = d(g);
    ts.push_back(w);
    ts.push_back({name + ".bias", {out}, std::vector<float>(size_t(out), 0.01f)});
  };
  conv("conv_first", 3, 8);
  for (int k = 1; k <= 3; ++k)
    for (int m = 1; m <= 5; ++m) conv("body.0.rdb" + std::to_string(k) + ".conv" + std::to_string(m), 8 + (m - 1) * 4, m == 5 ? 8 : 4);
  for (const char* n : {"conv_body", "conv_up1", "conv_up2", "conv_hr"}) conv(n, 8, 8);
  conv("conv_last", 8, 3);
  return ts;
}

std::string model_st() {
  static const std::string path = [] {
    std::vector<std::pair<std::string, diffuse::Tensor>> ts;
    for (const torch_pth::Tensor& t : tiny_rrdbnet()) {
      diffuse::Tensor x = diffuse::Tensor::empty(diffuse::Shape(t.shape));
      std::copy(t.values.begin(), t.values.end(), x.f32());
      ts.emplace_back(t.name, x);
    }
    const std::string p = temp_dir() + "/tiny_x4.safetensors";
    diffuse::save_safetensors(p, ts);
    return p;
  }();
  return path;
}

std::string input_png() {
  static const std::string path = [] {
    diffuse::Image im;
    im.width = 13, im.height = 11, im.channels = 3;
    for (int i = 0; i < 13 * 11 * 3; ++i) im.pixels.push_back(uint8_t((i * 37) % 256));
    im.text = {{"parameters", "a lighthouse\nSteps: 20, Seed: 1"}};
    const std::string p = temp_dir() + "/in.png";
    diffuse::write_png(p, im);
    return p;
  }();
  return path;
}

void expect_fails(const std::vector<std::string>& args, const std::string& keyword) {
  const Result r = run(args);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find(keyword), std::string::npos) << "missing '" << keyword << "' in: " << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(r.err.find("diffuse: error: "), 0u) << r.err;
}

TEST(CliUpscale, X4PngWithProgressAndTags) {
  const std::string out = temp_dir() + "/out4.png";
  const Result r = run({"upscale", "-m", model_st(), "-i", input_png(), "-o", out, "--tile", "8", "--tile-overlap", "4", "-t", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("tile 4/4"), std::string::npos) << r.err;  // 13×11 in 8-px tiles: 2×2
  EXPECT_NE(r.err.find("13x11 -> 52x44"), std::string::npos) << r.err;
  const diffuse::Image im = diffuse::read_image(out);
  EXPECT_EQ(im.width, 52);
  EXPECT_EQ(im.height, 44);
  EXPECT_EQ(im.channels, 3);
  bool params = false, post = false;
  for (const auto& [k, v] : im.text) {
    params |= k == "parameters" && v.find("a lighthouse") == 0;
    post |= k == "postprocessing" && v == "Postprocess upscale by: 4, Postprocess upscaler: tiny_x4";
  }
  EXPECT_TRUE(params);
  EXPECT_TRUE(post);
  // The same model as a BasicSR .pth (params_ema), untiled: the same image (the tiny net's
  // receptive field is 21 px, so 4 px of overlap can change pixels near the seams, but not many).
  const std::string pth = temp_dir() + "/RealESRGAN_tiny.pth";
  torch_pth::write(pth, {{"params_ema", tiny_rrdbnet()}});
  const std::string out2 = temp_dir() + "/out4b.png";
  const Result r2 = run({"upscale", "-m", pth, "-i", input_png(), "-o", out2, "--tile", "0", "-q"});
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  EXPECT_EQ(r2.err, "");
  const diffuse::Image im2 = diffuse::read_image(out2);
  ASSERT_EQ(im2.pixels.size(), im.pixels.size());
  size_t differ = 0;
  for (size_t i = 0; i < im.pixels.size(); ++i) differ += im.pixels[i] != im2.pixels[i];
  EXPECT_LT(differ, im.pixels.size() / 2);
}

TEST(CliUpscale, ScaleAndJpeg) {
  const std::string out = temp_dir() + "/out2.jpg";
  const Result r = run({"upscale", "-m", model_st(), "-i", input_png(), "-o", out, "--scale", "2", "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const diffuse::Image im = diffuse::read_image(out);
  EXPECT_EQ(im.format, "jpeg");
  EXPECT_EQ(im.width, 26);
  EXPECT_EQ(im.height, 22);
  const std::string out3 = temp_dir() + "/out3.png";
  ASSERT_EQ(run({"upscale", "-m", model_st(), "-i", input_png(), "-o", out3, "--scale", "1.5", "-q"}).exit_code, 0);
  const diffuse::Image im3 = diffuse::read_image(out3);
  EXPECT_EQ(im3.width, 20);  // round(13 · 1.5) = 19.5 -> 20
  EXPECT_EQ(im3.height, 17);
}

TEST(CliUpscale, HelpListsEveryFlag) {
  const Result r = run({"upscale", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  for (const char* flag : {"-m,--model", "-i,--input", "-o,--output", "--scale", "--tile", "--tile-overlap",
                           "-t,--threads", "--precision", "-q,--quiet"})
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag << " missing from:\n" << r.out;
}

TEST(CliUpscale, BadInputExitsOneWithOneLine) {
  const std::string out = temp_dir() + "/bad.png";
  const std::string d = temp_dir();
  expect_fails({"upscale", "-m", d + "/nope.pth", "-i", input_png(), "-o", out}, "nope.pth");
  expect_fails({"upscale", "-m", model_st(), "-i", d + "/nope.png", "-o", out}, "nope.png");
  expect_fails({"upscale", "-i", input_png(), "-o", out}, "--model");
  // A LoRA given as the upscaler.
  std::vector<std::pair<std::string, diffuse::Tensor>> lora = {
      {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", diffuse::Tensor::zeros({4, 320})},
      {"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", diffuse::Tensor::zeros({320, 4})}};
  const std::string lora_path = d + "/style.safetensors";
  diffuse::save_safetensors(lora_path, lora);
  expect_fails({"upscale", "-m", lora_path, "-i", input_png(), "-o", out}, lora_path + ": not an ESRGAN / Real-ESRGAN upscaler (RRDBNet)");
  // A corrupt model file.
  write_file(d + "/corrupt.pth", "PK\x03\x04garbage");
  expect_fails({"upscale", "-m", d + "/corrupt.pth", "-i", input_png(), "-o", out}, "corrupt.pth");
  expect_fails({"upscale", "-m", model_st(), "-i", input_png(), "-o", d + "/out.bmp"}, "unknown image type");
  expect_fails({"upscale", "-m", model_st(), "-i", input_png(), "-o", d}, "is a folder");
  expect_fails({"upscale", "-m", model_st(), "-i", input_png(), "-o", out, "--tile", "-1"}, "--tile");
  expect_fails({"upscale", "-m", model_st(), "-i", input_png(), "-o", out, "--tile-overlap", "-3"}, "--tile-overlap");
  expect_fails({"upscale", "-m", model_st(), "-i", input_png(), "-o", out, "--scale", "0"}, "--scale");
  expect_fails({"upscale", "-m", model_st(), "-i", input_png(), "-o", out, "--scale", "5000"}, "--scale");
  expect_fails({"upscale", "-m", model_st(), "-i", input_png(), "-o", out, "--precision", "fp8"}, "--precision");
  expect_fails({"upscale", "-m", model_st(), "-i", model_st(), "-o", out}, "tiny_x4.safetensors");  // not an image
  EXPECT_FALSE(std::ifstream(out).good()) << "a failed run left " << out;
}

}  // namespace
