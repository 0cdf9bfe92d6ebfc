// `diffuse train lora` learns what it is shown, on each family's tiny fixture (SD 1.x, SD 2.x
// with v-prediction, SDXL): a LoRA trained on eight 64×64 images of an orange/teal checkerboard
// captioned "sks pattern" (the acceptance command of issue 12, per family)
//  - lowers the validation loss (fixed noise and timesteps) by at least 20%;
//  - loads back into the trainer (--network-weights) with the run's final validation loss;
//  - pulls generation ("sks pattern", Euler, 20 steps, guidance 7) at least 30% nearer (mean squared
//    distance of the final latent) to the nearest training latent than the same at multiplier 0.
// Figures are printed.
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli_util.h"
#include "io/tensor_file.h"
#include "train_util.h"

using namespace clitest;

namespace {

struct Family {
  const char* name;       // fixture folder: sd1, sd2, sdxl
  const char* objective;  // what the trainer reports
  // Extra training options: the tiny SDXL UNet has no transformer at its full-resolution level,
  // so a LoRA on kohya's default (transformer) targets cannot reach the layers that shape its
  // output there (its validation loss stalls at 0.76 of the start, and generation moves 11% of the
  // way): SDXL trains LoCon as well (--conv-rank, the ResNet and resampler convolutions).
  std::vector<std::string> extra = {};
};

std::string model_of(const Family& f) { return data(std::string(f.name) + "/model/tiny-" + f.name + ".safetensors"); }

class TrainLoraFamilies : public ::testing::TestWithParam<Family> {
 protected:
  std::string dir() const { return temp_dir() + "/" + GetParam().name; }

  // Trains `out` on `data_dir`; returns the trainer's stderr (exit status asserted by the caller).
  Result train(const std::string& data_dir, const std::string& out, int steps, const std::string& start_from = "") {
    std::vector<std::string> args = {"train", "lora", "-m", model_of(GetParam()), "--data", data_dir, "-o", out,
                                     "--resolution", std::to_string(kSide), "--steps", std::to_string(steps), "--lr",
                                     "1e-3", "--rank", std::to_string(kRank), "--seed", "1"};
    if (!start_from.empty()) args.insert(args.end(), {"--network-weights", start_from});
    else args.insert(args.end(), GetParam().extra.begin(), GetParam().extra.end());
    return run(args, 600);
  }

  // The validation loss of LoRA `lora` on `data_dir`'s images (before the one step it takes).
  double loss_of(const std::string& lora, const std::string& data_dir, const std::string& tag) {
    Result r = train(data_dir, dir() + "/probe_" + tag + ".safetensors", 1, lora);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return parse_loss(r.err, "start");
  }

  std::vector<float> generate_latent(const std::string& lora_spec, const std::string& tag) {
    const std::string lat = dir() + "/latent_" + tag + ".safetensors";
    Result r = run({"generate", "-m", model_of(GetParam()), "-W", std::to_string(kSide), "-H", std::to_string(kSide),
                    "-p", kCaption, "--sampler", "euler", "--rng", "cpu", "--steps", "20", "-s", "7", "--save-latent", lat,
                    "--lora", lora_spec, "-o", dir() + "/gen_" + tag + ".png", "-q"},
                   300);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    if (r.exit_code != 0) return {};
    diffuse::TensorFile f = diffuse::load_safetensors(lat);
    const diffuse::Tensor* t = f.find("latent");
    EXPECT_NE(t, nullptr) << lat;
    if (!t) return {};
    diffuse::Tensor c = t->to(diffuse::DType::F32);
    return std::vector<float>(c.f32(), c.f32() + c.numel());
  }
};

TEST_P(TrainLoraFamilies, LearnsItsOwnPattern) {
  const Family& fam = GetParam();
  if (model_of(fam).empty()) GTEST_SKIP() << "tiny-" << fam.name << " fixture not found (../shared/fixtures)";
  const std::string data_a = write_dataset(dir() + "/data_a", 0);
  const std::string lora = dir() + "/sks.safetensors";
  const auto t0 = std::chrono::steady_clock::now();
  const int steps = kSteps;
  Result r = train(data_a, lora, steps);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find(std::string("objective ") + fam.objective), std::string::npos) << r.err;
  const double v0 = parse_loss(r.err, "start"), v1 = parse_loss(r.err, "end");
  std::printf("[ figures  ] %s: %d steps in %.1f s, validation loss %.6f -> %.6f (ratio %.3f)\n", fam.name, steps,
              seconds_since(t0), v0, v1, v1 / v0);
  ASSERT_TRUE(std::isfinite(v0) && std::isfinite(v1)) << r.err;
  EXPECT_LE(v1, 0.8 * v0) << "the validation loss did not fall by 20%";

  // The file loads back into the trainer (--network-weights) and gives the run's final loss.
  const double again = loss_of(lora, data_a, "again");
  EXPECT_NEAR(again, v1, 1e-5 * std::max(1.0, v1)) << "the saved LoRA does not reproduce the run's final loss";

  // Generation with the LoRA is pulled towards the training latents.
  const std::vector<float> g1 = generate_latent(lora + ":1", "m1"), g0 = generate_latent(lora + ":0", "m0");
  ASSERT_FALSE(g1.empty() || g0.empty());
  const std::vector<std::vector<float>> lat = training_latents(model_of(fam), 0);
  const double d1 = nearest_msd(g1, lat), d0 = nearest_msd(g0, lat);
  std::printf("[ figures  ] %s: nearest training latent d(:1) %.5f, d(:0) %.5f (ratio %.3f)\n", fam.name, d1, d0,
              d1 / d0);
  ASSERT_TRUE(std::isfinite(d1) && std::isfinite(d0));
  EXPECT_LE(d1, 0.7 * d0) << "the LoRA did not pull generation 30% nearer to the training latents";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TrainLoraFamilies,
                         ::testing::Values(Family{"sd1", "eps"}, Family{"sd2", "v"},
                                           Family{"sdxl", "eps", {"--conv-rank", "8", "--conv-alpha", "1"}}),
                         [](const ::testing::TestParamInfo<Family>& i) { return std::string(i.param.name); });

}  // namespace
