// The default size from a checkpoint's `modelspec.resolution` metadata (models/sd_model.h
// declared_resolution): the parser's accepted and refused forms; through the binary, a tiny sd1
// checkpoint copied with "96x64" generates 96x64 (width x height) without -W/-H, -W/-H still win
// (each on its own), and an invalid value falls back to the family's size with a warning naming
// the file and the value; through the engine (what the C API and the server call), width/height 0
// takes the declared size too. The prediction type a file declares (modelspec.prediction_type, as
// `diffuse train full --prediction v` writes it) is what generate uses unless --prediction says.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "api/engine.h"
#include "cli_util.h"
#include "io/image.h"
#include "io/tensor_file.h"
#include "models/sd_model.h"

namespace fs = std::filesystem;
using namespace clitest;

namespace {


// The tiny sd1 checkpoint's tensors and metadata, plus metadata `key` = `value`.
std::string model_with_metadata(const std::string& name, const std::string& key, const std::string& value) {
  const std::string out = temp_dir() + "/" + name + ".safetensors";
  diffuse::TensorFile f = diffuse::load_safetensors(tiny_sd1());
  std::vector<std::pair<std::string, diffuse::Tensor>> tensors;
  for (const diffuse::TensorEntry& e : f.tensors) tensors.emplace_back(e.name, e.tensor);
  std::map<std::string, std::string> meta = f.metadata;
  meta[key] = value;
  diffuse::save_safetensors(out, tensors, meta);
  return out;
}

std::string model_with_resolution(const std::string& name, const std::string& resolution) {
  return model_with_metadata(name, "modelspec.resolution", resolution);
}

// Generates with `extra` flags (1 step) and returns the PNG's size as "WxH" ("" on failure).
std::string generated_size(const std::string& model, const std::string& tag, std::vector<std::string> extra,
                           Result* res = nullptr) {
  const std::string out = temp_dir() + "/" + tag + ".png";
  std::vector<std::string> args = {"generate", "-m", model, "-p", "a cat", "--steps", "1", "-s", "3", "-o", out};
  args.insert(args.end(), extra.begin(), extra.end());
  Result r = run(args, 300);
  if (res) *res = r;
  EXPECT_EQ(r.exit_code, 0) << r.err;
  if (r.exit_code != 0) return "";
  const diffuse::Image im = diffuse::read_image(out);
  return std::to_string(im.width) + "x" + std::to_string(im.height);
}

}  // namespace

TEST(DeclaredResolution, ParsesWidthByHeightInMultiplesOf8) {
  int w = 0, h = 0;
  EXPECT_TRUE(diffuse::parse_declared_resolution("512x768", &w, &h));
  EXPECT_EQ(w, 512);
  EXPECT_EQ(h, 768);
  EXPECT_TRUE(diffuse::parse_declared_resolution(" 64X96 ", &w, &h));
  EXPECT_EQ(w, 64);
  EXPECT_EQ(h, 96);
  for (const char* bad : {"", "512", "x512", "512x", "512x768x8", "65x64", "64x60", "0x64", "-64x64", "+64x64",
                          "64 x 64", "abc", "16392x64", "99999999999x64", "64x64px", "1e3x64"})
    EXPECT_FALSE(diffuse::parse_declared_resolution(bad, &w, &h)) << bad;
  EXPECT_TRUE(diffuse::parse_declared_resolution("16384x8", &w, &h));
}

TEST(DeclaredResolution, FromMetadataOrAProblem) {
  diffuse::TensorFile f;
  f.path = "m.safetensors";
  diffuse::DeclaredResolution d = diffuse::declared_resolution(f);
  EXPECT_EQ(d.width, 0);
  EXPECT_TRUE(d.problem.empty());
  f.metadata["modelspec.resolution"] = "1024x1024";
  d = diffuse::declared_resolution(f);
  EXPECT_EQ(d.width, 1024);
  EXPECT_EQ(d.height, 1024);
  EXPECT_TRUE(d.problem.empty());
  f.metadata["modelspec.resolution"] = "big";
  d = diffuse::declared_resolution(f);
  EXPECT_EQ(d.width, 0);
  EXPECT_EQ(d.height, 0);
  EXPECT_TRUE(contains(d.problem, "m.safetensors")) << d.problem;
  EXPECT_TRUE(contains(d.problem, "\"big\"")) << d.problem;
}

TEST(CliResolution, DeclaredSizeIsTheDefaultAndFlagsOverride) {
  if (tiny_sd1().empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const std::string model = model_with_resolution("declared-96x64", "96x64");
  Result r;
  EXPECT_EQ(generated_size(model, "declared", {}, &r), "96x64");
  EXPECT_TRUE(contains(r.err, "default size 96x64 from the model's modelspec.resolution")) << r.err;
  EXPECT_TRUE(contains(r.err, "txt2img 96x64")) << r.err;
  EXPECT_EQ(generated_size(model, "both-flags", {"-W", "64", "-H", "64"}), "64x64");
  EXPECT_EQ(generated_size(model, "height-flag", {"-H", "128"}), "96x128");
  EXPECT_EQ(generated_size(model, "width-flag", {"-W", "128"}), "128x64");
}

TEST(CliResolution, InvalidValueFallsBackToTheFamilySizeWithAWarning) {
  if (tiny_sd1().empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const std::string model = model_with_resolution("declared-bad", "65x64");
  Result r;
  // -W keeps the run small: the height is the default, sd1's 512.
  EXPECT_EQ(generated_size(model, "bad", {"-W", "64"}, &r), "64x512");
  EXPECT_TRUE(contains(r.err, "warning")) << r.err;
  EXPECT_TRUE(contains(r.err, model + ": modelspec.resolution \"65x64\"")) << r.err;
  EXPECT_TRUE(contains(r.err, "using the family's 512x512")) << r.err;
  // -q keeps warnings.
  EXPECT_EQ(generated_size(model, "bad-quiet", {"-W", "64", "-q"}, &r), "64x512");
  EXPECT_TRUE(contains(r.err, "\"65x64\"")) << r.err;
  // Both flags given: the default is not used and nothing is said.
  EXPECT_EQ(generated_size(model, "bad-flags", {"-W", "64", "-H", "64"}, &r), "64x64");
  EXPECT_FALSE(contains(r.err, "modelspec")) << r.err;
}

TEST(EngineResolution, WidthHeightZeroTakeTheDeclaredSize) {
  if (tiny_sd1().empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const std::string model = model_with_resolution("declared-engine", "64x128");
  diffuse::api::EngineOptions o;
  o.precision = "fp32";
  diffuse::api::Engine e(o);
  diffuse::api::Request req;
  req.model = model;
  req.prompt = "a cat";
  req.steps = 1;
  req.seed = 1;
  diffuse::api::RunResult res = e.generate(req);
  ASSERT_EQ(res.images.size(), 1u);
  EXPECT_EQ(res.images[0].image.width, 64);
  EXPECT_EQ(res.images[0].image.height, 128);
  EXPECT_TRUE(contains(res.images[0].parameters, "Size: 64x128")) << res.images[0].parameters;
}

TEST(DeclaredPrediction, FromModelspecOrSchedulerConfig) {
  diffuse::TensorFile f;
  EXPECT_EQ(diffuse::declared_prediction(f), "");
  f.metadata["scheduler/scheduler_config.json"] = R"({"prediction_type": "v_prediction"})";
  EXPECT_EQ(diffuse::declared_prediction(f), "v");
  f.metadata["modelspec.prediction_type"] = "epsilon";  // the model-spec key wins
  EXPECT_EQ(diffuse::declared_prediction(f), "epsilon");
  f.metadata["modelspec.prediction_type"] = "v";
  EXPECT_EQ(diffuse::declared_prediction(f), "v");
  f.metadata["modelspec.prediction_type"] = "sample";  // not one the engine runs: declares nothing
  EXPECT_EQ(diffuse::declared_prediction(f), "");
  f.metadata.erase("modelspec.prediction_type");
  f.metadata["scheduler/scheduler_config.json"] = "{not json";
  EXPECT_EQ(diffuse::declared_prediction(f), "");
}

// A diffusers folder declares through scheduler/scheduler_config.json (open_model_file keeps it as
// metadata under the key an embedded config has): the sd1 fixture folder with its scheduler config
// replaced by a v-prediction, zero-terminal-SNR one is generated with both.
TEST(CliPrediction, ADiffusersFoldersSchedulerConfigDeclares) {
  const fs::path src = fs::path(DIFFUSE_SHARED_DIR) / "fixtures/sd1/model/diffusers";
  if (!fs::is_directory(src)) GTEST_SKIP() << "needs " << src.string() << " (../shared)";
  const fs::path dir = fs::path(temp_dir()) / "v-folder";
  fs::create_directories(dir / "scheduler");
  for (const char* part : {"model_index.json", "text_encoder", "tokenizer", "unet", "vae"})
    if (!fs::exists(dir / part)) fs::create_symlink(src / part, dir / part);
  write_file((dir / "scheduler/scheduler_config.json").string(),
             R"({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction", "rescale_betas_zero_snr": true})");
  const diffuse::TensorFile f = diffuse::open_model_file(dir.string());
  EXPECT_EQ(diffuse::declared_prediction(f), "v");
  EXPECT_TRUE(diffuse::declared_zero_snr(f));
  const Result r = run({"generate", "-m", dir.string(), "-p", "a cat", "--steps", "2", "-s", "5", "-W", "64", "-H",
                        "64", "-o", temp_dir() + "/v-folder.png"},
                       300);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "v prediction (zero terminal SNR)")) << r.err;
  // The fixture's own folder declares epsilon.
  EXPECT_EQ(diffuse::declared_prediction(diffuse::open_model_file(src.string())), "epsilon");
}

TEST(CliPrediction, DeclaredVIsTheDefaultAndTheFlagOverrides) {
  if (tiny_sd1().empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const std::string vmodel = model_with_metadata("declared-v", "modelspec.prediction_type", "v");
  auto pixels = [](const std::string& model, const std::string& tag, std::vector<std::string> extra, Result* r) {
    const std::string out = temp_dir() + "/" + tag + ".png";
    std::vector<std::string> args = {"generate", "-m", model, "-p", "a cat", "--steps", "2", "-s", "5",
                                     "-W", "64", "-H", "64", "-o", out};
    args.insert(args.end(), extra.begin(), extra.end());
    *r = run(args, 300);
    EXPECT_EQ(r->exit_code, 0) << r->err;
    return r->exit_code == 0 ? diffuse::read_image(out).pixels : std::vector<uint8_t>{};
  };
  Result r;
  const std::vector<uint8_t> declared = pixels(vmodel, "pred-declared", {}, &r);
  EXPECT_TRUE(contains(r.err, "v prediction")) << r.err;
  const std::vector<uint8_t> eps = pixels(tiny_sd1(), "pred-eps", {}, &r);
  EXPECT_TRUE(contains(r.err, "epsilon prediction")) << r.err;
  const std::vector<uint8_t> forced_v = pixels(tiny_sd1(), "pred-forced-v", {"--prediction", "v"}, &r);
  const std::vector<uint8_t> overridden = pixels(vmodel, "pred-overridden", {"--prediction", "eps"}, &r);
  EXPECT_TRUE(contains(r.err, "epsilon prediction")) << r.err;
  ASSERT_FALSE(declared.empty());
  EXPECT_EQ(declared, forced_v);  // the declared v is what --prediction v does
  EXPECT_EQ(overridden, eps);     // and --prediction eps overrides it
  EXPECT_NE(declared, eps);       // (the two predictions draw different pixels)
}
