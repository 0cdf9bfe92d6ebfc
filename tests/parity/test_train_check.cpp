// `diffuse train check` against the PyTorch training reference (fixtures/train: PyTorch autograd +
// diffusers' UNet on the tiny sd1 model; see its README.md). The test runs the built binary, reads
// its output with the repo's safetensors reader and compares every key the output shares with the
// reference, with the tolerances the reference's README suggests ("Tolerances"; max|grad| over all
// grad.* = 0.0194, lr = 1e-3):
//   (a) LoRA, ε objective, 3 AdamW steps, full fine-tune gradients: predictions, losses, LoRA
//       gradients, AdamW moments, the weights after each step (by |grad| class), the four
//       exact-zero gradient tensors ("Exact zeros") and fullft.grad.*;
//   (b) no LoRA, min-SNR γ = 5: the base prediction, losses, SNR, weights and weighted losses;
//   (c) LoRA, v objective, min-SNR γ = 5: train.loss.0 against the weighted v loss recomputed here
//       from the reference's own tensors (checks the weighting independently of the code under test);
//   (d) a diffusers folder gives the same outputs as the single file (same weights, same code);
//   (e) bad input: exit code 1, one "diffuse: error:" line naming the file/key, no output file.
// Data: DIFFUSE_SHARED_DIR/fixtures/train when present, else the bundled DIFFUSE_TEST_DATA/train.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../cli/cli_util.h"
#include "core/error.h"
#include "io/tensor_file.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

constexpr double kLr = 1e-3;  // the reference's AdamW settings (README "Setup")
constexpr double kWd = 1e-2;
const char* const kLrArg = "1e-3";
const char* const kWdArg = "1e-2";
const char* const kFullGrads =
    "conv_in.weight,conv_out.weight,down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight,"
    "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight,down_blocks.0.resnets.0.conv1.weight,"
    "down_blocks.0.resnets.0.norm1.weight,time_embedding.linear_1.weight";

// README "Exact zeros": the mid block's self-attention sees one token, so these gradients are exactly 0.
const std::set<std::string> kExactZero = {
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight",
};

// ---- data ------------------------------------------------------------------------------------

struct Fixtures {
  std::string ref, lora, model, diffusers;  // diffusers: the sd1 diffusers folder, if any
};

std::string first_existing(const std::vector<std::string>& paths) {
  for (const std::string& p : paths)
    if (fs::exists(p)) return p;
  return "";
}

// The shared fixtures when present, else the bundled copy (both files from the same place).
Fixtures fixtures() {
  const std::string shared = std::string(DIFFUSE_SHARED_DIR) + "/fixtures/";
  const std::string bundled = std::string(DIFFUSE_TEST_DATA) + "/";
  Fixtures f;
  for (const std::string& dir : {shared + "train/", bundled + "train/"})
    if (fs::exists(dir + "sd1_train_ref.safetensors") && fs::exists(dir + "sd1_train_lora_init.safetensors")) {
      f.ref = dir + "sd1_train_ref.safetensors";
      f.lora = dir + "sd1_train_lora_init.safetensors";
      break;
    }
  f.model = first_existing({shared + "sd1/model/tiny-sd1.safetensors", bundled + "sd1/model/tiny-sd1.safetensors"});
  f.diffusers = first_existing({shared + "sd1/model/diffusers", bundled + "sd1/model/diffusers"});
  return f;
}

#define REQUIRE_FIXTURES(f)                                                                                    \
  if ((f).ref.empty() || (f).lora.empty() || (f).model.empty())                                                \
  GTEST_SKIP() << "training fixtures not found: need train/sd1_train_ref.safetensors, "                       \
                  "train/sd1_train_lora_init.safetensors and sd1/model/tiny-sd1.safetensors under "            \
                  DIFFUSE_SHARED_DIR "/fixtures or " DIFFUSE_TEST_DATA

std::string tmp(const std::string& name) { return clitest::temp_dir() + "/" + name; }

// Removes the run's temporary folder (clitest::temp_dir(), a mkdtemp folder) at the end.
class TempCleanup : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(clitest::temp_dir(), ec);
  }
};
const ::testing::Environment* const kCleanup = ::testing::AddGlobalTestEnvironment(new TempCleanup);

Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

double max_abs(const Tensor& t) {
  const Tensor x = as_f32(t);
  double m = 0;
  for (int64_t i = 0; i < x.numel(); ++i) m = std::max(m, std::fabs(double(x.f32()[i])));
  return m;
}

// Runs `diffuse train check <args> -o <out>`; true when it exited 0 and wrote `out`, which *file
// then holds. Prints the run time.
bool run_check(const std::vector<std::string>& args, const std::string& out, TensorFile* file) {
  std::vector<std::string> argv = {"train", "check"};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), {"-o", out});
  const auto t0 = std::chrono::steady_clock::now();
  const clitest::Result r = clitest::run(argv, 600);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  diffuse train check -> %s: exit %d, %.2f s\n", fs::path(out).filename().c_str(), r.exit_code, s);
  EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << "\n" << r.err;
  EXPECT_EQ(r.exit_code, 0) << r.err;
  if (r.exit_code != 0 || !fs::exists(out)) return false;
  try {
    *file = load_safetensors(out);
  } catch (const Error& e) {
    ADD_FAILURE() << "cannot read the output: " << e.what();
    return false;
  }
  return true;
}

std::vector<std::string> base_args(const Fixtures& f, const std::string& model) {
  return {"-m", model, "--inputs", f.ref};
}

// ---- comparison ------------------------------------------------------------------------------

// One tolerance group: every element checked against its own tolerance; the summary line gives
// the largest |Δ|, the largest |Δ|/tol and the element where that ratio peaks.
struct Group {
  std::string name, rule;  // rule: the tolerance in words
  int64_t n = 0, fails = 0;
  std::set<std::string> keys;
  double max_err = 0, max_ratio = -1;
  std::string worst;

  Group(std::string nm, std::string r) : name(std::move(nm)), rule(std::move(r)) {}

  void add(const std::string& key, int64_t i, double out, double ref, double tol, const std::string& note = "") {
    ++n;
    keys.insert(key);
    const double err = std::fabs(out - ref);
    const bool ok = std::isfinite(out) && err <= tol;
    const double ratio = !std::isfinite(err) ? INFINITY : tol > 0 ? err / tol : (err == 0 ? 0 : INFINITY);
    if (std::isfinite(err)) max_err = std::max(max_err, err);
    else max_err = INFINITY;
    if (ratio > max_ratio) max_ratio = ratio, worst = describe(key, i, out, ref, err, tol, note);
    if (!ok && ++fails <= 5)
      ADD_FAILURE() << name << " [" << rule << "]: " << describe(key, i, out, ref, err, tol, note);
  }
  static std::string describe(const std::string& key, int64_t i, double out, double ref, double err, double tol,
                              const std::string& note) {
    std::ostringstream ss;
    ss.precision(9);
    ss << key << "[" << i << "]: out " << out << " ref " << ref << " |Δ| " << err << " tol " << tol;
    if (!note.empty()) ss << " (" << note << ")";
    return ss.str();
  }
  void summary() const {
    std::printf("  %-36s %3zu tensors %7lld el  max|Δ| %-10.3g max|Δ|/tol %-8.3g [%s]\n", name.c_str(), keys.size(),
                (long long)n, max_err, std::max(0.0, max_ratio), rule.c_str());
    if (n) std::printf("  %-36s   worst: %s\n", "", worst.c_str());
    EXPECT_EQ(fails, 0) << name << ": " << fails << " of " << n << " elements outside " << rule << "; worst " << worst;
  }
};

// Elementwise over one tensor pair; tol(i) gives element i's tolerance, note(i) a description.
template <class Tol>
void add_tensor(Group& g, const std::string& key, const Tensor& out, const Tensor& ref, Tol tol,
                const std::function<std::string(int64_t)>& note = nullptr) {
  if (out.shape() != ref.shape()) {
    ADD_FAILURE() << key << ": output " << out.str() << ", reference " << ref.str();
    return;
  }
  const Tensor o = as_f32(out), r = as_f32(ref);
  for (int64_t i = 0; i < o.numel(); ++i)
    g.add(key, i, o.f32()[i], r.f32()[i], tol(i), note ? note(i) : std::string());
}

// Every output tensor is finite.
void expect_finite(const TensorFile& out) {
  int64_t bad = 0;
  std::string first;
  for (const TensorEntry& e : out.tensors) {
    const Tensor t = as_f32(e.tensor);
    for (int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(t.f32()[i]) && bad++ == 0) first = e.name + "[" + std::to_string(i) + "]";
  }
  EXPECT_EQ(bad, 0) << bad << " non-finite output values, first " << first;
}

// Every reference key with one of `prefixes` is in the output (no silent skipping).
void expect_present(const TensorFile& out, const TensorFile& ref, const std::vector<std::string>& prefixes) {
  int64_t n = 0, missing = 0;
  for (const TensorEntry& e : ref.tensors)
    for (const std::string& p : prefixes)
      if (starts_with(e.name, p)) {
        ++n;
        if (!out.find(e.name) && ++missing <= 10) ADD_FAILURE() << "output lacks reference key " << e.name;
        break;
      }
  std::printf("  %lld reference keys of kinds", (long long)n);
  for (const std::string& p : prefixes) std::printf(" %s*", p.c_str());
  std::printf(": %lld missing from the output\n", (long long)missing);
  EXPECT_EQ(missing, 0);
  EXPECT_GT(n, 0);
}

// Relative tolerance for a scalar or small tensor: |Δ| <= rel·|ref| per element.
auto relative(const Tensor& ref, double rel) {
  const Tensor r = as_f32(ref);
  return [r, rel](int64_t i) { return rel * std::fabs(double(r.f32()[i])); };
}

// Compares every key `out` shares with `ref` by the README's suggested tolerances (cases (a), (b));
// a shared key no rule covers is a failure. Maxima are the reference's; g is the reference's
// grad.<same key> (the gradient at the initial LoRA), lr = 1e-3:
//   ref.*.pred                       abs 2e-5 elementwise
//   ref.*.loss*, train.loss.0/1      1e-5 relative;   train.loss.2/3: 2e-4 relative
//   ref.*.snr, ref.*.minsnr*_weight  1e-5 relative (no README row: the losses' tolerance)
//   grad.*                           abs 1e-3·max|grad| over all grad.*, and (the README's
//                                    alternative, checked too) 1e-3 of each tensor's max
//   the 4 exact-zero grad.* tensors  exactly 0 (README "Exact zeros")
//   train.step1.adam.exp_avg.*       abs 1e-3·max of the group;  exp_avg_sq.*: 2e-3·max of the group
//   fullft.grad.*                    abs 1e-4·max over all fullft.grad.*, and 5e-4 of each tensor's max
//   train.step1.*                    |g| ≥ 1e-5: abs 1e-6;  1e-6 ≤ |g| < 1e-5: 5e-3·lr;  the rest: 2·lr
//   exact-zero tensors, step k       init·(1 − lr·wd)^k within 2e-7 (step 1: this check only)
//   train.step2/3.*                  |g| ≥ 1e-5: abs 0.3·lr;  every element: 2·k·lr
// `lora` is the initial LoRA given to the run (the exact-zero tensors' init).
void compare_to_reference(const TensorFile& out, const TensorFile& ref, const TensorFile* lora, double lr, double wd) {
  // Group maxima over the reference ("max|grad| over all grad.*", "max of the group").
  double grad_max = 0, fullft_max = 0, m_max = 0, v_max = 0;
  for (const TensorEntry& e : ref.tensors) {
    if (starts_with(e.name, "grad.")) grad_max = std::max(grad_max, max_abs(e.tensor));
    if (starts_with(e.name, "fullft.grad.")) fullft_max = std::max(fullft_max, max_abs(e.tensor));
    if (starts_with(e.name, "train.step1.adam.exp_avg.")) m_max = std::max(m_max, max_abs(e.tensor));
    if (starts_with(e.name, "train.step1.adam.exp_avg_sq.")) v_max = std::max(v_max, max_abs(e.tensor));
  }
  char buf[160];
  auto fmt = [&buf](const char* f, double x) {
    std::snprintf(buf, sizeof buf, f, x);
    return std::string(buf);
  };

  Group pred("ref.*.pred", "abs 2e-5");
  Group loss01("ref.*.loss*, train.loss.0/1", "1e-5 relative");
  Group snr("ref.*.snr, ref.*.minsnr*_weight_*", "1e-5 relative (README: no row; as the losses)");
  Group loss23("train.loss.2/3", "2e-4 relative");
  Group grad("grad.*", fmt("abs 1e-3 * max|grad| = %.3g", 1e-3 * grad_max));
  Group grad_pt("grad.* per tensor", "1e-3 * the tensor's max|grad|");
  Group zero("grad.* exact zeros", "exactly 0");
  Group exp_avg("train.step1.adam.exp_avg.*", fmt("abs 1e-3 * group max = %.3g", 1e-3 * m_max));
  Group exp_avg_sq("train.step1.adam.exp_avg_sq.*", fmt("abs 2e-3 * group max = %.3g", 2e-3 * v_max));
  Group fullft("fullft.grad.*", fmt("abs 1e-4 * max over fullft = %.3g", 1e-4 * fullft_max));
  Group fullft_pt("fullft.grad.* per tensor", "5e-4 * the tensor's max");
  Group s1_big("train.step1 |g|>=1e-5", "abs 1e-6");
  Group s1_mid("train.step1 1e-6<=|g|<1e-5", fmt("abs 5e-3*lr = %.3g", 5e-3 * lr));
  Group s1_rest("train.step1 |g|<1e-6 (rest)", fmt("abs 2*lr = %.3g", 2 * lr));
  std::map<int, Group> zero_steps, big_steps, all_steps;

  std::set<std::string> handled;
  int64_t shared = 0;
  for (const TensorEntry& e : out.tensors) {
    const std::string& key = e.name;
    const Tensor* rp = ref.find(key);
    if (!rp) continue;
    ++shared;
    const Tensor& r = *rp;
    const Tensor& o = e.tensor;
    handled.insert(key);
    if (starts_with(key, "ref.") && ends_with(key, ".pred")) {
      add_tensor(pred, key, o, r, [](int64_t) { return 2e-5; });
    } else if (starts_with(key, "ref.") && key.find(".loss") != std::string::npos) {
      add_tensor(loss01, key, o, r, relative(r, 1e-5));
    } else if (starts_with(key, "ref.") && (ends_with(key, ".snr") || key.find("_weight_") != std::string::npos)) {
      add_tensor(snr, key, o, r, relative(r, 1e-5));
    } else if (starts_with(key, "train.loss.")) {
      const int k = std::stoi(key.substr(11));
      add_tensor(k <= 1 ? loss01 : loss23, key, o, r, relative(r, k <= 1 ? 1e-5 : 2e-4));
    } else if (starts_with(key, "grad.")) {
      if (kExactZero.count(key.substr(5))) {
        add_tensor(zero, key, o, r, [](int64_t) { return 0.0; });
        const double rm = max_abs(r);
        EXPECT_EQ(rm, 0.0) << key << ": the reference is not all zero";
      } else {
        add_tensor(grad, key, o, r, [&](int64_t) { return 1e-3 * grad_max; });
        const double tmax = max_abs(r);
        add_tensor(grad_pt, key, o, r, [&](int64_t) { return 1e-3 * tmax; });
        EXPECT_GT(max_abs(o), 0.0) << key << " is all zero (README: every other gradient tensor is nonzero)";
      }
    } else if (starts_with(key, "fullft.grad.")) {
      add_tensor(fullft, key, o, r, [&](int64_t) { return 1e-4 * fullft_max; });
      const double tmax = max_abs(r);
      add_tensor(fullft_pt, key, o, r, [&](int64_t) { return 5e-4 * tmax; });
      EXPECT_GT(max_abs(o), 0.0) << key << " is all zero (README: every fullft.grad.* is nonzero)";
    } else if (starts_with(key, "train.step1.adam.exp_avg_sq.")) {
      add_tensor(exp_avg_sq, key, o, r, [&](int64_t) { return 2e-3 * v_max; });
    } else if (starts_with(key, "train.step1.adam.exp_avg.")) {
      add_tensor(exp_avg, key, o, r, [&](int64_t) { return 1e-3 * m_max; });
    } else if (starts_with(key, "train.step")) {
      const size_t dot = key.find('.', 10);
      const int k = std::stoi(key.substr(10, dot - 10));
      const std::string name = key.substr(dot + 1);
      const Tensor* gp = ref.find("grad." + name);
      if (!gp || gp->shape() != r.shape()) {
        ADD_FAILURE() << key << ": the reference has no grad." << name << " of its shape to classify elements by";
        continue;
      }
      const Tensor g = as_f32(*gp);
      auto gnote = [&g](int64_t i) {
        char b[64];
        std::snprintf(b, sizeof b, "|g| %.3g", std::fabs(double(g.f32()[i])));
        return std::string(b);
      };
      if (kExactZero.count(name)) {
        // README "Exact zeros": m = v = 0, so each step applies only the decoupled weight decay:
        // p_k = init·(1 − lr·wd)^k, within 2e-7.
        auto [it, _] = zero_steps.try_emplace(k, "exact-zero tensors, step " + std::to_string(k),
                                              "init*(1-lr*wd)^k, abs 2e-7");
        const Tensor* init = lora ? lora->find(name) : nullptr;
        if (!init) init = ref.find(name);
        if (!init || init->shape() != o.shape()) {
          ADD_FAILURE() << key << ": no initial tensor " << name << " of its shape";
          continue;
        }
        const Tensor in = as_f32(*init), oo = as_f32(o);
        const double decay = std::pow(1.0 - lr * wd, k);
        for (int64_t i = 0; i < oo.numel(); ++i) it->second.add(key, i, oo.f32()[i], in.f32()[i] * decay, 2e-7);
        // The reference agrees with the formula too (the data is what the README says).
        const Tensor rr = as_f32(r);
        for (int64_t i = 0; i < rr.numel(); ++i)
          if (std::fabs(rr.f32()[i] - in.f32()[i] * decay) > 2e-7) {
            ADD_FAILURE() << key << "[" << i << "]: the reference is not init*(1-lr*wd)^k";
            break;
          }
        if (k == 1) continue;  // step 1: only this check (README lists them apart from the |grad| classes)
      }
      const Tensor oo = as_f32(o), rr = as_f32(r);
      if (oo.shape() != rr.shape()) {
        ADD_FAILURE() << key << ": output " << o.str() << ", reference " << r.str();
        continue;
      }
      if (k == 1) {
        // README: |g| >= 1e-5 -> 1e-6; 1e-6 <= |g| < 1e-5 -> 5e-3·lr; the other elements -> 2·lr.
        for (int64_t i = 0; i < oo.numel(); ++i) {
          const double ag = std::fabs(double(g.f32()[i]));
          Group& grp = ag >= 1e-5 ? s1_big : ag >= 1e-6 ? s1_mid : s1_rest;
          const double tol = ag >= 1e-5 ? 1e-6 : ag >= 1e-6 ? 5e-3 * lr : 2 * lr;
          grp.add(key, i, oo.f32()[i], rr.f32()[i], tol, gnote(i));
        }
      } else {
        // README: steps 2/3: |g| >= 1e-5 -> 0.3·lr; all elements -> 2·k·lr.
        auto [big, b_] = big_steps.try_emplace(k, "train.step" + std::to_string(k) + " |g|>=1e-5",
                                               fmt("abs 0.3*lr = %.3g", 0.3 * lr));
        auto [all, a_] = all_steps.try_emplace(k, "train.step" + std::to_string(k) + " all",
                                               fmt("abs 2*k*lr = %.3g", 2.0 * k * lr));
        for (int64_t i = 0; i < oo.numel(); ++i) {
          const double ag = std::fabs(double(g.f32()[i]));
          if (ag >= 1e-5) big->second.add(key, i, oo.f32()[i], rr.f32()[i], 0.3 * lr, gnote(i));
          all->second.add(key, i, oo.f32()[i], rr.f32()[i], 2.0 * k * lr, gnote(i));
        }
      }
    } else {
      handled.erase(key);
      ADD_FAILURE() << key << ": the output shares this key with the reference but the test has no rule for it";
    }
  }
  std::printf("  %lld output keys shared with the reference, %zu compared\n", (long long)shared, handled.size());
  for (const Group* g : {&pred, &loss01, &snr, &loss23, &grad, &grad_pt, &zero, &exp_avg, &exp_avg_sq, &fullft,
                         &fullft_pt, &s1_big, &s1_mid, &s1_rest})
    if (g->n) g->summary();
  for (auto* m : {&zero_steps, &big_steps, &all_steps})
    for (const auto& [k, g] : *m) g.summary();
  if (s1_rest.n) std::printf("  (train.step1 rest class: %lld elements; README counts 191 nonzero-gradient ones)\n",
                             (long long)s1_rest.n);
}

// ---- (a) LoRA + AdamW + full-grads ------------------------------------------------------------

TEST(TrainCheck, LoraAdamWFullGradsEps) {
  const Fixtures f = fixtures();
  REQUIRE_FIXTURES(f);
  std::printf("  reference %s\n  model %s\n", f.ref.c_str(), f.model.c_str());
  TensorFile out;
  std::vector<std::string> args = base_args(f, f.model);
  args.insert(args.end(), {"--lora", f.lora, "--adamw-steps", "3", "--lr", kLrArg, "--weight-decay", kWdArg,
                           "--full-grads", kFullGrads});
  ASSERT_TRUE(run_check(args, tmp("a.safetensors"), &out));
  const TensorFile ref = load_safetensors(f.ref);
  const TensorFile lora = load_safetensors(f.lora);
  expect_finite(out);
  expect_present(out, ref, {"ref.lora.", "grad.", "train.", "fullft.grad."});
  compare_to_reference(out, ref, &lora, kLr, kWd);
}

// ---- (b) no LoRA, min-SNR γ = 5 ---------------------------------------------------------------

TEST(TrainCheck, BaseMinSnr5) {
  const Fixtures f = fixtures();
  REQUIRE_FIXTURES(f);
  TensorFile out;
  std::vector<std::string> args = base_args(f, f.model);
  args.insert(args.end(), {"--min-snr-gamma", "5"});
  ASSERT_TRUE(run_check(args, tmp("b.safetensors"), &out));
  const TensorFile ref = load_safetensors(f.ref);
  expect_finite(out);
  expect_present(out, ref, {"ref.base."});
  for (const char* k : {"ref.base.pred", "ref.base.loss_eps", "ref.base.loss_v", "ref.base.snr",
                        "ref.base.minsnr5_weight_eps", "ref.base.minsnr5_weight_v", "ref.base.loss_minsnr5_eps",
                        "ref.base.loss_minsnr5_v"})
    EXPECT_TRUE(out.find(k)) << "output lacks " << k;
  compare_to_reference(out, ref, nullptr, kLr, kWd);
}

// ---- (c) LoRA, v objective, min-SNR γ = 5: the weighting, checked independently ---------------

TEST(TrainCheck, LoraVMinSnr5Weighting) {
  const Fixtures f = fixtures();
  REQUIRE_FIXTURES(f);
  TensorFile out;
  std::vector<std::string> args = base_args(f, f.model);
  args.insert(args.end(), {"--lora", f.lora, "--objective", "v", "--min-snr-gamma", "5", "--adamw-steps", "1",
                           "--lr", kLrArg, "--weight-decay", kWdArg});
  ASSERT_TRUE(run_check(args, tmp("c.safetensors"), &out));
  const TensorFile ref = load_safetensors(f.ref);
  expect_finite(out);
  // The trained loss is now the weighted v loss, so grad.* / train.* differ from the reference's
  // (ε, unweighted) by design; only the forward results are shared. They must still be written.
  for (const char* k : {"ref.lora.pred", "ref.lora.loss_eps", "ref.lora.loss_v", "ref.lora.minsnr5_weight_v",
                        "ref.lora.loss_minsnr5_v", "train.loss.0", "train.loss.1"})
    EXPECT_TRUE(out.find(k)) << "output lacks " << k;
  int64_t grads = 0, steps = 0;
  for (const TensorEntry& e : out.tensors) {
    grads += starts_with(e.name, "grad.");
    steps += starts_with(e.name, "train.step1.lora_unet_");
  }
  EXPECT_EQ(grads, 256);
  EXPECT_EQ(steps, 256);

  Group pred("ref.lora.pred (v run)", "abs 2e-5");
  Group loss("ref.lora.loss_eps/loss_v (v run)", "1e-5 relative");
  Group weight("minsnr5_weight_v vs ref.base", "1e-5 relative");
  Group weighted("weighted v loss vs recomputed", "1e-5 relative");
  const Tensor* rpred = ref.find("ref.lora.pred");
  const Tensor* vt = ref.find("ref.v_target");
  const Tensor* w = ref.find("ref.base.minsnr5_weight_v");
  ASSERT_TRUE(rpred && vt && w) << "the reference lacks ref.lora.pred / ref.v_target / ref.base.minsnr5_weight_v";
  if (const Tensor* o = out.find("ref.lora.pred")) add_tensor(pred, "ref.lora.pred", *o, *rpred, [](int64_t) { return 2e-5; });
  for (const char* k : {"ref.lora.loss_eps", "ref.lora.loss_v"})
    if (const Tensor* o = out.find(k); o && ref.find(k)) add_tensor(loss, k, *o, *ref.find(k), relative(*ref.find(k), 1e-5));
  if (const Tensor* o = out.find("ref.lora.minsnr5_weight_v"))
    add_tensor(weight, "ref.lora.minsnr5_weight_v", *o, *w, relative(*w, 1e-5));

  // mean_b(w_b · mean_chw((pred − v)²)) from the reference's own tensors, in double.
  const Tensor p = as_f32(*rpred), v = as_f32(*vt), wf = as_f32(*w);
  ASSERT_EQ(p.shape(), v.shape());
  const int64_t B = p.dim(0), per = p.numel() / B;
  ASSERT_EQ(wf.numel(), B);
  double expected = 0;
  for (int64_t b = 0; b < B; ++b) {
    double se = 0;
    for (int64_t i = 0; i < per; ++i) {
      const double d = double(p.f32()[b * per + i]) - v.f32()[b * per + i];
      se += d * d;
    }
    expected += wf.f32()[b] * se / double(per);
  }
  expected /= double(B);
  std::printf("  recomputed min-SNR-5 weighted v loss %.9g (weights %.6g, %.6g)\n", expected, wf.f32()[0], wf.f32()[1]);
  for (const char* k : {"train.loss.0", "ref.lora.loss_minsnr5_v"})
    if (const Tensor* o = out.find(k)) {
      ASSERT_EQ(o->numel(), 1) << k;
      weighted.add(k, 0, as_f32(*o).f32()[0], expected, 1e-5 * std::fabs(expected));
    }
  for (const Group* g : {&pred, &loss, &weight, &weighted}) g->summary();
  EXPECT_EQ(weighted.keys.size(), 2u);
}

// ---- (d) a diffusers folder = the single file -------------------------------------------------

TEST(TrainCheck, DiffusersFolderMatchesFile) {
  const Fixtures f = fixtures();
  REQUIRE_FIXTURES(f);
  if (f.diffusers.empty())
    GTEST_SKIP() << "no sd1 diffusers folder (sd1/model/diffusers under " DIFFUSE_SHARED_DIR "/fixtures or " DIFFUSE_TEST_DATA ")";
  std::vector<std::string> extra = {"--lora", f.lora, "--full-grads", kFullGrads};
  std::vector<std::string> a1 = base_args(f, f.model), a2 = base_args(f, f.diffusers);
  a1.insert(a1.end(), extra.begin(), extra.end());
  a2.insert(a2.end(), extra.begin(), extra.end());
  TensorFile file, folder;
  ASSERT_TRUE(run_check(a1, tmp("d_file.safetensors"), &file));
  ASSERT_TRUE(run_check(a2, tmp("d_folder.safetensors"), &folder));
  expect_finite(folder);
  EXPECT_EQ(file.size(), folder.size());
  // Same weights, same code: within 1e-6 of the group's max (grad.*, fullft.grad.*) or the tensor's.
  double grad_max = 0, fullft_max = 0;
  for (const TensorEntry& e : file.tensors) {
    if (starts_with(e.name, "grad.")) grad_max = std::max(grad_max, max_abs(e.tensor));
    if (starts_with(e.name, "fullft.grad.")) fullft_max = std::max(fullft_max, max_abs(e.tensor));
  }
  Group grad("folder vs file: grad.*", "1e-6 * max|grad.*|");
  Group fullft("folder vs file: fullft.grad.*", "1e-6 * max|fullft.grad.*|");
  Group other("folder vs file: pred, losses", "1e-6 * the tensor's max");
  for (const TensorEntry& e : file.tensors) {
    const Tensor* o = folder.find(e.name);
    if (!o) {
      ADD_FAILURE() << "the folder run lacks " << e.name;
      continue;
    }
    if (starts_with(e.name, "grad.")) add_tensor(grad, e.name, *o, e.tensor, [&](int64_t) { return 1e-6 * grad_max; });
    else if (starts_with(e.name, "fullft.grad."))
      add_tensor(fullft, e.name, *o, e.tensor, [&](int64_t) { return 1e-6 * fullft_max; });
    else {
      const double m = max_abs(e.tensor);
      add_tensor(other, e.name, *o, e.tensor, [m](int64_t) { return 1e-6 * m; });
    }
  }
  for (const Group* g : {&grad, &fullft, &other}) g->summary();
  EXPECT_EQ(grad.keys.size(), 256u);
  EXPECT_EQ(fullft.keys.size(), 7u);
}

// ---- (e) errors -------------------------------------------------------------------------------

// Exit code 1, exactly one stderr line starting "diffuse: error:" (the last line: progress lines
// may precede it), naming each of `names`; no output file (nor its temporary) left behind.
void expect_clean_error(const std::vector<std::string>& args, const std::string& out,
                        const std::vector<std::string>& names) {
  std::vector<std::string> argv = {"train", "check"};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), {"-o", out});
  const clitest::Result r = clitest::run(argv, 600);
  EXPECT_EQ(r.signal, 0) << "killed by signal " << r.signal << "\n" << r.err;
  EXPECT_EQ(r.exit_code, 1) << r.err;
  std::vector<std::string> lines;
  std::istringstream ss(r.err);
  for (std::string l; std::getline(ss, l);) lines.push_back(l);
  int errors = 0;
  for (const std::string& l : lines) errors += starts_with(l, "diffuse: error:");
  EXPECT_EQ(errors, 1) << "stderr:\n" << r.err;
  ASSERT_FALSE(lines.empty());
  const std::string& last = lines.back();
  EXPECT_TRUE(starts_with(last, "diffuse: error:")) << "the last stderr line is not the error:\n" << r.err;
  for (const std::string& n : names) EXPECT_NE(last.find(n), std::string::npos) << "error does not name " << n << ": " << last;
  EXPECT_FALSE(fs::exists(out)) << out << " was created";
  EXPECT_FALSE(fs::exists(out + ".tmp")) << out << ".tmp was left behind";
  std::printf("  exit %d, %zu stderr line(s); %s\n", r.exit_code, lines.size(), last.c_str());
}

TEST(TrainCheckErrors, MissingInputKey) {
  const Fixtures f = fixtures();
  REQUIRE_FIXTURES(f);
  const TensorFile ref = load_safetensors(f.ref);
  std::vector<std::pair<std::string, Tensor>> kept;
  for (const TensorEntry& e : ref.tensors)
    if (e.name != "input.noise") kept.emplace_back(e.name, e.tensor);
  ASSERT_EQ(kept.size() + 1, ref.size());
  const std::string inputs = tmp("no_noise.safetensors");
  save_safetensors(inputs, kept, ref.metadata);
  expect_clean_error({"-m", f.model, "--inputs", inputs, "--lora", f.lora}, tmp("e1.safetensors"),
                     {inputs, "input.noise"});
}

TEST(TrainCheckErrors, LoraModuleTheUNetLacks) {
  const Fixtures f = fixtures();
  REQUIRE_FIXTURES(f);
  const TensorFile lora = load_safetensors(f.lora);
  // Rename one module (its down, up and alpha) to a transformer block the tiny UNet does not have.
  const std::string from = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.";
  const std::string to = "lora_unet_down_blocks_0_attentions_7_transformer_blocks_0_attn1_to_q.";
  std::vector<std::pair<std::string, Tensor>> renamed;
  int n = 0;
  for (const TensorEntry& e : lora.tensors) {
    const bool hit = starts_with(e.name, from);
    n += hit;
    renamed.emplace_back(hit ? to + e.name.substr(from.size()) : e.name, e.tensor);
  }
  ASSERT_EQ(n, 3) << "expected down, up and alpha of " << from;
  const std::string path = tmp("bad_module_lora.safetensors");
  save_safetensors(path, renamed, lora.metadata);
  expect_clean_error({"-m", f.model, "--inputs", f.ref, "--lora", path}, tmp("e2.safetensors"),
                     {path, to.substr(0, to.size() - 1)});
}

TEST(TrainCheckErrors, AdamWStepsWithoutLora) {
  const Fixtures f = fixtures();
  REQUIRE_FIXTURES(f);
  expect_clean_error({"-m", f.model, "--inputs", f.ref, "--adamw-steps", "3"}, tmp("e3.safetensors"), {"--lora"});
}

TEST(TrainCheckErrors, MissingInputsFile) {
  const Fixtures f = fixtures();
  REQUIRE_FIXTURES(f);
  const std::string missing = tmp("does-not-exist.safetensors");
  expect_clean_error({"-m", f.model, "--inputs", missing, "--lora", f.lora}, tmp("e4.safetensors"), {missing});
}

}  // namespace
}  // namespace diffuse
