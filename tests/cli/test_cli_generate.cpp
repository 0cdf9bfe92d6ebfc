// `diffuse generate` end to end against diffusers: the tiny sd1 model at 64×64, 5 steps, seed 42
// on the torch CPU generator reproduces diffusers' final latents (1e-3 relative to their
// magnitude) and images (2/255) for txt2img with each sampler, img2img, and inpainting with a
// 4-channel and a 9-channel UNet. Also: the PNG `parameters` chunk, flag errors, repeated flags,
// batch file naming and per-image seeds of the CUDA generator.
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>

#include "cli_util.h"

using namespace clitest;
using nlohmann::json;

namespace {

std::string data(const std::string& rel) {
  return first_existing({std::string(DIFFUSE_SHARED_DIR) + "/fixtures/" + rel, std::string(DIFFUSE_TEST_DATA) + "/" + rel});
}
std::string sd1_model() { return data("sd1/model/tiny-sd1.safetensors"); }

// ---- minimal readers (the test links no diffuse library) ----

struct F32 {
  std::vector<int64_t> shape;
  std::vector<float> v;
};

// All F32 tensors of a safetensors file by name.
std::map<std::string, F32> read_safetensors(const std::string& path) {
  std::string b = slurp(path);
  std::map<std::string, F32> out;
  if (b.size() < 8) return out;
  uint64_t n = 0;
  std::memcpy(&n, b.data(), 8);
  json h = json::parse(b.substr(8, size_t(n)));
  for (auto& [name, e] : h.items()) {
    if (name == "__metadata__" || e["dtype"] != "F32") continue;
    F32 t;
    t.shape = e["shape"].get<std::vector<int64_t>>();
    size_t a = e["data_offsets"][0], z = e["data_offsets"][1];
    t.v.resize((z - a) / 4);
    std::memcpy(t.v.data(), b.data() + 8 + n + a, z - a);
    out[name] = std::move(t);
  }
  return out;
}

// 8-bit RGB/RGBA/grey PNG, non-interlaced -> HWC bytes (what write_png produces).
struct Png {
  int w = 0, h = 0, channels = 0;
  std::vector<uint8_t> px;
};
Png read_png(const std::string& path) {
  std::string b = slurp(path);
  Png p;
  if (b.size() < 8 || b.compare(1, 3, "PNG") != 0) return p;
  auto be32 = [&](size_t o) {
    return uint32_t(uint8_t(b[o])) << 24 | uint32_t(uint8_t(b[o + 1])) << 16 | uint32_t(uint8_t(b[o + 2])) << 8 |
           uint8_t(b[o + 3]);
  };
  std::string idat;
  int color = 0, depth = 0, interlace = 0;
  for (size_t o = 8; o + 8 <= b.size();) {
    uint32_t len = be32(o);
    std::string type = b.substr(o + 4, 4);
    if (type == "IHDR") {
      p.w = int(be32(o + 8));
      p.h = int(be32(o + 12));
      depth = uint8_t(b[o + 16]);
      color = uint8_t(b[o + 17]);
      interlace = uint8_t(b[o + 20]);
    } else if (type == "IDAT") {
      idat += b.substr(o + 8, len);
    }
    o += 12 + len;
  }
  p.channels = color == 2 ? 3 : color == 6 ? 4 : color == 0 ? 1 : color == 4 ? 2 : 0;
  if (depth != 8 || interlace != 0 || p.channels == 0) return Png{};
  const size_t stride = size_t(p.w) * size_t(p.channels);
  std::vector<uint8_t> raw((stride + 1) * size_t(p.h));
  uLongf rl = uLongf(raw.size());
  if (uncompress(raw.data(), &rl, reinterpret_cast<const Bytef*>(idat.data()), uLong(idat.size())) != Z_OK) return Png{};
  p.px.assign(stride * size_t(p.h), 0);
  const int bpp = p.channels;
  for (int y = 0; y < p.h; ++y) {
    const uint8_t* in = raw.data() + size_t(y) * (stride + 1);
    uint8_t* cur = p.px.data() + size_t(y) * stride;
    const uint8_t* prev = y > 0 ? cur - stride : nullptr;
    for (size_t x = 0; x < stride; ++x) {
      int a = x >= size_t(bpp) ? cur[x - bpp] : 0, u = prev ? prev[x] : 0, c = prev && x >= size_t(bpp) ? prev[x - bpp] : 0;
      int f = in[0], v = in[1 + x], pred = 0;
      if (f == 1) pred = a;
      else if (f == 2) pred = u;
      else if (f == 3) pred = (a + u) / 2;
      else if (f == 4) {
        int pp = a + u - c, pa = std::abs(pp - a), pb = std::abs(pp - u), pc = std::abs(pp - c);
        pred = (pa <= pb && pa <= pc) ? a : (pb <= pc ? u : c);
      }
      cur[x] = uint8_t(v + pred);
    }
  }
  return p;
}

std::vector<std::string> base_args(const std::string& model, const std::string& out) {
  return {"generate", "-m", model, "-p", "a photograph of an astronaut riding a horse", "-n", "blurry, low quality",
          "--rng", "cpu", "-s", "42", "-W", "64", "-H", "64", "--steps", "5", "--cfg-scale", "7.5",
          "--precision", "fp32", "-t", "2", "-o", out + ".png", "--save-latent", out + ".safetensors"};
}

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& more) {
  a.insert(a.end(), more.begin(), more.end());
  return a;
}

// Compares the run's latent and PNG with `key`.latent / `key`.image of `ref_file`.
void expect_matches(const std::string& out, const std::string& ref_file, const std::string& key, int batch_index = 0) {
  auto refs = read_safetensors(ref_file);
  ASSERT_TRUE(refs.count(key + ".latent")) << key << " not in " << ref_file;
  const F32& ref = refs[key + ".latent"];
  auto got = read_safetensors(out + ".safetensors");
  ASSERT_TRUE(got.count("latent")) << "no 'latent' in " << out << ".safetensors";
  const F32& lat = got["latent"];
  ASSERT_EQ(lat.shape.size(), 4u);
  ASSERT_EQ(lat.shape[1], ref.shape[1]);
  ASSERT_EQ(lat.shape[2], ref.shape[2]);
  ASSERT_EQ(lat.shape[3], ref.shape[3]);
  const size_t n = ref.v.size();
  ASSERT_GE(lat.v.size(), (size_t(batch_index) + 1) * n);
  double maxref = 0, maxd = 0;
  for (size_t i = 0; i < n; ++i) {
    maxref = std::max(maxref, double(std::fabs(ref.v[i])));
    maxd = std::max(maxd, double(std::fabs(lat.v[size_t(batch_index) * n + i] - ref.v[i])));
  }
  const double tol = 1e-3 * std::max(1.0, maxref);
  std::printf("[ %s ] latent max|d| = %.3g (bound %.3g, max|ref| %.3g)\n", key.c_str(), maxd, tol, maxref);
  EXPECT_LE(maxd, tol) << key;

  const F32& img = refs[key + ".image"];
  std::string png = batch_index == 0 ? out + ".png" : out + "_" + std::to_string(batch_index) + ".png";
  Png p = read_png(png);
  ASSERT_EQ(p.channels, 3) << png;
  ASSERT_EQ(size_t(p.w) * size_t(p.h) * 3, img.v.size());
  double maxi = 0;
  for (size_t i = 0; i < img.v.size(); ++i) maxi = std::max(maxi, std::fabs(p.px[i] / 255.0 - img.v[i]));
  std::printf("[ %s ] image max|d| = %.2f/255 (bound 2/255)\n", key.c_str(), maxi * 255);
  EXPECT_LE(maxi, 2.0 / 255 + 1e-6) << key;
}

std::string tmp(const std::string& name) { return temp_dir() + "/" + name; }

#define NEED_SD1()                                                                        \
  std::string model = sd1_model(), pipes = data("sd1/pipelines.safetensors");             \
  if (model.empty() || pipes.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors and sd1/pipelines.safetensors"

std::string parameters_of(const std::string& png) {
  Result r = run({"info", "--json", png});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out, nullptr, false);
  if (!j.is_object() || !j["text"].contains("parameters")) return "";
  return j["text"]["parameters"].get<std::string>();
}

// A run that must fail: exit 1, one line on stderr containing every needle.
void expect_flag_error(const std::vector<std::string>& args, const std::vector<std::string>& needles) {
  Result r = run(args);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(r.signal, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  for (const std::string& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "'" << n << "' not in: " << r.err;
}

}  // namespace

// ---- txt2img, every sampler with a reference ----

struct SamplerCase {
  const char* key;  // txt2img.<key>
  std::vector<std::string> flags;
};

void PrintTo(const SamplerCase& c, std::ostream* os) { *os << c.key; }

class Txt2Img : public ::testing::TestWithParam<SamplerCase> {};

TEST_P(Txt2Img, MatchesDiffusers) {
  NEED_SD1();
  const SamplerCase& c = GetParam();
  std::string out = tmp(std::string("t2i_") + c.key);
  Result r = run(with(base_args(model, out), c.flags));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(out, pipes, std::string("txt2img.") + c.key);
}

INSTANTIATE_TEST_SUITE_P(
    Samplers, Txt2Img,
    ::testing::Values(SamplerCase{"euler", {"--sampler", "euler"}}, SamplerCase{"euler_a", {"--sampler", "euler_a"}},
                      SamplerCase{"ddim", {"--sampler", "ddim"}}, SamplerCase{"pndm", {"--sampler", "pndm"}},
                      SamplerCase{"euler_trailing", {"--sampler", "euler", "--scheduler", "trailing"}},
                      SamplerCase{"euler_karras", {"--sampler", "euler", "--scheduler", "karras"}},
                      SamplerCase{"heun", {"--sampler", "heun"}}, SamplerCase{"lms", {"--sampler", "lms"}},
                      SamplerCase{"kdpm2", {"--sampler", "dpm2"}}, SamplerCase{"dpmpp_2m", {"--sampler", "dpm++2m"}},
                      SamplerCase{"dpmpp_2m_karras", {"--sampler", "dpm++2m", "--scheduler", "karras"}},
                      SamplerCase{"dpmpp_2m_sde_karras", {"--sampler", "dpm++2m_sde", "--scheduler", "karras"}},
                      SamplerCase{"dpmpp_2s", {"--sampler", "dpm++2s"}}, SamplerCase{"unipc", {"--sampler", "unipc"}}),
    [](const ::testing::TestParamInfo<SamplerCase>& i) { return std::string(i.param.key); });

TEST(Generate, NoNegativePrompt) {
  NEED_SD1();
  std::vector<std::string> a = base_args(model, tmp("noneg"));
  a.erase(a.begin() + 5, a.begin() + 7);  // drop -n NEG
  Result r = run(with(a, {"--sampler", "euler"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(tmp("noneg"), pipes, "txt2img.euler.noneg");
}

// --preview-every: the live preview (the server's progress image) written during sampling, at the
// latent's size; --preview-file alone is refused.
TEST(Generate, PreviewEveryWritesTheLatentPreview) {
  NEED_SD1();
  const std::string out = tmp("preview");
  Result r = run(with(base_args(model, out), {"--sampler", "euler", "--preview-every", "2"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Png p = read_png(out + ".preview.png");
  EXPECT_EQ(p.w, 8);
  EXPECT_EQ(p.h, 8);
  EXPECT_EQ(p.channels, 3);
  ASSERT_FALSE(p.px.empty());
  EXPECT_NE(*std::min_element(p.px.begin(), p.px.end()), *std::max_element(p.px.begin(), p.px.end()));
  r = run(with(base_args(model, out), {"--preview-file", out + ".p.png"}));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--preview-every"), std::string::npos) << r.err;
}

TEST(Generate, GuidanceOneSkipsUnconditional) {
  NEED_SD1();
  Result r = run(with(base_args(model, tmp("cfg1")), {"--sampler", "euler", "--cfg-scale", "1"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(tmp("cfg1"), pipes, "txt2img.euler.cfg1");
}

// ---- img2img and inpainting ----

TEST(Generate, Img2ImgDdimAndEuler) {
  NEED_SD1();
  std::string init = data("sd1/init.png");
  if (init.empty()) GTEST_SKIP() << "needs sd1/init.png";
  for (const char* s : {"ddim", "euler"}) {
    std::string out = tmp(std::string("i2i_") + s);
    Result r = run(with(base_args(model, out), {"--sampler", s, "-i", init, "--strength", "0.6", "--steps", "10"}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    expect_matches(out, pipes, std::string("img2img.") + s);
  }
}

TEST(Generate, Inpaint4ChannelEuler) {
  NEED_SD1();
  std::string ref = data("sd1/inpaint4.safetensors"), init = data("sd1-inpaint/init.png"),
              mask = data("sd1-inpaint/mask.png");
  if (ref.empty() || init.empty() || mask.empty()) GTEST_SKIP() << "needs sd1/inpaint4.safetensors and sd1-inpaint/*.png";
  std::string out = tmp("inpaint4");
  Result r = run(with(base_args(model, out),
                      {"--sampler", "euler", "-i", init, "--mask", mask, "--strength", "0.75", "--steps", "10"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(out, ref, "inpaint4.euler");
}

TEST(Generate, Inpaint9ChannelDdim) {
  std::string model = first_existing({std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1-inpaint/model/tiny-sd1-inpaint.safetensors"});
  std::string ref = data("sd1-inpaint/inpaint.safetensors"), init = data("sd1-inpaint/init.png"),
              mask = data("sd1-inpaint/mask.png");
  if (model.empty() || ref.empty() || init.empty() || mask.empty())
    GTEST_SKIP() << "needs ../shared/fixtures/sd1-inpaint (model, inpaint.safetensors, init.png, mask.png)";
  std::string out = tmp("inpaint9");
  // Strength defaults to 1 for a 9-channel model.
  Result r = run(with(base_args(model, out), {"--sampler", "ddim", "-i", init, "--mask", mask}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(out, ref, "inpaint.ddim");
}

// ---- PNG metadata, batches, repeated flags ----

TEST(Generate, ParametersChunkAndBatchNaming) {
  NEED_SD1();
  std::string out = tmp("batch");
  Result r = run(with(base_args(model, out), {"--sampler", "euler", "-b", "2", "--clip-skip", "2"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find(out + ".png"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(out + "_1.png"), std::string::npos) << r.out;
  EXPECT_FALSE(read_png(out + "_1.png").px.empty());
  EXPECT_TRUE(slurp(out + "_2.png").empty());
  auto lat = read_safetensors(out + ".safetensors");
  ASSERT_TRUE(lat.count("latent"));
  EXPECT_EQ(lat["latent"].shape, (std::vector<int64_t>{2, 4, 8, 8}));

  std::string p0 = parameters_of(out + ".png"), p1 = parameters_of(out + "_1.png");
  std::printf("parameters:\n%s\n", p1.c_str());
  EXPECT_EQ(p0.rfind("a photograph of an astronaut riding a horse\nNegative prompt: blurry, low quality\nSteps: 5, ", 0), 0u)
      << p0;
  for (const char* s : {"Sampler: Euler,", "CFG scale: 7.5,", "Seed: 42,", "Size: 64x64,", "Model: tiny-sd1,",
                        "Clip skip: 2", "Batch size: 2, Batch pos: 1", "Version: diffuse "})
    EXPECT_NE(p0.find(s), std::string::npos) << "'" << s << "' not in: " << p0;
  EXPECT_NE(p1.find("Batch pos: 2"), std::string::npos) << p1;
  EXPECT_EQ(p0.find("Denoising strength"), std::string::npos) << p0;
  // Model hash: the first 10 hex digits of the file's SHA-256, as sha256sum computes it.
  std::smatch m;
  ASSERT_TRUE(std::regex_search(p0, m, std::regex("Model hash: ([0-9a-f]{10}),"))) << p0;
  FILE* f = popen(("sha256sum '" + model + "' 2>/dev/null").c_str(), "r");
  if (f) {
    char buf[80] = {0};
    size_t n = fread(buf, 1, 64, f);
    pclose(f);
    if (n == 64) {
      EXPECT_EQ(m[1].str(), std::string(buf, 10));
    }
  }
}

TEST(Generate, CpuBatchFirstImageEqualsSingleRun) {
  // One (2, 4, 8, 8) draw: its first half is the (1, 4, 8, 8) draw, and euler draws nothing more.
  NEED_SD1();
  std::string out = tmp("batch_cpu");
  Result r = run(with(base_args(model, out), {"--sampler", "euler", "-b", "2", "--quiet"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;  // --quiet
  expect_matches(out, pipes, "txt2img.euler", 0);
}

TEST(Generate, CudaRngImageIUsesSeedPlusI) {
  NEED_SD1();
  std::string a = tmp("cuda_b2"), b = tmp("cuda_43");
  std::vector<std::string> common = {"--sampler", "euler_a", "--rng", "cuda"};
  Result ra = run(with(with(base_args(model, a), common), {"-b", "2"}));
  Result rb = run(with(with(base_args(model, b), common), {"-s", "43"}));
  ASSERT_EQ(ra.exit_code, 0) << ra.err;
  ASSERT_EQ(rb.exit_code, 0) << rb.err;
  auto la = read_safetensors(a + ".safetensors")["latent"].v, lb = read_safetensors(b + ".safetensors")["latent"].v;
  ASSERT_EQ(la.size(), 2 * lb.size());
  double d = 0;
  for (size_t i = 0; i < lb.size(); ++i) d = std::max(d, double(std::fabs(la[lb.size() + i] - lb[i])));
  std::printf("cuda rng: batch image 2 vs seed 43 alone: max|d| = %.3g\n", d);
  EXPECT_LE(d, 1e-4);
  EXPECT_NE(parameters_of(a + "_1.png").find("Seed: 43,"), std::string::npos);
}

TEST(Generate, FlagGivenTwiceTakesLast) {
  NEED_SD1();
  std::string out = tmp("twice");
  Result r = run(with(base_args(model, out), {"--sampler", "ddim", "--sampler", "euler", "-s", "7", "-s", "42"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(out, pipes, "txt2img.euler");
}

// ---- flag errors: exit 1, one line naming the flag ----

TEST(GenerateErrors, EachNamesTheFlag) {
  std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  std::string init = data("sd1/init.png"), mask = data("sd1-inpaint/mask.png");
  std::vector<std::string> g = {"generate", "-m", model, "-p", "x", "--steps", "1", "-o", tmp("err.png")};
  expect_flag_error(with(g, {"-W", "65"}), {"-W/--width", "multiple of 8"});
  expect_flag_error(with(g, {"-H", "100"}), {"-H/--height", "multiple of 8"});
  expect_flag_error(with(g, {"--sampler", "nope"}), {"--sampler", "nope", "euler_a"});
  expect_flag_error(with(g, {"--scheduler", "nope"}), {"--scheduler", "karras"});
  expect_flag_error(with(g, {"--rng", "gpu"}), {"--rng", "cpu, cuda"});
  expect_flag_error(with(g, {"--precision", "fp8"}), {"--precision", "fp32, bf16, auto"});
  expect_flag_error(with(g, {"--weights", "int4"}), {"--weights", "int4", "native, int8"});
  expect_flag_error(with(g, {"--prediction", "x"}), {"--prediction", "eps, v"});
  expect_flag_error({"generate", "-m", tmp("missing.safetensors"), "-p", "x"}, {"-m/--model", "no such file"});
  expect_flag_error({"generate", "-m", model, "-o", tmp("no/such/dir/x.png")}, {"-o/--output", "does not exist"});
  expect_flag_error(with(g, {"--strength", "0.5"}), {"--strength", "-i/--init"});
  expect_flag_error(with(g, {"--mask", mask.empty() ? "m.png" : mask}), {"--mask", "-i/--init"});
  if (!init.empty()) {
    expect_flag_error(with(g, {"-i", init, "--strength", "1.5"}), {"--strength", "[0, 1]"});
    expect_flag_error(with(g, {"-i", init, "-W", "128", "-H", "128"}), {"-i/--init", "64x64", "128x128"});
  }
  // A mask of another size than the image.
  if (!init.empty() && !mask.empty()) {
    // 64x64 init with itself as mask works; a mask of another size is refused. Build one: the
    // sd1 init at 64x64 vs a 1x1 PNG.
    std::string tiny = tmp("tiny.png");
    std::string raw = std::string(1, '\0') + std::string(3, '\x80');
    uLongf cl = compressBound(uLong(raw.size()));
    std::string z(cl, '\0');
    compress(reinterpret_cast<Bytef*>(z.data()), &cl, reinterpret_cast<const Bytef*>(raw.data()), uLong(raw.size()));
    z.resize(cl);
    auto chunk = [](const std::string& type, const std::string& d) {
      auto be = [](uint32_t v) { return std::string{char(v >> 24), char(v >> 16), char(v >> 8), char(v)}; };
      std::string td = type + d;
      return be(uint32_t(d.size())) + td + be(uint32_t(crc32(0, reinterpret_cast<const Bytef*>(td.data()), uInt(td.size()))));
    };
    std::string ihdr = std::string("\0\0\0\1\0\0\0\1", 8) + std::string("\x08\x02\x00\x00\x00", 5);
    write_file(tiny, std::string("\x89PNG\r\n\x1a\n", 8) + chunk("IHDR", ihdr) + chunk("IDAT", z) + chunk("IEND", ""));
    expect_flag_error(with(g, {"-i", init, "--mask", tiny}), {"--mask", "1x1", "64x64"});
  }
}

// ---- LoRA and ControlNet through the CLI ----

TEST(GenerateLora, FlagAndPromptTagReproduceDiffusers) {
  std::string model = sd1_model(), ref = data("sd1-lora/lora.safetensors"),
              kohya = first_existing({data("sd1-lora/model/lora-kohya.safetensors"),
                                      std::string(DIFFUSE_TEST_DATA) + "/sd1-lora/lora-kohya.safetensors"}),
              peft = first_existing({data("sd1-lora/model/lora-peft.safetensors"),
                                     std::string(DIFFUSE_TEST_DATA) + "/sd1-lora/lora-peft.safetensors"});
  if (model.empty() || ref.empty() || kohya.empty() || peft.empty())
    GTEST_SKIP() << "needs sd1-lora fixtures (tests/data/sd1-lora or ../shared/fixtures/sd1-lora)";
  // --lora PATH:MULT, both file formats.
  for (const std::string& file : {kohya, peft}) {
    std::string out = tmp(file == kohya ? "lora_kohya" : "lora_peft");
    Result r = run(with(base_args(model, out), {"--sampler", "euler", "--lora", file + ":0.8"}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    expect_matches(out, ref, "lora.mult0.8");
  }
  // The prompt tag <lora:NAME:MULT> resolved in --lora-model-dir, removed from the prompt text.
  std::string dir = kohya.substr(0, kohya.rfind('/'));
  std::string out = tmp("lora_tag");
  std::vector<std::string> args = base_args(model, out);
  for (size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == "-p") args[i + 1] = "a photograph of an astronaut riding a horse <lora:lora-kohya:0.8>";
  Result r = run(with(args, {"--sampler", "euler", "--lora-model-dir", dir}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(out, ref, "lora.mult0.8");
  std::string params = parameters_of(out + ".png");
  EXPECT_NE(params.find("<lora:lora-kohya:0.8>"), std::string::npos) << params;  // line 1 keeps the tag
  EXPECT_NE(params.find("Lora hashes: \"lora-kohya: "), std::string::npos) << params;
  // A tag without --lora-model-dir, and a missing file, are errors naming what is wrong.
  expect_flag_error(args, {"<lora:lora-kohya>", "--lora-model-dir"});
  expect_flag_error(with(base_args(model, out), {"--lora", tmp("nope.safetensors")}), {"--lora", "nope.safetensors"});
}

TEST(GenerateControlNet, DiffusersFolderReproducesDiffusers) {
  std::string model = sd1_model(), ref = data("sd1-controlnet/controlnet.safetensors"),
              net = data("sd1-controlnet/model/diffusers-controlnet"), hint = data("sd1-controlnet/control.png");
  if (model.empty() || ref.empty() || net.empty() || hint.empty())
    GTEST_SKIP() << "needs sd1-controlnet fixtures (tests/data/sd1-controlnet or ../shared/fixtures/sd1-controlnet)";
  std::string out = tmp("controlnet");
  Result r = run(with(base_args(model, out),
                      {"--sampler", "euler", "--control-net", net, "--control-image", hint, "--control-strength", "1"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(out, ref, "controlnet.scale1.0");
  EXPECT_NE(parameters_of(out + ".png").find("ControlNet 0: \"Module: none, Model: diffusers-controlnet, Weight: 1\""),
            std::string::npos);
  // --canny runs the edge detector first: a different hint, a different (but valid) result.
  Result c = run(with(base_args(model, tmp("controlnet_canny")),
                      {"--sampler", "euler", "--control-net", net, "--control-image", hint, "--canny"}));
  EXPECT_EQ(c.exit_code, 0) << c.err;
  expect_flag_error(with(base_args(model, out), {"--control-net", net}), {"--control-net", "--control-image"});
  expect_flag_error(with(base_args(model, out), {"--canny"}), {"--canny"});
}

TEST(GenerateControlNet, UnitsAddUpAndStartEndChooseTheSteps) {
  std::string model = sd1_model(), ref = data("sd1-controlnet/controlnet.safetensors"),
              net = data("sd1-controlnet/model/diffusers-controlnet"), hint = data("sd1-controlnet/control.png"),
              pipes = data("sd1/pipelines.safetensors");
  if (model.empty() || ref.empty() || net.empty() || hint.empty() || pipes.empty())
    GTEST_SKIP() << "needs sd1-controlnet fixtures and sd1/pipelines.safetensors";
  // Two units of the same ControlNet and hint at 0.5 each add up to one at 1: diffusers' scale 1.
  std::string out = tmp("controlnet_units");
  Result r = run(with(base_args(model, out), {"--sampler", "euler", "--control-net", net, "--control-image", hint,
                                              "--control-net", net, "--control-image", hint, "--control-strength",
                                              "0.5", "--control-end", "1"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(out, ref, "controlnet.scale1.0");
  std::string params = parameters_of(out + ".png");
  EXPECT_NE(params.find("ControlNet 0: \"Module: none, Model: diffusers-controlnet, Weight: 0.5\", ControlNet 1: "
                        "\"Module: none, Model: diffusers-controlnet, Weight: 0.5\""),
            std::string::npos) << params;
  // Guidance start 1 of 5 steps: step/steps never reaches 1, so no step gets control (the plain
  // txt2img latent); the PNG says so in A1111's wording.
  std::string late = tmp("controlnet_late");
  Result l = run(with(base_args(model, late), {"--sampler", "euler", "--control-net", net, "--control-image", hint,
                                               "--control-start", "1", "--control-end", "1"}));
  ASSERT_EQ(l.exit_code, 0) << l.err;
  expect_matches(late, pipes, "txt2img.euler");
  EXPECT_NE(parameters_of(late + ".png").find("Weight: 1, Guidance Start: 1, Guidance End: 1\""), std::string::npos);
  // Per-unit lists must have one value, or one per --control-net; start <= end.
  expect_flag_error(with(base_args(model, out), {"--control-net", net, "--control-image", hint, "--control-net", net,
                                                 "--control-image", hint, "--control-strength", "1", "0.5", "0.2"}),
                    {"--control-strength", "3 values for 2"});
  expect_flag_error(with(base_args(model, out), {"--control-net", net, "--control-image", hint, "--control-net", net}),
                    {"--control-net", "--control-image"});
  expect_flag_error(with(base_args(model, out), {"--control-net", net, "--control-image", hint, "--control-start",
                                                 "0.7", "--control-end", "0.3"}),
                    {"start 0.7", "end 0.3"});
  expect_flag_error(with(base_args(model, out), {"--guess-mode"}), {"--guess-mode", "--control-net"});
}

// A T2I-Adapter in TencentARC's layout for the tiny sd1 UNet (widths 32, 32, 64, 64; 2 blocks a
// level), written here as safetensors: conv_in, body.K.block1 (3×3), block2 (1×1), in_conv (1×1).
void write_adapter(const std::string& path, const std::vector<int>& ch) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  auto conv = [&](const std::string& n, int64_t o, int64_t i, int64_t k) {
    t.push_back({n + ".weight", {o, i, k, k}});
    t.push_back({n + ".bias", {o}});
  };
  conv("conv_in", ch[0], 192, 3);
  for (size_t l = 0; l < ch.size(); ++l) {
    if (l && ch[l] != ch[l - 1]) conv("body." + std::to_string(2 * l) + ".in_conv", ch[l], ch[l - 1], 1);
    for (size_t j = 0; j < 2; ++j) {
      conv("body." + std::to_string(2 * l + j) + ".block1", ch[l], ch[l], 3);
      conv("body." + std::to_string(2 * l + j) + ".block2", ch[l], ch[l], 1);
    }
  }
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  uint32_t state = 12345;
  for (const auto& [name, shape] : t) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const size_t begin = data.size();
    for (int64_t i = 0; i < n; ++i) {
      state = state * 1664525u + 1013904223u;
      const float v = (float(state >> 8) / 16777216.0f - 0.5f) * 0.2f;
      data.append(reinterpret_cast<const char*>(&v), 4);
    }
    header[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  const std::string h = header.dump();
  const uint64_t len = h.size();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(&len), 8);
  f << h << data;
}

TEST(GenerateControlNet, T2IAdapterFilesRunAsUnits) {
  std::string model = sd1_model(), hint = data("sd1-controlnet/control.png"), pipes = data("sd1/pipelines.safetensors");
  if (model.empty() || hint.empty() || pipes.empty()) GTEST_SKIP() << "needs sd1 and sd1-controlnet fixtures";
  const std::string adapter = tmp("t2i_adapter.safetensors");
  write_adapter(adapter, {32, 32, 64, 64});
  // Strength 0: the features are added as zeros, the plain txt2img latent; the PNG names the unit.
  std::string out = tmp("adapter0");
  Result r = run(with(base_args(model, out), {"--sampler", "euler", "--control-net", adapter, "--control-image", hint,
                                              "--control-strength", "0"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_matches(out, pipes, "txt2img.euler");
  const std::string params = parameters_of(out + ".png");
  EXPECT_NE(params.find("ControlNet 0: \"Module: none, Model: t2i_adapter, Weight: 0\""), std::string::npos) << params;
  // Strength 1 changes the image.
  std::string out1 = tmp("adapter1");
  Result r1 = run(with(base_args(model, out1), {"--sampler", "euler", "--control-net", adapter, "--control-image", hint}));
  ASSERT_EQ(r1.exit_code, 0) << r1.err;
  auto bytes = [](const std::string& f) {
    std::ifstream in(f, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  EXPECT_NE(bytes(out1 + ".safetensors"), bytes(out + ".safetensors"));
  // An adapter of other widths is refused, naming the file and what the UNet needs.
  const std::string wide = tmp("t2i_wide.safetensors");
  write_adapter(wide, {64, 64, 128, 128});
  expect_flag_error(with(base_args(model, out), {"--control-net", wide, "--control-image", hint}),
                    {wide, "does not fit", "32,32,64,64"});
  // Guess mode is for ControlNets.
  expect_flag_error(with(base_args(model, out), {"--control-net", adapter, "--control-image", hint, "--guess-mode"}),
                    {"guess mode", "T2I-Adapter"});
}

// ---- --vae: a standalone VAE instead of the checkpoint's ----

namespace {

struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// Every tensor of a safetensors file, raw, by name.
std::map<std::string, RawTensor> read_raw(const std::string& path) {
  std::string b = slurp(path);
  std::map<std::string, RawTensor> out;
  uint64_t n = 0;
  std::memcpy(&n, b.data(), 8);
  json h = json::parse(b.substr(8, size_t(n)));
  for (auto& [name, e] : h.items()) {
    if (name == "__metadata__") continue;
    size_t a = e["data_offsets"][0], z = e["data_offsets"][1];
    out[name] = {e["dtype"].get<std::string>(), e["shape"].get<std::vector<int64_t>>(), b.substr(8 + n + a, z - a)};
  }
  return out;
}

void write_raw(const std::string& path, const std::map<std::string, RawTensor>& ts) {
  json h = json::object();
  std::string body;
  for (const auto& [name, t] : ts) {
    h[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {body.size(), body.size() + t.bytes.size()}}};
    body += t.bytes;
  }
  std::string head = h.dump();
  head.append((8 - head.size() % 8) % 8, ' ');
  uint64_t n = head.size();
  write_file(path, std::string(reinterpret_cast<const char*>(&n), 8) + head + body);
}

// The checkpoint's first_stage_model.* tensors with the prefix stripped (vae-ft-mse-840000's layout).
std::map<std::string, RawTensor> bare_vae(const std::string& model) {
  std::map<std::string, RawTensor> out;
  const std::string pre = "first_stage_model.";
  for (auto& [name, t] : read_raw(model))
    if (name.rfind(pre, 0) == 0) out[name.substr(pre.size())] = t;
  return out;
}

// diffusers AutoencoderKL names for the bare ldm ones, written here independently of the engine's
// mapping, with the old query/key/value/proj_attn attention names (as 1x1 convs, as ldm keeps them).
std::string diffusers_vae_name(const std::string& ldm, int up_levels) {
  std::smatch m;
  auto rs = [](std::string r) { return r == "nin_shortcut" ? std::string("conv_shortcut") : r; };
  if (std::regex_match(ldm, m, std::regex(R"((encoder|decoder)\.norm_out\.(.*))")))
    return m[1].str() + ".conv_norm_out." + m[2].str();
  if (std::regex_match(ldm, m, std::regex(R"((encoder|decoder)\.mid\.block_(\d)\.(\w+)\.(.*))")))
    return m[1].str() + ".mid_block.resnets." + std::to_string(std::stoi(m[2]) - 1) + "." + rs(m[3]) + "." + m[4].str();
  if (std::regex_match(ldm, m, std::regex(R"((encoder|decoder)\.mid\.attn_1\.(\w+)\.(.*))"))) {
    std::map<std::string, std::string> to = {
        {"norm", "group_norm"}, {"q", "query"}, {"k", "key"}, {"v", "value"}, {"proj_out", "proj_attn"}};
    return m[1].str() + ".mid_block.attentions.0." + to[m[2]] + "." + m[3].str();
  }
  if (std::regex_match(ldm, m, std::regex(R"(encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(.*))")))
    return "encoder.down_blocks." + m[1].str() + ".resnets." + m[2].str() + "." + rs(m[3]) + "." + m[4].str();
  if (std::regex_match(ldm, m, std::regex(R"(encoder\.down\.(\d+)\.downsample\.conv\.(.*))")))
    return "encoder.down_blocks." + m[1].str() + ".downsamplers.0.conv." + m[2].str();
  if (std::regex_match(ldm, m, std::regex(R"(decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(.*))")))
    return "decoder.up_blocks." + std::to_string(up_levels - 1 - std::stoi(m[1])) + ".resnets." + m[2].str() + "." +
           rs(m[3]) + "." + m[4].str();
  if (std::regex_match(ldm, m, std::regex(R"(decoder\.up\.(\d+)\.upsample\.conv\.(.*))")))
    return "decoder.up_blocks." + std::to_string(up_levels - 1 - std::stoi(m[1])) + ".upsamplers.0.conv." + m[2].str();
  return ldm;  // conv_in, conv_out, quant_conv, post_quant_conv keep their names
}

std::vector<uint8_t> pixels(const std::string& png) { return read_png(png).px; }

}  // namespace

TEST(GenerateVae, StandaloneFileInEachLayoutAndPairedBesideTheModel) {
  std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  auto vae = bare_vae(model);
  ASSERT_TRUE(vae.count("decoder.conv_out.bias"));
  std::map<std::string, RawTensor> with_ema = vae;  // vae-ft-mse files may keep EMA copies and loss weights
  with_ema["model_ema.decay"] = {"F32", {}, std::string(4, '\0')};
  with_ema["loss.logvar"] = {"F32", {}, std::string(4, '\0')};
  const std::string same = tmp("vae-same.safetensors");
  write_raw(same, with_ema);
  // A different decoder: conv_out's bias negated (the f16 sign bits flipped).
  auto changed = vae;
  RawTensor& bias = changed["decoder.conv_out.bias"];
  ASSERT_EQ(bias.dtype, "F16");
  for (size_t i = 1; i < bias.bytes.size(); i += 2) bias.bytes[i] = char(uint8_t(bias.bytes[i]) ^ 0x80);
  const std::string other = tmp("vae-other.safetensors");
  write_raw(other, changed);
  std::map<std::string, RawTensor> prefixed, diffusers;
  for (auto& [n, t] : vae) {
    prefixed["first_stage_model." + n] = t;
    diffusers[diffusers_vae_name(n, 4)] = t;
  }
  ASSERT_TRUE(diffusers.count("decoder.mid_block.attentions.0.query.weight"));
  ASSERT_TRUE(diffusers.count("decoder.up_blocks.0.upsamplers.0.conv.weight"));
  write_raw(tmp("vae-prefixed.safetensors"), prefixed);
  write_raw(tmp("vae-diffusers.safetensors"), diffusers);

  auto gen = [&](const std::string& m, const std::string& out, std::vector<std::string> more) {
    Result r = run(with(base_args(m, tmp(out)), more));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r;
  };
  gen(model, "run-none", {});
  gen(model, "run-same", {"--vae", same});
  const std::vector<uint8_t> base = pixels(tmp("run-none.png"));
  ASSERT_FALSE(base.empty());
  EXPECT_EQ(pixels(tmp("run-same.png")), base) << "the checkpoint's own VAE as a file decodes the same";
  const std::string params = parameters_of(tmp("run-same.png"));
  EXPECT_TRUE(std::regex_search(params, std::regex("Model: tiny-sd1, VAE hash: [0-9a-f]{10}, VAE: vae-same,")))
      << params;
  EXPECT_EQ(parameters_of(tmp("run-none.png")).find("VAE"), std::string::npos);

  gen(model, "run-other", {"--vae", other});
  const std::vector<uint8_t> changed_px = pixels(tmp("run-other.png"));
  EXPECT_NE(changed_px, base) << "a different decoder must change the image";
  EXPECT_EQ(read_safetensors(tmp("run-other.safetensors"))["latent"].v,
            read_safetensors(tmp("run-none.safetensors"))["latent"].v) << "the VAE only decodes txt2img's latent";

  // A1111's pairing: MODEL.vae.safetensors beside MODEL.safetensors.
  const std::string dir = tmp("paired");
  mkdir(dir.c_str(), 0755);
  write_file(dir + "/tiny.safetensors", slurp(model));
  write_raw(dir + "/tiny.vae.safetensors", changed);
  Result pr = gen(dir + "/tiny.safetensors", "run-paired", {});
  EXPECT_EQ(pixels(tmp("run-paired.png")), changed_px);
  EXPECT_NE((pr.out + pr.err).find("tiny.vae.safetensors"), std::string::npos) << pr.out << pr.err;
  EXPECT_NE(parameters_of(tmp("run-paired.png")).find("VAE: tiny.vae,"), std::string::npos);

  gen(model, "run-prefixed", {"--vae", tmp("vae-prefixed.safetensors")});
  EXPECT_EQ(pixels(tmp("run-prefixed.png")), base) << "first_stage_model.* names";
  gen(model, "run-diffusers", {"--vae", tmp("vae-diffusers.safetensors")});
  EXPECT_EQ(pixels(tmp("run-diffusers.png")), base) << "diffusers AutoencoderKL names";

  // img2img encodes with the file's encoder: the same VAE gives the same image, one whose encoder
  // differs (quant_conv's bias negated) another.
  std::string init = data("sd1/init.png");
  if (!init.empty()) {
    auto enc = vae;
    RawTensor& qb = enc["quant_conv.bias"];
    for (size_t i = 1; i < qb.bytes.size(); i += 2) qb.bytes[i] = char(uint8_t(qb.bytes[i]) ^ 0x80);
    write_raw(tmp("vae-encoder.safetensors"), enc);
    gen(model, "run-i2i-none", {"-i", init});
    gen(model, "run-i2i-same", {"-i", init, "--vae", same});
    gen(model, "run-i2i-enc", {"-i", init, "--vae", tmp("vae-encoder.safetensors")});
    const std::vector<uint8_t> i2i = pixels(tmp("run-i2i-none.png"));
    ASSERT_FALSE(i2i.empty());
    EXPECT_EQ(pixels(tmp("run-i2i-same.png")), i2i);
    EXPECT_NE(pixels(tmp("run-i2i-enc.png")), i2i) << "img2img must encode with the --vae file's encoder";
  }
}

TEST(GenerateVae, BadFilesNameTheFlagAndTheFile) {
  std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  std::vector<std::string> g = {"generate", "-m", model, "-p", "x", "--steps", "1", "-W", "64", "-H", "64",
                                "-o", tmp("vae-err.png")};
  const std::string missing = tmp("no-such-vae.safetensors");
  expect_flag_error(with(g, {"--vae", missing}), {"--vae", missing});
  auto vae = bare_vae(model);
  vae["decoder.conv_out.weight"] = {"F16", {3, 32, 1, 1}, std::string(3 * 32 * 2, '\0')};
  const std::string shape = tmp("vae-bad-shape.safetensors");
  write_raw(shape, vae);
  expect_flag_error(with(g, {"--vae", shape}), {"--vae", shape, "decoder.conv_out.weight"});
  vae = bare_vae(model);  // a resnet conv of another shape fails the strict binding
  vae["decoder.up.0.block.1.conv2.weight"] = {"F16", {32, 32, 1, 1}, std::string(32 * 32 * 2, '\0')};
  write_raw(shape, vae);
  expect_flag_error(with(g, {"--vae", shape}), {"--vae", shape, "decoder.up_blocks.3.resnets.1.conv2.weight"});
  const std::string none = tmp("vae-none-inside.safetensors");
  write_raw(none, {{"foo.weight", {"F32", {1}, std::string(4, '\0')}}});
  expect_flag_error(with(g, {"--vae", none}), {"--vae", none, "no VAE tensors"});
  const std::string corrupt = tmp("vae-corrupt.safetensors");
  write_file(corrupt, "not a safetensors file at all");
  expect_flag_error(with(g, {"--vae", corrupt}), {"--vae", corrupt});
}
