// `diffuse train lora` extras end to end on the tiny sd1 model, each run short (--steps ≤ 10):
// regularisation images (--reg-data: the run trains on them with their prior loss weight and
// records kohya's reg metadata; a state from a run with other reg data is refused); the loss
// chart OUT.loss.png; sample images (--sample-prompt: written at the steps due, with the LoRA as
// it stands, without changing what the run trains).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "io/image.h"
#include "io/tensor_file.h"
#include "train_util.h"

using namespace clitest;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

class TrainLoraExtras : public ::testing::Test {
 protected:
  void SetUp() override {
    if (sd1_model().empty()) GTEST_SKIP() << "tiny-sd1 fixture not found";
  }
  // A short run on the pattern dataset (written once) with `extra` options; returns its result.
  static Result train(const std::string& out, const std::vector<std::string>& extra, int steps = 10,
                      const std::string& lr = "1e-3") {
    static const std::string data = write_dataset(temp_dir() + "/extras_data");
    std::vector<std::string> args = {"train", "lora", "-m", sd1_model(), "--data", data, "-o", out, "--resolution",
                                     std::to_string(kSide), "--steps", std::to_string(steps), "--rank", "2",
                                     "--lr", lr, "--seed", "3"};
    args.insert(args.end(), extra.begin(), extra.end());
    const auto t0 = std::chrono::steady_clock::now();
    Result r = run(args, 300);
    std::printf("[ train    ] %s: %d steps in %.1f s (exit %d)\n", fs::path(out).filename().c_str(), steps,
                seconds_since(t0), r.exit_code);
    return r;
  }
  static json metadata_of(const std::string& path) { return read_header(slurp(path)).j.value("__metadata__", json()); }
};

// Three reg images of the second pattern in "1_stripes" (repeats 1, no caption files).
std::string write_reg_data(const std::string& dir) {
  fs::create_directories(dir + "/1_stripes");
  for (int i = 0; i < 3; ++i) diffuse::write_png(dir + "/1_stripes/r" + std::to_string(i) + ".png", pattern_image(i, 1));
  return dir;
}

// The LoRA's tensors, f32, by name.
// The bytes after a safetensors file's header (the tensors).
std::string tensor_bytes(const std::string& path) {
  const std::string b = slurp(path);
  const Header h = read_header(b);
  return b.size() < 8 + h.size ? std::string() : b.substr(8 + size_t(h.size));
}

std::map<std::string, std::vector<float>> lora_values(const std::string& path) {
  std::map<std::string, std::vector<float>> out;
  diffuse::TensorFile f = diffuse::load_safetensors(path);
  for (const auto& [name, t] : f.tensors) {
    diffuse::Tensor c = t.to(diffuse::DType::F32);
    out[name].assign(c.f32(), c.f32() + c.numel());
  }
  return out;
}

TEST_F(TrainLoraExtras, RegDataTrainsWithItsPriorWeightAndIsRecorded) {
  const std::string reg = write_reg_data(temp_dir() + "/extras_reg");
  const std::string out = temp_dir() + "/reg_half.safetensors";
  Result r = train(out, {"--reg-data", reg, "--prior-loss-weight", "0.5", "--save-precision", "float"}, 6);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // 8 training images × 10 repeats = 80 samples; the 3 reg images are repeated to 80 (27, 27, 26).
  EXPECT_NE(r.err.find("reg data: 3 samples with repeats in " + reg + ", matched to 80 per epoch"), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("11 images, 160 per epoch"), std::string::npos) << r.err;
  const json md = metadata_of(out);
  ASSERT_TRUE(md.is_object()) << out;
  EXPECT_EQ(md.value("ss_num_reg_images", ""), "3");
  EXPECT_EQ(md.value("ss_prior_loss_weight", ""), "0.5");
  EXPECT_EQ(md.value("ss_num_train_images", ""), "80");
  EXPECT_EQ(json::parse(md.value("ss_reg_dataset_dirs", ""), nullptr, false),
            json::parse(R"({"1_stripes": {"n_repeats": 1, "img_count": 3}})"));
  EXPECT_EQ(json::parse(md.value("ss_dataset_dirs", ""), nullptr, false),
            json::parse(R"({"10_sks": {"n_repeats": 10, "img_count": 8}})"));
  EXPECT_EQ(json::parse(md.value("ss_tag_frequency", ""), nullptr, false),
            json::parse(R"({"10_sks": {"sks pattern": 8}, "1_stripes": {"stripes": 3}})"));

  // The loss chart beside the CSV.
  const diffuse::Image chart = diffuse::read_image(out + ".loss.png");
  EXPECT_EQ(chart.width, 640);
  EXPECT_EQ(chart.height, 360);

  // The prior loss weight reaches the loss: the same run at weight 0 trains other weights (6 steps
  // over 160 shuffled samples, half of them reg samples).
  const std::string out0 = temp_dir() + "/reg_zero.safetensors";
  Result r0 = train(out0, {"--reg-data", reg, "--prior-loss-weight", "0", "--save-precision", "float"}, 6);
  ASSERT_EQ(r0.exit_code, 0) << r0.err;
  EXPECT_EQ(metadata_of(out0).value("ss_prior_loss_weight", ""), "0.0");
  EXPECT_NE(lora_values(out), lora_values(out0)) << "--prior-loss-weight 0 and 0.5 trained the same LoRA";

  // A state from the reg run does not continue a run without reg data, nor one with another weight.
  const std::string other = temp_dir() + "/reg_resume.safetensors";
  Result no_reg = train(other, {"--resume", out + ".state.safetensors", "--save-precision", "float"}, 6);
  EXPECT_EQ(no_reg.exit_code, 1) << no_reg.err;
  EXPECT_NE(no_reg.err.find("reg_data (state \"extras_reg\", now \"\")"), std::string::npos) << no_reg.err;
  Result weight = train(other, {"--reg-data", reg, "--prior-loss-weight", "1", "--resume", out + ".state.safetensors",
                                 "--save-precision", "float"},
                        6);
  EXPECT_EQ(weight.exit_code, 1) << weight.err;
  EXPECT_NE(weight.err.find("settings: prior_loss_weight (state 0.5, now 1.0)\n"), std::string::npos) << weight.err;
  EXPECT_FALSE(fs::exists(other));
}

TEST_F(TrainLoraExtras, RegDataErrorsNameTheFolderOrOption) {
  const std::string out = temp_dir() + "/reg_err.safetensors";
  Result missing = train(out, {"--reg-data", temp_dir() + "/no_such_reg"}, 1);
  EXPECT_EQ(missing.exit_code, 1) << missing.err;
  EXPECT_NE(missing.err.find(temp_dir() + "/no_such_reg"), std::string::npos) << missing.err;
  Result neg = train(out, {"--prior-loss-weight", "-1"}, 1);
  EXPECT_EQ(neg.exit_code, 1) << neg.err;
  EXPECT_NE(neg.err.find("--prior-loss-weight -1"), std::string::npos) << neg.err;
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(TrainLoraExtras, SampleImagesAtTheStepsDueWithTheLoraAndTrainingUndisturbed) {
  const std::string out = temp_dir() + "/smp.safetensors", plain = temp_dir() + "/smp_plain.safetensors";
  const std::vector<std::string> common = {"--save-precision", "float"};
  std::vector<std::string> with = common;
  with.insert(with.end(), {"--sample-every", "2", "--sample-prompt", kCaption, "--sample-prompt", "x"});
  Result r = train(out, with, 4, "1e-2");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(count_lines_with(r.err, "sample: wrote "), 4) << r.err;
  const std::string dir = temp_dir() + "/";
  for (int step : {2, 4})
    for (int i : {0, 1}) {
      const std::string p = dir + "smp-sample" + std::to_string(step) + "-" + std::to_string(i) + ".png";
      ASSERT_TRUE(fs::exists(p)) << p << "\n" << r.err;
      const diffuse::Image im = diffuse::read_image(p);
      EXPECT_EQ(im.width, kSide) << p;
      EXPECT_EQ(im.height, kSide) << p;
      EXPECT_NE(r.err.find("sample: wrote " + p + " (step " + std::to_string(step) + ","), std::string::npos) << r.err;
    }
  for (int step : {1, 3}) EXPECT_FALSE(fs::exists(dir + "smp-sample" + std::to_string(step) + "-0.png")) << step;

  // Sampling does not disturb training: the same run without samples trains the same LoRA, bit
  // for bit, with the same loss log.
  Result p = train(plain, common, 4, "1e-2");
  ASSERT_EQ(p.exit_code, 0) << p.err;
  EXPECT_EQ(count_lines_with(p.err, "sample:"), 0) << p.err;
  const std::string a = tensor_bytes(out), b = tensor_bytes(plain);
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "the LoRA trained with sample images differs from the one trained without";
  EXPECT_EQ(slurp(out + ".csv"), slurp(plain + ".csv"));

  // The last sample is the final LoRA's image: `diffuse generate` with it at the same settings
  // (fp32, seed, size, sampler, steps, guidance) gives the same pixels; without it, others.
  auto generate = [&](const std::vector<std::string>& lora, const std::string& png) {
    std::vector<std::string> args = {"generate", "-m", sd1_model(), "-W", std::to_string(kSide), "-H",
                                     std::to_string(kSide), "-p", kCaption, "--steps", "20", "--cfg-scale", "7",
                                     "-s", "3", "--sampler", "euler_a", "--rng", "cuda", "--precision", "fp32",
                                     "-o", png, "-q"};
    args.insert(args.end(), lora.begin(), lora.end());
    Result g = run(args, 300);
    EXPECT_EQ(g.exit_code, 0) << g.err;
    return g.exit_code == 0 ? diffuse::read_image(png).pixels : std::vector<uint8_t>();
  };
  const std::vector<uint8_t> sample = diffuse::read_image(dir + "smp-sample4-0.png").pixels;
  const std::vector<uint8_t> with_lora = generate({"--lora", out + ":1"}, dir + "smp_gen_lora.png");
  const std::vector<uint8_t> base = generate({}, dir + "smp_gen_base.png");
  ASSERT_FALSE(with_lora.empty() || base.empty());
  EXPECT_TRUE(sample == with_lora) << "the step-4 sample is not the final LoRA's image";
  EXPECT_FALSE(sample == base) << "the step-4 sample is the base model's image (the LoRA was not applied)";
}

TEST_F(TrainLoraExtras, SampleSettingErrorsNameTheOption) {
  const std::string out = temp_dir() + "/smp_err.safetensors";
  Result sampler = train(out, {"--sample-prompt", "x", "--sample-sampler", "nope"}, 1);
  EXPECT_EQ(sampler.exit_code, 1) << sampler.err;
  EXPECT_NE(sampler.err.find("--sample-sampler nope: unknown sampler 'nope'"), std::string::npos) << sampler.err;
  Result steps = train(out, {"--sample-prompt", "x", "--sample-steps", "0"}, 1);
  EXPECT_EQ(steps.exit_code, 1) << steps.err;
  EXPECT_NE(steps.err.find("--sample-steps 0"), std::string::npos) << steps.err;
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace
