// `diffuse train full` end to end on the tiny fixtures (full fine-tuning into a single file):
//  - on eight 64×64 images of one pattern the validation loss falls by at least 20%;
//  - the output has exactly the input's tensor names and shapes (the original, ldm layout), the
//    non-UNet tensors with the values they had (in the save precision), the UNet's trained;
//    `diffuse info` reports the same family and `diffuse generate -m OUT` runs on it;
//  - a run resumed from its intermediate state ends bit-identical to the run that never stopped
//    (EMA included) with the same loss log;
//  - --ema: the saved weights equal an EMA recomputed here from the base weights and the weights
//    of runs without EMA after steps 1 and 2 (constant decay, and diffusers' warmup);
//  - --train-text-encoder (SD 1.x CLIP, SD 2.x OpenCLIP with its fused in_proj) writes the trained
//    encoder back under its own names; bad inputs fail naming the option and write nothing;
//  - --prediction v (kohya's --v_parameterization) trains the v objective on an SD 1.x model and
//    says so in modelspec.prediction_type; training the result again keeps v without the flag;
//    --zero-terminal-snr (v only) is declared (ss_zero_terminal_snr) and generate samples with it;
//  - --min-timestep / --max-timestep (kohya's) set the range the step's timesteps come from.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "cli_util.h"
#include "io/tensor_file.h"
#include "train_util.h"

using namespace clitest;

namespace {

std::string sd2_model() { return data("sd2/model/tiny-sd2.safetensors"); }

std::string dir() { return temp_dir() + "/full"; }

const std::string& dataset() {
  static const std::string d = write_dataset(dir() + "/data", 0);
  return d;
}

std::vector<std::string> train_args(const std::string& model, const std::string& out, int steps,
                                    std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {"train", "full", "-m", model, "--data", dataset(), "-o", out, "--resolution",
                                std::to_string(kSide), "--steps", std::to_string(steps), "--lr", "1e-3", "--seed", "1",
                                "--save-precision", "float"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

bool is_unet(const std::string& name) { return name.rfind("model.diffusion_model.", 0) == 0; }
bool is_te(const std::string& name) { return name.rfind("cond_stage_model.", 0) == 0; }

// Every tensor of a file as f32 values, by name.
std::map<std::string, std::vector<float>> values_of(const diffuse::TensorFile& f) {
  std::map<std::string, std::vector<float>> out;
  for (const auto& e : f.tensors) {
    if (!diffuse::dtype_is_float(e.tensor.dtype())) continue;
    const diffuse::Tensor t = e.tensor.to(diffuse::DType::F32);
    out[e.name].assign(t.f32(), t.f32() + t.numel());
  }
  return out;
}

bool same_bytes(const diffuse::Tensor& a, const diffuse::Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

// The output against the input: the same names and shapes in the same order; tensors `trained`
// selects may differ (counted), every other one holds the input's values exactly, float ones in
// the save precision these runs use (float: the fixtures' f16 -> f32 is exact).
struct LayoutCheck {
  int trained_changed = 0, trained_total = 0;
};
LayoutCheck expect_same_layout(const std::string& in_path, const std::string& out_path,
                               const std::function<bool(const std::string&)>& trained) {
  LayoutCheck r;
  const diffuse::TensorFile in = diffuse::load_safetensors(in_path), out = diffuse::load_safetensors(out_path);
  EXPECT_EQ(in.size(), out.size()) << out_path;
  for (const auto& e : in.tensors) {
    const diffuse::Tensor* t = out.find(e.name);
    if (!t) {
      ADD_FAILURE() << out_path << " lacks " << e.name;
      continue;
    }
    EXPECT_EQ(t->shape(), e.tensor.shape()) << e.name;
    if (!trained(e.name)) {  // its values, in the save precision (float: f32) where it is a float tensor
      const bool is_float = diffuse::dtype_is_float(e.tensor.dtype());
      EXPECT_EQ(t->dtype(), is_float ? diffuse::DType::F32 : e.tensor.dtype()) << e.name;
      EXPECT_TRUE(same_bytes(*t, is_float ? e.tensor.to(diffuse::DType::F32) : e.tensor))
          << e.name << " changed but is not trained";
      continue;
    }
    ++r.trained_total;
    const diffuse::Tensor a = t->to(diffuse::DType::F32), b = e.tensor.to(diffuse::DType::F32);
    r.trained_changed += std::memcmp(a.data(), b.data(), a.bytes()) != 0;
  }
  return r;
}

void expect_same_file_tensors(const std::string& a, const std::string& b) {
  const diffuse::TensorFile fa = diffuse::load_safetensors(a), fb = diffuse::load_safetensors(b);
  ASSERT_EQ(fa.size(), fb.size());
  for (const auto& e : fa.tensors) {
    const diffuse::Tensor* t = fb.find(e.name);
    ASSERT_TRUE(t) << e.name;
    EXPECT_TRUE(same_bytes(*t, e.tensor)) << e.name << " differs";
  }
}

std::string family_of(const std::string& path) {
  Result r = run({"info", path}, 60);
  std::smatch m;
  if (r.exit_code == 0 && std::regex_search(r.out, m, std::regex("family:\\s+(\\S+)"))) return m[1].str();
  return "? (" + r.err + ")";
}

void expect_generates(const std::string& model, const std::string& tag) {
  const std::string png = dir() + "/gen_" + tag + ".png";
  Result r = run({"generate", "-m", model, "-W", "64", "-H", "64", "-p", kCaption, "--steps", "2", "-o", png, "-q"}, 120);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(png)) << png;
}

}  // namespace

TEST(TrainFull, LearnsWritesTheOriginalLayoutAndResumesBitIdentical) {
  const std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "tiny sd1 model not found";
  const std::string out = dir() + "/a/full.safetensors";
  fs::create_directories(dir() + "/a");
  const auto t0 = std::chrono::steady_clock::now();
  const int steps = 60;
  Result r = run(train_args(model, out, steps, {"--save-every", "30", "--ema", "0.9"}), 600);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const double v0 = parse_loss(r.err, "start"), v1 = parse_loss(r.err, "end");
  std::printf("[ figures  ] sd1 full: %d steps in %.1f s, validation loss %.6f -> %.6f (ratio %.3f)\n", steps,
              seconds_since(t0), v0, v1, v1 / v0);
  ASSERT_TRUE(std::isfinite(v0) && std::isfinite(v1)) << r.err;
  EXPECT_LE(v1, 0.8 * v0) << "the validation loss did not fall by 20%";
  EXPECT_NE(r.err.find("the checkpoints hold the EMA weights"), std::string::npos) << r.err;

  // The original layout: the input's names and shapes; only the UNet changed.
  const LayoutCheck lc = expect_same_layout(model, out, is_unet);
  std::printf("[ figures  ] %d of %d UNet tensors changed\n", lc.trained_changed, lc.trained_total);
  EXPECT_EQ(lc.trained_total, 684);
  EXPECT_GE(lc.trained_changed, lc.trained_total * 95 / 100);
  EXPECT_EQ(family_of(out), "sd1");
  expect_generates(out, "sd1");

  // The intermediate checkpoint and state; resuming from the state ends where the run ended.
  const std::string inter = dir() + "/a/full-step30.safetensors", state = out + ".state.safetensors";
  ASSERT_TRUE(fs::exists(inter) && fs::exists(state));
  fs::create_directories(dir() + "/b");
  const std::string out_b = dir() + "/b/full.safetensors";
  std::vector<std::string> resume = train_args(model, out_b, steps, {"--save-every", "30", "--ema", "0.9"});
  resume.insert(resume.end(), {"--resume", state});
  Result rb = run(resume, 600);
  ASSERT_EQ(rb.exit_code, 0) << rb.err;
  EXPECT_NE(rb.err.find("resuming at step 30/60"), std::string::npos) << rb.err;
  expect_same_file_tensors(out, out_b);
  EXPECT_EQ(slurp(out + ".csv"), slurp(out_b + ".csv"));

  // A state from other settings is refused, naming what differs.
  std::vector<std::string> other = train_args(model, dir() + "/b/other.safetensors", steps, {"--ema", "0.5"});
  other.insert(other.end(), {"--resume", state});
  Result rc = run(other, 120);
  EXPECT_EQ(rc.exit_code, 1);
  EXPECT_NE(rc.err.find("ema (state 0.9, now 0.5)"), std::string::npos) << rc.err;
  EXPECT_FALSE(fs::exists(dir() + "/b/other.safetensors"));
}

TEST(TrainFull, EmaMatchesAnAverageRecomputedFromTheWeights) {
  const std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "tiny sd1 model not found";
  fs::create_directories(dir() + "/ema");
  // Two steps each, a checkpoint after the first: without EMA they hold the weights w1, w2.
  auto train = [&](const std::string& name, std::vector<std::string> extra) {
    const std::string out = dir() + "/ema/" + name + ".safetensors";
    extra.insert(extra.end(), {"--save-every", "1"});
    Result r = run(train_args(model, out, 2, extra), 300);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    const std::string step1 = dir() + "/ema/" + name + "-step1.safetensors";
    return std::make_pair(values_of(diffuse::load_safetensors(step1)), values_of(diffuse::load_safetensors(out)));
  };
  const auto base = values_of(diffuse::load_safetensors(model));
  const auto [w1, w2] = train("plain", {});
  const auto [c1, c2] = train("const", {"--ema", "0.5", "--no-ema-warmup"});  // d = 0.5 at every step
  const auto [m1, m2] = train("warm", {"--ema", "0.9"});  // diffusers' warmup: d_1 = 0, d_2 = min(0.9, 2/11)
  // ema ← ema − (1 − d)·(ema − w), recomputed in double from the f32 weights. f32 rounding of
  // the trainer's three operations: a few ulp of the largest operand.
  auto step = [](double e, double w, double d) { return e - (1 - d) * (e - w); };
  double worst = 0, moved = 0;
  size_t n = 0;
  auto check = [&](float got, double want, double scale) { worst = std::max(worst, std::fabs(got - want) / scale); };
  for (const auto& [name, b] : base) {
    if (!is_unet(name)) {
      EXPECT_EQ(c2.at(name), b) << name;
      continue;
    }
    const auto &a1 = w1.at(name), &a2 = w2.at(name);
    for (size_t i = 0; i < b.size(); ++i, ++n) {
      const double scale = std::max({std::fabs(double(b[i])), std::fabs(double(a1[i])), std::fabs(double(a2[i])), 1e-30});
      check(c1.at(name)[i], step(b[i], a1[i], 0.5), scale);
      check(c2.at(name)[i], step(step(b[i], a1[i], 0.5), a2[i], 0.5), scale);
      check(m1.at(name)[i], a1[i], scale);
      check(m2.at(name)[i], step(a1[i], a2[i], 2.0 / 11.0), scale);
      moved = std::max(moved, std::fabs(double(a1[i]) - b[i]) / scale);
    }
  }
  std::printf("[ figures  ] EMA over %zu UNet values x 4 checkpoints: worst error %.2e of the operands' magnitude; "
              "largest step-1 change %.2e of it\n",
              n, worst, moved);
  EXPECT_GT(moved, 1e-3) << "the first step barely moved the weights: the check would prove nothing";
  EXPECT_LT(worst, 5e-7);
}

TEST(TrainFull, TextEncoderTrainsUnderItsOwnNames) {
  struct Case {
    std::string name, model, family;
  };
  for (const Case& c : {Case{"sd1", sd1_model(), "sd1"}, Case{"sd2", sd2_model(), "sd2"}}) {
    SCOPED_TRACE(c.name);
    if (c.model.empty()) continue;
    const std::string out = dir() + "/te_" + c.name + ".safetensors";
    Result r = run(train_args(c.model, out, 2, {"--train-text-encoder", "--text-encoder-lr", "1e-4"}), 300);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find("text encoder tensors"), std::string::npos) << r.err;
    // SD 2.x's last text block is unused (the encoder stops at the penultimate layer): as it was.
    const std::regex unused_block("cond_stage_model\\.model\\.transformer\\.resblocks\\.(\\d+)\\.");
    int last = -1;
    for (const auto& e : diffuse::load_safetensors(c.model).tensors) {
      std::smatch m;
      if (std::regex_search(e.name, m, unused_block)) last = std::max(last, std::stoi(m[1].str()));
    }
    const std::string last_block = "cond_stage_model.model.transformer.resblocks." + std::to_string(last) + ".";
    const LayoutCheck lc = expect_same_layout(c.model, out, [&](const std::string& n) {
      if (is_unet(n)) return true;
      if (!is_te(n) || (last >= 0 && n.rfind(last_block, 0) == 0)) return false;
      // Frozen in every family: the embeddings (and OpenCLIP's scalars).
      return n.find("embedding") == std::string::npos && n.find("logit_scale") == std::string::npos &&
             n.find("text_projection") == std::string::npos;
    });
    std::printf("[ figures  ] %s: %d of %d trained tensors changed (UNet and text encoder)\n", c.name.c_str(),
                lc.trained_changed, lc.trained_total);
    EXPECT_GE(lc.trained_changed, lc.trained_total * 9 / 10);
    EXPECT_GT(lc.trained_total, 684);
    EXPECT_EQ(family_of(out), c.family);
    expect_generates(out, "te_" + c.name);
  }
}

TEST(TrainFull, BadInputFailsNamingTheOption) {
  const std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "tiny sd1 model not found";
  const std::string out = dir() + "/bad.safetensors";
  struct Case {
    std::vector<std::string> extra;
    std::string model, expect;
  };
  const std::string folder = fs::path(model).parent_path().string() + "/diffusers";
  std::vector<Case> cases = {{{"--ema", "1"}, model, "--ema 1: the EMA decay must be in [0, 1)"},
                             {{"--ema", "-0.1"}, model, "--ema -0.1: the EMA decay must be in [0, 1)"},
                             {{"--no-ema-warmup"}, model, "--no-ema-warmup: only with --ema"},
                             {{"--save-precision=fp8"}, model, "--save-precision fp8"},
                             {{"--prediction", "x0"}, model, "--prediction x0: expected eps or v"},
                             {{"--prediction", "eps", "--v_parameterization"}, model,
                              "--v-parameterization and --prediction eps disagree"},
                             {{"--zero-terminal-snr"}, model, "--zero-terminal-snr needs the v objective (--prediction v)"},
                             {{"--min-timestep", "500", "--max-timestep", "500"}, model,
                              "--min-timestep 500 / --max-timestep 500: need 0 <= min < max <= 1000"},
                             {{"--max_timestep", "1001"}, model, "--max-timestep 1001: need 0 <= min < max <= 1000"},
                             {{"--min-timestep", "-1"}, model, "--min-timestep -1 / --max-timestep 1000"}};
  if (fs::is_directory(folder)) cases.push_back({{}, folder, "a diffusers folder; train full writes the original (ldm)"});
  for (const Case& c : cases) {
    std::vector<std::string> args = train_args(c.model, out, 2, c.extra);
    if (c.extra.size() == 1 && c.extra[0].rfind("--save-precision=", 0) == 0)  // instead of "float"
      args.erase(std::find(args.begin(), args.end(), "--save-precision"), args.end() - 1);
    Result r = run(args, 120);
    EXPECT_EQ(r.exit_code, 1) << c.expect;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out));
  }
}

TEST(TrainFull, VPredictionIsTrainedDeclaredAndKept) {
  const std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "tiny sd1 model not found";
  auto declared = [](const std::string& path) {
    const diffuse::TensorFile f = diffuse::load_safetensors(path);
    auto it = f.metadata.find("modelspec.prediction_type");
    return it == f.metadata.end() ? std::string("(none)") : it->second;
  };
  const std::string eps_out = dir() + "/pred_eps.safetensors", v_out = dir() + "/pred_v.safetensors",
                    again = dir() + "/pred_v_again.safetensors", kohya = dir() + "/pred_v_kohya.safetensors";
  Result r = run(train_args(model, eps_out, 1), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("objective eps"), std::string::npos) << r.err;
  EXPECT_EQ(declared(eps_out), "epsilon");
  r = run(train_args(model, v_out, 1, {"--prediction", "v"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("objective v"), std::string::npos) << r.err;
  EXPECT_EQ(declared(v_out), "v");
  r = run(train_args(model, kohya, 1, {"--v_parameterization"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_same_file_tensors(v_out, kohya);  // the same run
  // The two objectives train different weights from one start.
  const auto ve = values_of(diffuse::load_safetensors(eps_out)), vv = values_of(diffuse::load_safetensors(v_out));
  EXPECT_NE(ve.at("model.diffusion_model.out.2.weight"), vv.at("model.diffusion_model.out.2.weight"));
  // A v model trains on as v without the flag (what it declares), and generates as v.
  r = run(train_args(v_out, again, 1), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("objective v"), std::string::npos) << r.err;
  EXPECT_EQ(declared(again), "v");
  r = run({"generate", "-m", again, "-W", "64", "-H", "64", "-p", kCaption, "--steps", "1", "-o", dir() + "/pred_v.png"}, 120);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("v prediction"), std::string::npos) << r.err;
}

TEST(TrainFull, ZeroTerminalSnrIsDeclaredAndSampledWith) {
  const std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "tiny sd1 model not found";
  const std::string z = dir() + "/ztsnr.safetensors", v = dir() + "/ztsnr_plain_v.safetensors";
  Result r = run(train_args(model, z, 1, {"--prediction", "v", "--zero-terminal-snr"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("objective v (zero terminal SNR)"), std::string::npos) << r.err;
  const diffuse::TensorFile f = diffuse::load_safetensors(z);
  ASSERT_TRUE(f.metadata.count("ss_zero_terminal_snr"));
  EXPECT_EQ(f.metadata.at("ss_zero_terminal_snr"), "True");
  // The same step without the rescale trains other weights (the schedule is what differs).
  r = run(train_args(model, v, 1, {"--prediction", "v"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(diffuse::load_safetensors(v).metadata.count("ss_zero_terminal_snr"), 0u);
  EXPECT_NE(values_of(f).at("model.diffusion_model.out.2.weight"),
            values_of(diffuse::load_safetensors(v)).at("model.diffusion_model.out.2.weight"));
  r = run({"generate", "-m", z, "-W", "64", "-H", "64", "-p", kCaption, "--steps", "2", "-o", dir() + "/ztsnr.png"}, 120);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("v prediction (zero terminal SNR)"), std::string::npos) << r.err;
}

TEST(TrainFull, TimestepRangeIsTheOneTrained) {
  const std::string model = sd1_model();
  if (model.empty()) GTEST_SKIP() << "tiny sd1 model not found";
  const std::string def = dir() + "/t_default.safetensors", full = dir() + "/t_full.safetensors",
                    low = dir() + "/t_low.safetensors", high = dir() + "/t_high.safetensors";
  Result r = run(train_args(model, def, 1), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err.find("timesteps ["), std::string::npos) << "the default range is not announced: " << r.err;
  // The whole range given explicitly is the default run, draw for draw.
  r = run(train_args(model, full, 1, {"--min_timestep", "0", "--max_timestep", "1000"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_same_file_tensors(def, full);
  // One-timestep ranges at either end train different weights from each other and from the default.
  r = run(train_args(model, low, 1, {"--max-timestep", "1"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("timesteps [0, 1)"), std::string::npos) << r.err;
  r = run(train_args(model, high, 1, {"--min-timestep", "999"}), 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("timesteps [999, 1000)"), std::string::npos) << r.err;
  const std::string w = "model.diffusion_model.out.2.weight";
  const auto vd = values_of(diffuse::load_safetensors(def)), vl = values_of(diffuse::load_safetensors(low)),
             vh = values_of(diffuse::load_safetensors(high));
  EXPECT_NE(vl.at(w), vh.at(w));
  EXPECT_NE(vl.at(w), vd.at(w));
  EXPECT_NE(vh.at(w), vd.at(w));
}
