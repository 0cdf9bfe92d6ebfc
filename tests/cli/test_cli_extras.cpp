// A1111's extras through the binary.
// Textual inversion: `diffuse generate --embeddings-dir` and `diffuse info` on embeddings: the PNG's
// parameters carry A1111's "TI hashes", `info` reads them back and lists a folder, an unknown
// `embedding:NAME` warns, a wrong-architecture embedding and a missing folder exit 1.
// Hires fix: --hires-* make a larger image whose parameters say so; bad settings exit 1 before loading.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "cli_util.h"
#include "core/sha256.h"
#include "io/tensor_file.h"

namespace fs = std::filesystem;
using namespace clitest;


TEST(CliEmbeddings, GenerateInfoAndErrors) {
  const std::string model = tiny_sd1();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const int64_t width =
      diffuse::open_model_file(model).find("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")->dim(1);
  const fs::path dir = fs::path(temp_dir()) / "embeddings-cli";
  fs::create_directories(dir);
  diffuse::Tensor v = diffuse::Tensor::full({2, width}, 0.25f);
  diffuse::save_safetensors((dir / "shiny.safetensors").string(), {{"emb_params", v}});
  diffuse::save_safetensors((dir / "xlonly.safetensors").string(),
                            {{"clip_l", diffuse::Tensor::full({1, 768}, 0.1f)}, {"clip_g", diffuse::Tensor::full({1, 1280}, 0.1f)}});
  const std::string out = (dir / "out.png").string();
  const std::vector<std::string> base = {"generate", "-m", model, "-W", "64", "-H", "64", "--steps", "2", "--seed", "5",
                                         "--embeddings-dir", dir.string(), "-o", out};

  std::vector<std::string> args = base;
  args.insert(args.end(), {"-p", "a (shiny:1.2) cat", "-n", "embedding:missing"});
  Result r = run(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "embedding:missing")) << r.err;
  EXPECT_TRUE(contains(r.err, "textual inversion: shiny")) << r.err;
  const std::string hash = diffuse::sha256_file((dir / "shiny.safetensors").string()).substr(0, 12);
  Result info = run({"info", out});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_TRUE(contains(info.out, "TI hashes: \"shiny: " + hash + "\"")) << info.out;

  Result list = run({"info", dir.string()});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  EXPECT_TRUE(contains(list.out, "2 textual-inversion embeddings")) << list.out;
  EXPECT_TRUE(contains(list.out, "shiny: ")) << list.out;
  EXPECT_TRUE(contains(list.out, "xlonly: SDXL (clip_l 768 + clip_g 1280)")) << list.out;

  args = base;
  args.insert(args.end(), {"-p", "a xlonly cat"});
  r = run(args);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(contains(r.err, "xlonly.safetensors: an SDXL embedding")) << r.err;

  args = base;
  args[12] = (dir / "absent").string();
  args.insert(args.end(), {"-p", "a cat"});
  r = run(args);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(contains(r.err, "--embeddings-dir")) << r.err;
}

TEST(CliHires, TwoPassesAndBadSettings) {
  const std::string model = tiny_sd1();
  if (model.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  const fs::path dir = fs::path(temp_dir()) / "hires-cli";
  fs::create_directories(dir);
  const std::string out = (dir / "hires.png").string();
  const std::vector<std::string> base = {"generate", "-m", model, "-p", "a tree", "-W", "64", "-H", "48", "--steps", "3",
                                         "--seed", "2", "-o", out};
  std::vector<std::string> args = base;
  args.insert(args.end(), {"--hires-scale", "1.5", "--hires-steps", "2", "--hires-denoise", "0.6", "--hires-upscaler",
                           "lanczos"});
  Result r = run(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "hires fix: 64x48 -> 96x72 (Lanczos), 2 steps at denoising strength 0.6")) << r.err;
  Result info = run({"info", out});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_TRUE(contains(info.out, "size:     96x72")) << info.out;
  EXPECT_TRUE(contains(info.out, "Size: 64x48, ")) << info.out;
  EXPECT_TRUE(contains(info.out, "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos")) << info.out;

  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--hires-scale", "9"}, "--hires-scale 9"},
      {{"--hires-scale", "2", "--hires-upscaler", "bilinear"}, "--hires-upscaler bilinear"},
      {{"--hires-scale", "2", "--hires-upscaler", "esrgan"}, "--hires-upscaler-model"},
      {{"--hires-scale", "2", "--hires-denoise", "1.5"}, "--hires-denoise"},
      {{"--hires-steps", "5"}, "--hires-scale"},
      {{"--hires-scale", "2", "-i", model}, "txt2img"},
  };
  for (const auto& [extra, want] : bad) {
    args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    r = run(args);
    EXPECT_EQ(r.exit_code, 1) << want << "\n" << r.err;
    EXPECT_TRUE(contains(r.err, want)) << r.err;
  }
}
