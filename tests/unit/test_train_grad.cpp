// Model-level gradient checks: the tiny sd1 UNet's and CLIP text encoder's backward passes
// (hand-written per block, with recomputation) against central finite differences of their own
// forward passes, for sampled parameters of every kind (3×3, strided and 1×1 convolutions, linear
// layers, group and layer norms, biases, LoRA adapters on linear layers and on a 1×1 convolution,
// LoCon adapters on 3×3, strided and 1×1 convolution layers).
//
// Method. For a parameter P with analytic gradient g, take a subset S of its elements (all, up to
// 24) and the unit direction d = g_S/|g_S|; the directional derivative is then |g_S|. The finite
// difference runs the real (f32) forward at P ± h·d and P ± (h/2)·d, with the loss accumulated in
// double, and Richardson-extrapolates: D = (4·D(h/2) − D(h))/3, which cancels the h² truncation
// term (leaving O(h⁴)). What remains is the f32 forward's rounding: each loss evaluation carries
// an error ≤ n, so D is off by ≤ (4·2n/h + 2n/(2h))/3 = 3n/h. n is measured, not assumed: the
// loss at P + k·η·d (k = 1..4, η = 1e-4·h, so that the exact change k·η·|g_S| is known to far
// better than n) minus that change and L(P) — its largest deviation, doubled, is the noise floor
// n. h starts at 1e-2 of the subset's RMS value (at least 1e-3) and grows ×4 (up to 3 times)
// while 3n/h exceeds 1e-2·|g_S|. Tolerance: 2e-3·|g_S| (truncation and the remaining O(h⁴)) +
// 3n/h (rounding), and the test fails, naming the parameter, if the rounding part cannot get
// below 1e-2·|g_S| (the check would be meaningless). A wrong backward is far outside: dropping
// any term of a block's backward changes these gradients by O(1) relative.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>

#include "io/tensor_file.h"
#include "models/name_map.h"
#include "models/sd_model.h"
#include "train/layer_params.h"
#include "train/objective.h"
#include "train/lora_network.h"
#include "train/text_encoder_trainer.h"
#include "train/unet_trainer.h"

using namespace diffuse;
using namespace diffuse::train;

namespace {

const std::string kModel = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";

Tensor randn(const Shape& s, std::mt19937& g, float sd = 1.0f) {
  std::normal_distribution<float> n(0.0f, sd);
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g);
  return t;
}

// Directional finite-difference check of `grad` for `value`; `apply` makes the forward see the
// current contents of `value`; `loss` runs the forward.
void check_direction(const std::string& what, Tensor value, Tensor grad, const std::function<void()>& apply,
                     const std::function<double()>& loss, std::mt19937& rng) {
  const int64_t n = value.numel();
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[size_t(i)] = i;
  std::shuffle(idx.begin(), idx.end(), rng);
  idx.resize(size_t(std::min<int64_t>(n, 24)));
  double gnorm = 0, rms = 0;
  for (int64_t i : idx) gnorm += double(grad.f32()[i]) * grad.f32()[i], rms += double(value.f32()[i]) * value.f32()[i];
  gnorm = std::sqrt(gnorm), rms = std::sqrt(rms / double(idx.size()));
  ASSERT_GT(gnorm, 0) << what << ": zero gradient on the sampled elements";
  std::vector<float> orig(idx.size());
  for (size_t j = 0; j < idx.size(); ++j) orig[j] = value.f32()[idx[j]];
  auto at = [&](double step) {
    for (size_t j = 0; j < idx.size(); ++j)
      value.f32()[idx[j]] = float(double(orig[j]) + step * double(grad.f32()[idx[j]]) / gnorm);
    apply();
    return loss();
  };
  const double L0 = at(0);
  // The smallest h (doubling from the start) at which the loss's f32 rounding noise costs at most
  // 1% of the gradient: a larger h than needed lets the truncation error of the difference grow
  // (quadrupling overshot: 5.4e-3 where 2.7e-3 sufficed gave an 8% error on a LoRA down weight).
  double h = std::max(1e-2 * rms, 1e-3), noise = 0;
  for (int tries = 0;; ++tries) {
    noise = 0;
    const double eta = 1e-4 * h;
    for (int k = 1; k <= 4; ++k) noise = std::max(noise, std::abs(at(k * eta) - L0 - k * eta * gnorm));
    noise *= 2;
    if (3 * noise / h <= 1e-2 * gnorm || tries == 6) break;
    h *= 2;
  }
  const double d1 = (at(h) - at(-h)) / (2 * h), d2 = (at(h / 2) - at(-h / 2)) / h;
  for (size_t j = 0; j < idx.size(); ++j) value.f32()[idx[j]] = orig[j];
  apply();
  const double fd = (4 * d2 - d1) / 3;
  const double rounding = 3 * noise / h;
  const double tol = 2e-3 * gnorm + rounding;
  std::printf("%-66s |g| %.4e fd %.4e err %.1e tol %.1e (h %.1e)\n", what.c_str(), gnorm, fd, std::abs(fd - gnorm),
              tol, h);
  EXPECT_LT(rounding, 1e-2 * gnorm) << what << ": the finite difference cannot resolve this gradient";
  EXPECT_LE(std::abs(fd - gnorm), tol) << what;
}

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += double(a.f32()[i]) * b.f32()[i];
  return s;
}

// The tiny model's text encoder with its layers registered for training (in `grads`), two rows of
// 77 token ids drawn from [0, id_range) and a loss reading the last hidden state and the
// penultimate one through fixed random weights.
struct TeProbe {
  ClipTextModel& te;
  Backend& be;
  Grads grads;
  std::vector<std::vector<int>> ids;
  Tensor G1, G2;
  Arena arena;
  TeProbe(SDModel& model, Backend& be_, std::mt19937& rng, int id_range) : te(model.te), be(be_) {
    const TensorFile f = open_model_file(kModel);
    const WeightStore store = component_weights(f, Component::TextEncoder, model.family);
    register_layers(grads, te.prepared(), te.norms(), store);
    ids.assign(2, std::vector<int>(77));
    std::uniform_int_distribution<int> tok(0, id_range - 1);
    for (auto& r : ids)
      for (int& v : r) v = tok(rng);
    const int64_t W = te.config().width;
    G1 = randn({2, 77, W}, rng), G2 = randn({2, 77, W}, rng);
  }
  Ctx ctx() { return Ctx{be, arena, DType::F32, nullptr, &grads}; }
  double loss() {
    Ctx c = ctx();
    ClipTextModel::Output o = te.forward(c, ids);
    arena.reset();
    return dot(o.last_hidden, G1) + dot(o.penultimate, G2);
  }
  void backward() {
    Ctx c = ctx();
    ClipTextModel::Trace trace;
    te.forward_train(c, ids, 0, trace);
    te.backward(c, trace, G1, G2, Tensor());
    arena.reset();
  }
};

std::string first_with(const PreparedIndex& idx, const std::string& part, bool last = false) {
  std::string found;
  for (const auto& [name, e] : idx)
    if (name.find(part) != std::string::npos) {
      found = name;
      if (!last) break;
    }
  return found;
}

struct Tiny {
  std::unique_ptr<Backend> be = make_cpu_backend(Precision::F32);
  std::unique_ptr<SDModel> model;
  Tiny() {
    if (!std::filesystem::exists(kModel)) return;
    SDLoadOptions o;
    o.vae_encoder = o.vae_decoder = false;
    model = SDModel::load(kModel, *be, o);
  }
};

}  // namespace

TEST(TrainGrad, UNetParametersAndLoraMatchFiniteDifferences) {
  Tiny t;
  if (!t.model) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  UNetTrainer tr(*t.model, *t.be);
  std::mt19937 rng(7);
  const Tensor x0 = randn({2, 8, 8, 4}, rng), noise = randn({2, 8, 8, 4}, rng);
  const Tensor ctx = randn({2, 77, 64}, rng);
  const DdpmSchedule sched = DdpmSchedule::sd();
  const NoisedBatch nb = make_noised_batch(sched, x0, noise, {87, 391}, Objective::Eps);
  const std::vector<float> w = loss_weights(sched, nb.timesteps, Objective::Eps, 5.0f);

  // LoRA adapters (rank 2, scale 0.75) on a self-attention query, a 1×1-conv proj_in and a GEGLU
  // projection, and LoCon adapters on a ResNet's 3×3 conv1, a stride-2 downsampler and a 1×1
  // conv_shortcut (convolution layers: down [2, in, k, k], up [out, 2, 1, 1]), with nonzero up so
  // that every path carries gradient. The LoCon adapters sit at 4×4 and 8×8: in the tiny model's
  // 1×1 bottleneck (mid block, 64 channels) each GroupNorm group holds 2 values, whose
  // normalisation is nearly a step function, and these finite differences fail there (seen with up
  // at 0.3 and at 0.03); test_train_locon checks the adapter itself at 1×1 and 2×2 inputs exactly.
  PreparedIndex& prep = tr.unet().prepared();
  std::vector<std::string> lora_on = {first_with(prep, "attn1.to_q"), first_with(prep, "proj_in"),
                                      first_with(prep, "ff.net.0.proj", true),
                                      first_with(prep, "up_blocks.3.resnets.0.conv1"),
                                      first_with(prep, "down_blocks.1.downsamplers.0.conv"),
                                      first_with(prep, "conv_shortcut", true)};
  std::vector<LoraAdapter> adapters(lora_on.size());
  for (size_t i = 0; i < lora_on.size(); ++i) {
    ASSERT_FALSE(lora_on[i].empty());
    const PreparedEntry& e = prep.at(lora_on[i]);
    const int64_t out = e.checkpoint_shape[0], in = e.checkpoint_shape[1];
    LoraAdapter& a = adapters[i];
    a.key = lora_on[i];
    const bool conv = e.conv;
    const int64_t k = conv ? e.checkpoint_shape[2] : 1;
    a.down = randn(conv ? Shape{2, in, k, k} : Shape{2, in}, rng, 0.3f / float(k));  // k×k: the same |down·x|
    a.up = randn(conv ? Shape{out, 2, 1, 1} : Shape{out, 2}, rng, 0.3f), a.scale = 0.75f;
    a.gdown = Tensor::zeros(a.down.shape()), a.gup = Tensor::zeros(a.up.shape());
    tr.grads().adapters[e.w.get()] = &a;
  }
  // Full fine-tuning parameters of every kind.
  std::vector<std::string> names = {"conv_in.weight",
                                    first_with(prep, "downsamplers.0.conv.weight"),
                                    first_with(prep, "upsamplers.0.conv.weight"),
                                    first_with(prep, "conv_shortcut.weight"),
                                    first_with(prep, "attn2.to_k.weight", true),
                                    first_with(prep, "ff.net.2.weight"),
                                    "time_embedding.linear_2.bias",
                                    "conv_out.bias"};
  const NormIndex& norms = tr.unet().norms();
  for (const auto& [n, e] : norms)
    if (n.find("resnets.0.norm1") != std::string::npos) { names.push_back(n); break; }
  for (const auto& [n, e] : norms)
    if (n.find("transformer_blocks.0.norm2") != std::string::npos) { names.push_back(n.substr(0, n.size() - 6) + "bias"); break; }
  names.push_back("conv_norm_out.weight");
  std::vector<Param*> params;
  for (const std::string& n : names) {
    ASSERT_FALSE(n.empty());
    params.push_back(&tr.train_param(n));
  }
  auto loss = [&] { return tr.run(nb, ctx, w, false).loss.loss; };
  tr.run(nb, ctx, w, true);  // gradients of the min-SNR-weighted loss

  for (size_t i = 0; i < params.size(); ++i)
    check_direction("unet " + names[i], params[i]->value, params[i]->grad, [&] { tr.apply_param(names[i]); }, loss, rng);
  for (LoraAdapter& a : adapters) {
    check_direction("unet lora down " + a.key, a.down, a.gdown, [] {}, loss, rng);
    check_direction("unet lora up " + a.key, a.up, a.gup, [] {}, loss, rng);
  }
}

TEST(TrainGrad, TextEncoderParametersMatchFiniteDifferences) {
  Tiny t;
  if (!t.model) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  ClipTextModel& te = t.model->te;
  const ClipTextConfig& cfg = te.config();
  std::mt19937 rng(11);
  TeProbe probe(*t.model, *t.be, rng, cfg.vocab);
  Grads& grads = probe.grads;
  auto loss = [&] { return probe.loss(); };
  // A LoRA adapter on a key projection (rank 3, scale 0.5).
  const PreparedIndex& prep = te.prepared();
  const std::string kname = first_with(prep, "self_attn.k_proj");
  LoraAdapter a;
  a.key = kname;
  a.down = randn({3, int64_t(cfg.width)}, rng, 0.2f), a.up = randn({int64_t(cfg.width), 3}, rng, 0.2f), a.scale = 0.5f;
  a.gdown = Tensor::zeros(a.down.shape()), a.gup = Tensor::zeros(a.up.shape());
  grads.adapters[prep.at(kname).w.get()] = &a;

  struct Target {
    std::string name;
    Tensor value, grad;
    const PreparedEntry* layer = nullptr;  // re-prepared after a change
  };
  std::vector<Target> targets;
  auto linear = [&](const std::string& name, bool bias) {
    const PreparedEntry& e = prep.at(name);
    LayerParams& lp = grads.layer(e.w.get(), "test");
    Tensor& g = bias ? lp.gb : lp.gw;
    g = Tensor::zeros(bias ? lp.b.shape() : lp.w.shape());
    targets.push_back({name + (bias ? " (bias)" : ""), bias ? lp.b : lp.w, g, &e});
  };
  linear(first_with(prep, "self_attn.q_proj"), false);
  linear(first_with(prep, "self_attn.out_proj", true), false);
  linear(first_with(prep, "mlp.fc1"), true);
  linear(first_with(prep, "mlp.fc2", true), false);
  for (const auto& [n, e] : te.norms()) {
    NormParams* np = grads.norm(e.gamma.data());
    if (n.find("layer_norm1") != std::string::npos && !np->ggamma.defined()) {
      np->ggamma = Tensor::zeros(e.gamma.shape());
      targets.push_back({n, e.gamma, np->ggamma, nullptr});
    }
    if (n.find("final_layer_norm") != std::string::npos) {
      np->gbeta = Tensor::zeros(e.beta.shape());
      targets.push_back({n + " (beta)", e.beta, np->gbeta, nullptr});
    }
  }
  probe.backward();
  for (Target& tg : targets) {
    const PreparedEntry* e = tg.layer;
    auto apply = [&] {
      if (!e) return;
      const LayerParams& lp = grads.layer(e->w.get(), "test");
      e->w->swap_contents(*t.be->prepare_like(*e->w, lp.w, lp.b, e->conv, e->params));
    };
    check_direction("te " + tg.name, tg.value, tg.grad, apply, loss, rng);
  }
  check_direction("te lora down " + kname, a.down, a.gdown, [] {}, loss, rng);
  check_direction("te lora up " + kname, a.up, a.gup, [] {}, loss, rng);
}


// The token and position embeddings (trained when a model is trained from scratch): their rows'
// gradients are the scatter-add of the embedding output's gradient.
TEST(TrainGrad, TextEncoderEmbeddingsMatchFiniteDifferences) {
  Tiny t;
  if (!t.model) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  ClipTextModel& te = t.model->te;
  const ClipTextConfig& cfg = te.config();
  // Ids from a small range, several repeated (their rows sum the gradients of every use).
  constexpr int kUsed = 40;
  std::mt19937 rng(12);
  TeProbe probe(*t.model, *t.be, rng, kUsed);
  const auto [tok, pos] = te.trainable_embeddings();
  Tensor gtok = Tensor::zeros(tok.shape()), gpos = Tensor::zeros(pos.shape());
  probe.grads.tables[tok.data()] = gtok;
  probe.grads.tables[pos.data()] = gpos;
  auto loss = [&] { return probe.loss(); };
  probe.backward();
  // Rows past the used ids get nothing.
  double unused = 0;
  for (int64_t i = int64_t(kUsed) * cfg.width; i < gtok.numel(); ++i) unused += std::fabs(gtok.f32()[i]);
  EXPECT_EQ(unused, 0.0);
  check_direction("te token_embedding (used rows)", tok.slice0(0, kUsed), gtok.slice0(0, kUsed), [] {}, loss, rng);
  check_direction("te position_embedding", pos, gpos, [] {}, loss, rng);
}

// The VAE's training pass (encoder, posterior sample, decoder) for parameters of every kind, with a
// loss reading the reconstruction and the posterior's mean and log-variance.
TEST(TrainGrad, VaeParametersMatchFiniteDifferences) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  auto be = make_cpu_backend(Precision::F32);
  SDLoadOptions lo;
  lo.text_encoders = false, lo.unet = false, lo.vae_training = true;
  std::unique_ptr<SDModel> model = SDModel::load(kModel, *be, lo);
  VAE& vae = model->vae;
  Grads grads;
  const TensorFile f = open_model_file(kModel);
  const WeightStore store = component_weights(f, Component::VAE, model->family);
  register_layers(grads, vae.prepared(), vae.norms(), store);
  std::mt19937 rng(13);
  const Tensor x = randn({2, 32, 32, 3}, rng, 0.5f), eps = randn({2, 4, 4, 4}, rng);
  const Tensor G = randn({2, 32, 32, 3}, rng), Gm = randn({2, 4, 4, 4}, rng), Gl = randn({2, 4, 4, 4}, rng, 0.3f);
  Arena arena;
  Ctx c{*be, arena, DType::F32, nullptr, &grads};
  auto loss = [&] {
    VAE::TrainPass pass;
    const Tensor r = vae.forward_train(c, x, eps, pass);
    const double l = dot(r, G) + dot(pass.mean, Gm) + dot(pass.logvar, Gl);
    arena.reset();
    return l;
  };
  const std::vector<std::string> names = {"encoder.conv_in.weight",
                                          "encoder.down_blocks.0.resnets.0.conv1.weight",
                                          "encoder.down_blocks.0.downsamplers.0.conv.weight",
                                          "encoder.down_blocks.2.resnets.0.conv_shortcut.weight",
                                          "encoder.mid_block.attentions.0.to_q.weight",
                                          "encoder.mid_block.attentions.0.to_v.bias",
                                          "quant_conv.weight",
                                          "post_quant_conv.bias",
                                          "decoder.mid_block.attentions.0.to_out.0.weight",
                                          "decoder.up_blocks.1.upsamplers.0.conv.weight",
                                          "decoder.up_blocks.3.resnets.1.norm1.weight",
                                          "decoder.conv_norm_out.bias",
                                          "decoder.conv_out.weight"};
  std::vector<std::unique_ptr<Param>> params;
  for (const std::string& n : names) params.push_back(make_trainable(grads, vae.prepared(), vae.norms(), n, "VAE"));
  VAE::TrainPass pass;
  vae.forward_train(c, x, eps, pass);
  vae.backward(c, pass, G, Gm, Gl);
  arena.reset();
  for (size_t i = 0; i < params.size(); ++i)
    check_direction("vae " + names[i], params[i]->value, params[i]->grad,
                    [&] { reprepare(*be, grads, vae.prepared(), names[i]); }, loss, rng);
}

// Without gradient checkpointing the forward keeps every block's intermediates and the backward
// recomputes nothing: the same kernels on the same inputs, so the loss, the parameter gradients
// (a weight, a bias, a norm, a LoRA-free attention projection) and dL/dcontext are bit-identical.
TEST(TrainGrad, NoCheckpointingGivesIdenticalGradients) {
  Tiny t;
  if (!t.model) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  UNetTrainer tr(*t.model, *t.be);
  std::mt19937 rng(5);
  const Tensor x0 = randn({2, 8, 8, 4}, rng), noise = randn({2, 8, 8, 4}, rng), ctx = randn({2, 77, 64}, rng);
  const DdpmSchedule s = DdpmSchedule::sd();
  std::vector<Param*> ps = {&tr.train_param("conv_in.weight"), &tr.train_param("conv_out.bias"),
                            &tr.train_param(first_with(tr.unet().prepared(), "attn2.to_v.weight")),
                            &tr.train_param(first_with(tr.unet().prepared(), "resnets.0.conv2.weight", true))};
  std::vector<Tensor> g[2], dctx(2);
  double loss[2];
  for (int mode = 0; mode < 2; ++mode) {
    tr.set_checkpointing(mode == 0);
    for (Param* p : ps) std::memset(p->grad.data(), 0, p->grad.bytes());
    dctx[size_t(mode)] = Tensor::zeros(ctx.shape());
    loss[mode] = tr.run(make_noised_batch(s, x0, noise, {87, 391}, Objective::Eps), ctx, {}, true, 1.0f, nullptr,
                        nullptr, &dctx[size_t(mode)])
                     .loss.loss;
    for (Param* p : ps) g[mode].push_back(p->grad.clone());
  }
  EXPECT_EQ(loss[0], loss[1]);
  for (size_t i = 0; i < ps.size(); ++i) {
    ASSERT_EQ(g[0][i].bytes(), g[1][i].bytes());
    double mx = 0;
    for (int64_t k = 0; k < g[0][i].numel(); ++k) mx = std::max(mx, double(std::abs(g[0][i].f32()[k])));
    EXPECT_GT(mx, 0) << ps[i]->name;
    EXPECT_EQ(std::memcmp(g[0][i].data(), g[1][i].data(), g[0][i].bytes()), 0) << ps[i]->name;
  }
  EXPECT_EQ(std::memcmp(dctx[0].data(), dctx[1].data(), dctx[0].bytes()), 0) << "dL/dcontext";
}

// bf16 training (bf16 weights and matmuls in the forward, frozen weights kept in bf16 for the
// backward's f32 GEMMs) against fp32, on the same LoRA (rank 4, up initialised non-zero so that
// both factors get gradients): the loss within 1% and the LoRA gradient within cosine 0.99 — a
// bound for this tiny random model, whose activations amplify rounding more than a real model's;
// a missing or wrong backward term shows as cosine far below it.
TEST(TrainGrad, Bf16GradientsFollowFp32) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  std::mt19937 rng(9);
  const Tensor x0 = randn({1, 8, 8, 4}, rng), noise = randn({1, 8, 8, 4}, rng), ctx = randn({1, 77, 64}, rng);
  const DdpmSchedule s = DdpmSchedule::sd();
  double loss[2];
  std::vector<float> grads[2];
  for (int mode = 0; mode < 2; ++mode) {
    auto be = make_cpu_backend(mode == 0 ? Precision::F32 : Precision::BF16);
    if (mode == 1 && be->effective_precision() != Precision::BF16)
      GTEST_SKIP() << "this CPU runs no bf16 (the backend fell back to fp32)";
    SDLoadOptions o;
    o.vae_encoder = o.vae_decoder = o.text_encoders = false;
    std::unique_ptr<SDModel> model = SDModel::load(kModel, *be, o);
    UNetTrainer tr(*model, *be);
    auto net = LoraNetwork::create_unet(model->unet, 4, 4.0f, 1);
    std::mt19937 up_rng(2);
    for (LoraModule& m : net->modules()) {
      const Tensor u = randn(m.up.value.shape(), up_rng, 0.05f);
      m.up.value.copy_from(u);
    }
    net->attach(tr.grads());
    loss[mode] = tr.run(make_noised_batch(s, x0, noise, {321}, Objective::Eps), ctx, {}, true).loss.loss;
    for (Param* p : net->params()) grads[mode].insert(grads[mode].end(), p->grad.f32(), p->grad.f32() + p->grad.numel());
  }
  ASSERT_EQ(grads[0].size(), grads[1].size());
  double dot = 0, n0 = 0, n1 = 0;
  for (size_t i = 0; i < grads[0].size(); ++i)
    dot += double(grads[0][i]) * grads[1][i], n0 += double(grads[0][i]) * grads[0][i], n1 += double(grads[1][i]) * grads[1][i];
  const double cosine = dot / std::sqrt(n0 * n1);
  std::printf("bf16 vs fp32: loss %.6f vs %.6f (rel %.2e), LoRA gradient cosine %.6f, norm ratio %.4f\n", loss[1], loss[0],
              std::abs(loss[1] - loss[0]) / loss[0], cosine, std::sqrt(n1 / n0));
  ASSERT_GT(n0, 0);
  EXPECT_LE(std::abs(loss[1] - loss[0]), 0.01 * loss[0]);
  EXPECT_GE(cosine, 0.99);
}

// Gradient accumulation: two micro-batches of one sample each, with grad_scale 1/2, give the
// gradients of one batch of both samples (the unweighted MSE of equal-sized samples is the mean of
// their per-sample means). Differences are f32 summation order only: the forward runs per sample
// (Linear.BatchSamplesEqualTheSameSamplesAlone), but the weight gradients sum over the batch's
// rows in one GEMM against two, so the bound is rounding-level
// (1e-5 of the gradient's max), far below the effect of a missing or doubled micro-batch (50%).
TEST(TrainGrad, AccumulatedMicroBatchesEqualOneBatch) {
  Tiny t;
  if (!t.model) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  UNetTrainer tr(*t.model, *t.be);
  std::mt19937 rng(3);
  const Tensor x0 = randn({2, 8, 8, 4}, rng), noise = randn({2, 8, 8, 4}, rng), ctx = randn({2, 77, 64}, rng);
  const DdpmSchedule s = DdpmSchedule::sd();
  Param& p = tr.train_param("conv_in.weight");
  Param& q = tr.train_param(first_with(tr.unet().prepared(), "attn2.to_v.weight"));
  tr.run(make_noised_batch(s, x0, noise, {87, 391}, Objective::Eps), ctx, {}, true);
  const Tensor gp = p.grad.clone(), gq = q.grad.clone();
  std::memset(p.grad.data(), 0, p.grad.bytes());
  std::memset(q.grad.data(), 0, q.grad.bytes());
  for (int64_t b = 0; b < 2; ++b)
    tr.run(make_noised_batch(s, x0.slice0(b, b + 1).clone(), noise.slice0(b, b + 1).clone(), {b == 0 ? 87 : 391},
                             Objective::Eps),
           ctx.slice0(b, b + 1).clone(), {}, true, 0.5f);
  for (auto [full, acc] : {std::pair<const Tensor*, const Tensor*>{&gp, &p.grad}, {&gq, &q.grad}}) {
    double mx = 0, err = 0;
    for (int64_t i = 0; i < full->numel(); ++i) {
      mx = std::max(mx, double(std::abs(full->f32()[i])));
      err = std::max(err, double(std::abs(full->f32()[i] - acc->f32()[i])));
    }
    std::printf("accumulated vs batch: max error %.2e of max %.2e\n", err, mx);
    EXPECT_GT(mx, 0);
    EXPECT_LE(err, 1e-5 * mx);
  }
}

// SDXL: the added text/time embedding (add_embedding MLP over pooled text + sinusoids of the size
// ids) and cross-attention at SDXL's layout, and the gradient with respect to the pooled text
// embedding (what trains encoder 2's LoRA through the added embedding), on the tiny SDXL fixture
// (../shared only).
TEST(TrainGrad, SdxlAddedEmbeddingMatchesFiniteDifferences) {
  const std::string path = std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sdxl/model/tiny-sdxl.safetensors";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "tiny SDXL model not found: " << path;
  auto be = make_cpu_backend(Precision::F32);
  SDLoadOptions o;
  o.text_encoders = o.vae_encoder = o.vae_decoder = false;
  std::unique_ptr<SDModel> model = SDModel::load(path, *be, o);
  const UNetConfig& cfg = model->unet.config();
  ASSERT_TRUE(cfg.text_time);
  UNetTrainer tr(*model, *be);
  std::mt19937 rng(5);
  const int64_t pooled = cfg.projection_class_embeddings_input_dim - cfg.num_time_ids * cfg.addition_time_embed_dim;
  const Tensor x0 = randn({2, 8, 8, 4}, rng), noise = randn({2, 8, 8, 4}, rng);
  const Tensor ctx = randn({2, 77, int64_t(cfg.context_dim)}, rng), te = randn({2, pooled}, rng);
  Tensor ids = Tensor::empty({2, 6});
  const float sizes[6] = {64, 64, 0, 0, 64, 64};
  for (int i = 0; i < 12; ++i) ids.f32()[i] = sizes[i % 6] + float(i / 6) * 8;
  const NoisedBatch nb = make_noised_batch(DdpmSchedule::sd(), x0, noise, {500, 20}, Objective::V);
  std::vector<std::string> names = {"add_embedding.linear_1.weight", "add_embedding.linear_2.bias",
                                    "time_embedding.linear_1.weight",
                                    first_with(tr.unet().prepared(), "attn2.to_k.weight")};
  std::vector<Param*> params;
  for (const std::string& n : names) params.push_back(&tr.train_param(n));
  auto loss = [&] { return tr.run(nb, ctx, {}, false, 1.0f, &te, &ids).loss.loss; };
  Tensor dte = Tensor::zeros(te.shape());
  tr.run(nb, ctx, {}, true, 1.0f, &te, &ids, nullptr, &dte);
  for (size_t i = 0; i < params.size(); ++i)
    check_direction("sdxl " + names[i], params[i]->value, params[i]->grad, [&] { tr.apply_param(names[i]); }, loss, rng);
  check_direction("sdxl d/dtext_embeds", te, dte, [] {}, loss, rng);
}

// SDXL text-encoder LoRA through the whole step (both encoders, then the UNet): adapters on
// encoder 1's first layer (reaching the loss through its channels of the context), encoder 2's
// first layer (context and pooled embedding) and encoder 2's last layer (the pooled embedding
// only: the context is the penultimate state, that layer's input) against finite differences;
// an adapter on encoder 1's last layer, whose output SDXL does not read, gets exactly zero.
TEST(TrainGrad, SdxlTextEncoderLoraMatchesFiniteDifferences) {
  const std::string path = std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sdxl/model/tiny-sdxl.safetensors";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "tiny SDXL model not found: " << path;
  auto be = make_cpu_backend(Precision::F32);
  SDLoadOptions o;
  o.vae_encoder = o.vae_decoder = false;
  std::unique_ptr<SDModel> model = SDModel::load(path, *be, o);
  UNetTrainer tr(*model, *be);
  TextEncoderTrainer tenc(*model, tr.grads());
  TextEncoderTrainer::Batch batch;
  tenc.add_caption(batch, "a photo of sks dog");
  tenc.add_caption(batch, "orange and teal checkerboard, sks pattern");
  std::mt19937 rng(13);
  const Tensor x0 = randn({2, 8, 8, 4}, rng), noise = randn({2, 8, 8, 4}, rng);
  Tensor ids = Tensor::empty({2, 6});
  const float sizes[12] = {64, 64, 0, 0, 64, 64, 80, 72, 8, 0, 64, 64};
  std::copy(sizes, sizes + 12, ids.f32());
  const NoisedBatch nb = make_noised_batch(DdpmSchedule::sd(), x0, noise, {250, 640}, Objective::Eps);

  const int L1 = model->te.config().layers, L2 = model->te2.config().layers;
  const std::string layer = "text_model.encoder.layers.";
  struct On {
    ClipTextModel* te;
    std::string name;
  };
  const std::vector<On> on = {{&model->te, layer + "0.self_attn.q_proj.weight"},
                              {&model->te2, layer + "0.mlp.fc1.weight"},
                              {&model->te2, layer + std::to_string(L2 - 1) + ".self_attn.out_proj.weight"},
                              {&model->te, layer + std::to_string(L1 - 1) + ".mlp.fc2.weight"}};
  std::vector<LoraAdapter> adapters(on.size());
  for (size_t i = 0; i < on.size(); ++i) {
    const PreparedEntry& e = on[i].te->prepared().at(on[i].name);
    const int64_t out = e.checkpoint_shape[0], in = e.checkpoint_shape[1];
    LoraAdapter& a = adapters[i];
    a.key = std::string(on[i].te == &model->te ? "te1 " : "te2 ") + on[i].name;
    a.down = randn({2, in}, rng, 0.3f), a.up = randn({out, 2}, rng, 0.3f), a.scale = 0.75f;
    a.gdown = Tensor::zeros(a.down.shape()), a.gup = Tensor::zeros(a.up.shape());
    tr.grads().adapters[e.w.get()] = &a;
  }
  auto step = [&](bool backward) {
    Arena arena;
    Ctx c{*be, arena, DType::F32, nullptr, &tr.grads()};
    const TextEncoderTrainer::Encoded enc = tenc.forward(c, batch);
    Tensor dctx = Tensor::zeros(enc.context.shape()), dpooled = Tensor::zeros(enc.pooled.shape());
    const double l = tr.run(nb, enc.context, {}, backward, 1.0f, &enc.pooled, &ids, backward ? &dctx : nullptr,
                            backward ? &dpooled : nullptr)
                         .loss.loss;
    if (backward) tenc.backward(c, dctx, dpooled);
    return l;
  };
  step(true);
  auto loss = [&] { return step(false); };
  // Every adapter's down, and the up of the pooled-only one (the adapter's own backward is
  // checked on both factors by the sd1 tests; these check the routes).
  for (size_t i = 0; i + 1 < adapters.size(); ++i)
    check_direction("sdxl lora down " + adapters[i].key, adapters[i].down, adapters[i].gdown, [] {}, loss, rng);
  check_direction("sdxl lora up " + adapters[2].key, adapters[2].up, adapters[2].gup, [] {}, loss, rng);
  const LoraAdapter& unread = adapters.back();
  for (const Tensor* g : {&unread.gdown, &unread.gup})
    for (int64_t i = 0; i < g->numel(); ++i) ASSERT_EQ(g->f32()[i], 0.0f) << unread.key << " (not read by SDXL)";
}

// The UNet's gradient with respect to its text context (what trains a text-encoder LoRA through
// the cross-attention k/v paths of every transformer), against finite differences.
TEST(TrainGrad, UNetContextGradientMatchesFiniteDifferences) {
  Tiny t;
  if (!t.model) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  UNetTrainer tr(*t.model, *t.be);
  std::mt19937 rng(9);
  const Tensor x0 = randn({2, 8, 8, 4}, rng), noise = randn({2, 8, 8, 4}, rng);
  // 77 tokens (two key blocks of the fused attention, the second partial). The context is scaled
  // to 0.5: at unit scale some rows' cross-attention softmax is so sharp that the loss is strongly
  // curved along the gradient (central differences still move by 20% between h = 1e-2 and 3e-3 on
  // one sample, converging to the analytic value only below h = 1e-3).
  Tensor ctx = randn({2, 77, 64}, rng, 0.5f);
  const NoisedBatch nb = make_noised_batch(DdpmSchedule::sd(), x0, noise, {87, 391}, Objective::Eps);
  Tensor dctx = Tensor::zeros(ctx.shape());
  tr.run(nb, ctx, {}, true, 1.0f, nullptr, nullptr, &dctx);
  auto loss = [&] { return tr.run(nb, ctx, {}, false).loss.loss; };
  check_direction("unet d/dcontext", ctx, dctx, [] {}, loss, rng);
}
