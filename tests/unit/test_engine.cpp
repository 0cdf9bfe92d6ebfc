// The engine (api/engine.h) on the tiny SD 1.x model: LoRA switches in one loaded model match
// fresh loads bit for bit and a failed switch leaves the model as it was; runs with their own
// states execute side by side with the results of sequential runs; cancellation; the model cache
// budget; the model-hash cache.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <thread>

#include "api/engine.h"
#include "backend/profiling.h"
#include "core/error.h"
#include "io/tensor_file.h"

namespace fs = std::filesystem;
using namespace diffuse;
using diffuse::api::Engine;
using diffuse::api::EngineOptions;
using diffuse::api::Request;

namespace {

std::string data(const std::string& rel) {
  for (const std::string& base : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/", std::string(DIFFUSE_TEST_DATA) + "/"})
    if (fs::exists(base + rel)) return base + rel;
  return "";
}

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = data("sd1/model/tiny-sd1.safetensors");
    kohya_ = data("sd1-lora/lora-kohya.safetensors");
    peft_ = data("sd1-lora/lora-peft.safetensors");
    if (model_.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("diffuse_test_engine_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  EngineOptions options() const {
    EngineOptions o;
    o.precision = "fp32";
    o.hash_cache_dir = (dir_ / "cache").string();
    return o;
  }
  Request request(int64_t seed = 1) const {
    Request r;
    r.model = model_;
    r.prompt = "a photograph of an astronaut riding a horse";
    r.negative = "blurry";
    r.width = r.height = 64;
    r.steps = 2;
    r.seed = seed;
    r.sampler = "euler";
    return r;
  }
  static std::vector<uint8_t> pixels(const api::RunResult& r, size_t i = 0) { return r.images.at(i).image.pixels; }
  void check_lora_switches(const std::string& precision, const std::string& weights);

  std::string model_, kohya_, peft_;
  fs::path dir_;
};

// Every precision / weight format: the swap keeps the layers' primitives (native weights) or
// replaces them (int8), and either way a switched model computes what a fresh one does.
TEST_F(EngineTest, LoraSwitchesMatchFreshEnginesBitForBit) { check_lora_switches("fp32", "native"); }
TEST_F(EngineTest, LoraSwitchesMatchFreshEnginesBitForBitBf16) { check_lora_switches("bf16", "native"); }
TEST_F(EngineTest, LoraSwitchesMatchFreshEnginesBitForBitInt8) { check_lora_switches("fp32", "int8"); }

void EngineTest::check_lora_switches(const std::string& precision, const std::string& weights) {
  if (kohya_.empty() || peft_.empty()) GTEST_SKIP() << "needs sd1-lora/lora-kohya.safetensors and lora-peft.safetensors";
  auto options = [&] {
    EngineOptions o = EngineTest::options();
    o.precision = precision;
    o.weights = weights;
    return o;
  };
  auto with = [&](std::vector<api::LoraSpec> l) {
    Request r = request();
    r.loras = std::move(l);
    return r;
  };
  const std::vector<api::LoraSpec> A = {{kohya_, 0.8f}}, B = {{peft_, 0.5f}, {kohya_, 0.3f}};
  std::vector<uint8_t> fresh_base, fresh_a, fresh_b;
  {
    Engine e(options());
    fresh_base = pixels(e.generate(with({})));
  }
  {
    Engine e(options());
    fresh_a = pixels(e.generate(with(A)));
  }
  {
    Engine e(options());
    fresh_b = pixels(e.generate(with(B)));
  }
  ASSERT_NE(fresh_base, fresh_a);  // the LoRA changes the picture
  ASSERT_NE(fresh_a, fresh_b);

  Engine e(options());
  EXPECT_EQ(pixels(e.generate(with(A))), fresh_a);
  EXPECT_EQ(pixels(e.generate(with({}))), fresh_base);
  EXPECT_EQ(pixels(e.generate(with(B))), fresh_b);
  EXPECT_EQ(pixels(e.generate(with(A))), fresh_a);
  EXPECT_EQ(e.loaded_models().size(), 1u);  // one load served every switch
}

TEST_F(EngineTest, FailedLoraSwitchLeavesTheModelAsItWas) {
  if (kohya_.empty()) GTEST_SKIP() << "needs sd1-lora/lora-kohya.safetensors";
  // A LoRA whose matrices fit no weight of this model (another architecture's).
  const std::string misfit = (dir_ / "misfit.safetensors").string();
  Tensor down = Tensor::zeros({2, 7}), up = Tensor::zeros({5, 2});
  save_safetensors(misfit, {{"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", down},
                            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", up}});

  Engine e(options());
  Request ra = request();
  ra.loras = {{kohya_, 0.8f}};
  const std::vector<uint8_t> with_a = pixels(e.generate(ra));

  // Switching to {kohya (fits), misfit} fails, through a run and directly.
  Request bad = request();
  bad.loras = {{kohya_, 0.3f}, {misfit, 1.0f}};
  try {
    e.generate(bad);
    FAIL() << "a LoRA that fits nothing was applied";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("misfit"), std::string::npos) << err.what();
  }
  EXPECT_THROW(e.set_loras(model_, bad.loras), Error);

  // The model still has A merged: a run asking for A (no switch) gives A's image, and a fresh
  // engine agrees.
  EXPECT_EQ(pixels(e.generate(ra)), with_a);
  Engine fresh(options());
  EXPECT_EQ(pixels(fresh.generate(ra)), with_a);
}

// A failure while the replacements are being built (after some were): int8 weights refuse a
// non-finite value when they are quantised. The text encoder's modules come after the UNet's, so
// every UNet replacement exists when the NaN fails; none of them may reach the model.
TEST_F(EngineTest, SwitchFailingHalfwayLeavesTheModelAsItWas) {
  if (kohya_.empty()) GTEST_SKIP() << "needs sd1-lora/lora-kohya.safetensors";
  const TensorFile src = load_safetensors(kohya_);
  std::vector<std::pair<std::string, Tensor>> tensors;
  bool poisoned = false;
  for (const TensorEntry& e : src.tensors) {
    Tensor t = e.tensor.to(DType::F32);
    if (!poisoned && e.name.rfind("lora_te_", 0) == 0 && e.name.find(".lora_up.weight") != std::string::npos) {
      t.f32()[0] = std::nanf("");
      poisoned = true;
    }
    tensors.emplace_back(e.name, t);
  }
  ASSERT_TRUE(poisoned) << "no text-encoder up matrix in " << kohya_;
  const std::string nan_lora = (dir_ / "nan.safetensors").string();
  save_safetensors(nan_lora, tensors);

  EngineOptions o = options();
  o.weights = "int8";
  Engine e(o);
  Request ra = request();
  ra.loras = {{kohya_, 0.8f}};
  const std::vector<uint8_t> with_a = pixels(e.generate(ra));
  Request bad = request();
  bad.loras = {{nan_lora, 1.0f}};
  EXPECT_THROW(e.generate(bad), Error);
  EXPECT_EQ(pixels(e.generate(ra)), with_a);
  Request base = request();
  Engine fresh(o);
  EXPECT_EQ(pixels(e.generate(base)), pixels(fresh.generate(base)));  // and switching on still works
}

TEST_F(EngineTest, RunsWithTheirOwnStatesRunSideBySide) {
  Engine e(options());
  const std::vector<uint8_t> s1 = pixels(e.generate(request(1))), s2 = pixels(e.generate(request(2)));
  ASSERT_NE(s1, s2);
  for (int round = 0; round < 2; ++round) {
    std::vector<uint8_t> got1, got2;
    std::string err1, err2;
    auto st1 = e.new_state(), st2 = e.new_state();
    std::thread t1([&] {
      try {
        got1 = pixels(e.generate(request(1), {}, st1.get()));
      } catch (const std::exception& x) {
        err1 = x.what();
      }
    });
    std::thread t2([&] {
      try {
        got2 = pixels(e.generate(request(2), {}, st2.get()));
      } catch (const std::exception& x) {
        err2 = x.what();
      }
    });
    t1.join();
    t2.join();
    EXPECT_EQ(err1, "");
    EXPECT_EQ(err2, "");
    EXPECT_EQ(got1, s1) << "round " << round;
    EXPECT_EQ(got2, s2) << "round " << round;
  }
}

TEST_F(EngineTest, ProgressCanCancelAndTheEngineGoesOn) {
  Engine e(options());
  api::Callbacks cb;
  std::vector<std::pair<int, int>> steps;
  cb.progress = [&](Stage s, int done, int total) {
    if (s == Stage::Denoise) steps.emplace_back(done, total);
    return !(s == Stage::Denoise && done == 1);
  };
  EXPECT_THROW(e.generate(request(), cb), Cancelled);
  ASSERT_EQ(steps.size(), 1u);
  EXPECT_EQ(steps[0], std::make_pair(1, 2));
  Engine fresh(options());
  EXPECT_EQ(pixels(e.generate(request())), pixels(fresh.generate(request())));
}

// Images reach the caller one by one as they are decoded, so a failure later in the batch loses
// nothing already finished.
TEST_F(EngineTest, ImagesArriveAsTheyAreDecoded) {
  Engine e(options());
  Request r = request();
  r.batch = 3;
  std::vector<std::pair<int, std::string>> got;
  api::Callbacks cb;
  cb.on_image = [&](const api::GeneratedImage& g, int i) {
    got.emplace_back(i, g.parameters);
    if (i == 1) throw Error("disk full (simulated)");
  };
  EXPECT_THROW(e.generate(r, cb), Error);
  ASSERT_EQ(got.size(), 2u);  // image 0 was delivered before image 1's failure; image 2 never decoded
  EXPECT_EQ(got[0].first, 0);
  EXPECT_NE(got[0].second.find("Batch pos: 1"), std::string::npos) << got[0].second;
  cb.on_image = [&](const api::GeneratedImage&, int) {};
  EXPECT_EQ(e.generate(r, cb).images.size(), 3u);
}

TEST_F(EngineTest, ModelCacheKeepsWhatTheBudgetAllows) {
  const std::string copy = (dir_ / "copy.safetensors").string();
  fs::copy_file(model_, copy);
  {
    Engine e(options());  // budget 0: only the model in use stays
    e.load(model_);
    e.load(copy);
    EXPECT_EQ(e.loaded_models(), std::vector<std::string>{copy});
  }
  EngineOptions o = options();
  o.model_cache_bytes = size_t(1) << 30;
  Engine e(o);
  e.load(model_);
  EXPECT_EQ(e.load(copy) > 0, true);
  EXPECT_EQ(e.loaded_models().size(), 2u);
  EXPECT_EQ(e.load(model_), 0.0);  // cached: no load
}

TEST_F(EngineTest, ModelHashIsComputedOncePerFileVersion) {
  const std::string copy = (dir_ / "m.safetensors").string();
  fs::copy_file(model_, copy);
  int computed = 0;
  api::Callbacks cb;
  cb.log = [&](const std::string& line, bool) { computed += line.find("hashing") != std::string::npos; };
  Engine e(options());
  const std::string h = e.model_hash(copy, cb);
  EXPECT_EQ(h.size(), 10u);
  EXPECT_EQ(computed, 1);
  EXPECT_TRUE(fs::exists(dir_ / "cache" / "hashes.json"));
  Engine e2(options());  // another engine (process) reads the cache
  EXPECT_EQ(e2.model_hash(copy, cb), h);
  EXPECT_EQ(computed, 1);
  // A changed file (modification time) is hashed again.
  fs::last_write_time(copy, fs::last_write_time(copy) + std::chrono::seconds(5));
  EXPECT_EQ(e2.model_hash(copy, cb), h);
  EXPECT_EQ(computed, 2);
}

}  // namespace

// --vae is part of the model cache's key: one engine switching between the checkpoint's VAE and a
// standalone one with another decoder gives each run the pixels a fresh engine gives it.
TEST_F(EngineTest, VaeSwitchesDoNotReuseTheOtherVae) {
  TensorFile f = open_model_file(model_);
  std::vector<std::pair<std::string, Tensor>> vae;
  const std::string pre = "first_stage_model.";
  for (const TensorEntry& e : f.tensors) {
    if (e.name.rfind(pre, 0) != 0) continue;
    Tensor t = e.tensor.to(DType::F32);
    if (e.name == pre + "decoder.conv_out.bias")
      for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] += 0.5f;
    vae.emplace_back(e.name.substr(pre.size()), std::move(t));
  }
  const std::string file = (dir_ / "brighter.safetensors").string();
  save_safetensors(file, vae);
  Request with_vae = request();
  with_vae.vae = file;
  Engine e(options());
  const std::vector<uint8_t> base = pixels(e.generate(request())), other = pixels(e.generate(with_vae));
  EXPECT_NE(base, other);
  EXPECT_EQ(pixels(e.generate(request())), base);
  EXPECT_EQ(pixels(e.generate(with_vae)), other);
  Engine fresh(options());
  EXPECT_EQ(pixels(fresh.generate(with_vae)), other);
}

// --unet: a UNet-only file with bare ldm names (ComfyUI's unet files) replaces the checkpoint's.
// Its weights are changed here, so the reference is the whole checkpoint with that UNet written
// in: the same pixels, with and without a LoRA (whose base weights must come from the UNet file).
TEST_F(EngineTest, UnetOnlyFileReplacesTheCheckpointsUnet) {
  TensorFile f = open_model_file(model_);
  const std::string pre = "model.diffusion_model.";
  std::vector<std::pair<std::string, Tensor>> unet, whole, diffusers_names;
  for (const TensorEntry& e : f.tensors) {
    Tensor t = e.tensor;
    if (e.name.rfind(pre, 0) == 0) {
      t = e.tensor.to(DType::F32);
      // conv_in, the output bias, every self-attention query and proj_in (what the LoRA merges into)
      if (e.name == pre + "out.2.bias" || e.name == pre + "input_blocks.0.0.weight" ||
          e.name.find("attn1.to_q.weight") != std::string::npos || e.name.find("proj_in.weight") != std::string::npos)
        for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] *= 1.25f;
      unet.emplace_back(e.name.substr(pre.size()), t);
    }
    whole.emplace_back(e.name, t);
  }
  const std::string unet_file = (dir_ / "unet-only.safetensors").string(), whole_file = (dir_ / "whole.safetensors").string();
  save_safetensors(unet_file, unet);
  save_safetensors(whole_file, whole);
  Engine e(options());
  Request with_unet = request();
  with_unet.unet = unet_file;
  Request reference = request();
  reference.model = whole_file;
  const std::vector<uint8_t> got = pixels(e.generate(with_unet));
  EXPECT_EQ(got, pixels(e.generate(reference)));
  EXPECT_NE(got, pixels(e.generate(request())));
  if (!kohya_.empty()) {
    with_unet.loras = reference.loras = {{kohya_, 0.8f}};
    EXPECT_EQ(pixels(e.generate(with_unet)), pixels(e.generate(reference)));
  }

  // Wrong files: a LoRA, and a UNet for another family, are errors naming the flag and the file.
  Request bad = request();
  if (!kohya_.empty()) {
    bad.unet = kohya_;
    try {
      e.generate(bad);
      ADD_FAILURE() << "a LoRA as --unet was accepted";
    } catch (const Error& err) {
      EXPECT_EQ(std::string(err.what()).rfind("--unet " + kohya_ + ": no UNet tensors", 0), 0u) << err.what();
    }
  }
  // (The tiny SD 2.x UNet attends to the same width as the tiny SD 1.x one; SDXL's adds an embedding.)
  const std::string xl = std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sdxl/model/tiny-sdxl.safetensors";
  if (fs::exists(xl)) {
    TensorFile f2 = open_model_file(xl);
    std::vector<std::pair<std::string, Tensor>> u2;
    for (const TensorEntry& t : f2.tensors)
      if (t.name.rfind(pre, 0) == 0) u2.emplace_back(t.name.substr(pre.size()), t.tensor);
    const std::string other = (dir_ / "sdxl-unet.safetensors").string();
    save_safetensors(other, u2);
    bad.unet = other;
    try {
      e.generate(bad);
      ADD_FAILURE() << "an SDXL UNet on an SD 1.x checkpoint was accepted";
    } catch (const Error& err) {
      EXPECT_EQ(std::string(err.what()).rfind("--unet " + other + ": a", 0),
                0u)
          << err.what();
    }
  }
}

// `diffuse bench --profile`'s wrapper: a run through a ProfilingBackend draws what the plain
// backend draws; each denoising step makes the same op calls, one conv2d call per UNet conv layer
// (counted from the file's rank-4 UNet weights) and per step; every conv/linear/matmul call has
// its shape record, and each recorded shape runs again alone on the run's backend.
TEST_F(EngineTest, ProfilingBackendMeasuresWithoutChangingTheRun) {
  Engine plain(options());
  const api::RunResult want = plain.generate(request());

  EngineOptions o = options();
  diffuse::ProfilingBackend* prof = nullptr;
  o.wrap_run_backend = [&prof](std::unique_ptr<diffuse::Backend> b) -> std::unique_ptr<diffuse::Backend> {
    auto p = std::make_unique<diffuse::ProfilingBackend>(std::move(b));
    prof = p.get();
    return p;
  };
  Engine engine(o);
  std::unique_ptr<api::RunState> state = engine.new_state();
  ASSERT_NE(prof, nullptr);
  std::vector<diffuse::OpProfile> steps;  // each denoising step's op calls
  api::Callbacks cb;
  cb.progress = [&](diffuse::Stage s, int done, int) {
    if (s == diffuse::Stage::Encode && done == 1) prof->reset();
    if (s == diffuse::Stage::Denoise) {
      steps.push_back(prof->profile());
      prof->reset();
    }
    return true;
  };
  const auto t0 = std::chrono::steady_clock::now();
  const api::RunResult got = engine.generate(request(), cb, state.get());
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(pixels(got), pixels(want));
  ASSERT_EQ(steps.size(), 2u);

  int64_t unet_convs = 0;
  // (SD 1.x stores a transformer's proj_in/proj_out as 1x1 convs; they run as linear layers.)
  auto ends_with = [](const std::string& s, const std::string& e) {
    return s.size() >= e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0;
  };
  for (const diffuse::TensorEntry& e : diffuse::open_model_file(model_).tensors)
    if (e.name.rfind("model.diffusion_model.", 0) == 0 && e.tensor.rank() == 4 &&
        !ends_with(e.name, "proj_in.weight") && !ends_with(e.name, "proj_out.weight"))
      ++unet_convs;
  ASSERT_GT(unet_convs, 0);
  using diffuse::OpClass;
  for (const diffuse::OpProfile& p : steps) {
    for (int c = 0; c < diffuse::kOpClasses; ++c)
      EXPECT_EQ(p.calls[size_t(c)], steps[0].calls[size_t(c)]) << diffuse::op_class_name(OpClass(c));
    EXPECT_EQ(p.calls[size_t(OpClass::Conv)], unet_convs) << "one batched (CFG) UNet pass a step";
    EXPECT_GT(p.calls[size_t(OpClass::Matmul)], 0);
    EXPECT_GT(p.calls[size_t(OpClass::Attention)], 0);
    EXPECT_GT(p.calls[size_t(OpClass::Norm)], 0);
    EXPECT_LE(p.total(), wall);
    int64_t shape_calls = 0;
    double conv_secs = 0;
    for (const auto& [key, sh] : p.shapes) {
      shape_calls += sh.calls;
      if (sh.op == "conv2d") conv_secs += sh.secs;
      EXPECT_GT(sh.flop, 0) << key;
      EXPECT_GT(diffuse::time_shape_alone(prof->inner(), sh, diffuse::DType::F32, 1), 0) << key;
    }
    EXPECT_EQ(shape_calls, p.calls[size_t(OpClass::Conv)] + p.calls[size_t(OpClass::Matmul)]);
    EXPECT_LE(conv_secs, p.secs[size_t(OpClass::Conv)] * 1.01 + 1e-4);
  }
}
