#include "train/vae_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>

#include "backend/backend.h"
#include "core/error.h"
#include "core/memory_stats.h"
#include "io/image.h"
#include "io/tensor_file.h"
#include "models/name_map.h"
#include "train/checkpoint_writer.h"
#include "train/layer_params.h"

namespace fs = std::filesystem;

namespace diffuse::train {

namespace {

constexpr int kValImages = 8;

// The VAE's trained tensors, in a fixed (sorted) order.
struct VaeParams {
  std::vector<std::unique_ptr<Param>> owned;
  std::vector<Param*> all;
  std::vector<std::string> keys;  // "vae/<name>"
  int64_t values = 0;
  Param* find(const std::string& name) const {
    for (Param* p : all)
      if (p->name == name) return p;
    fail("train vae: the VAE has no parameter ", name);
  }
};

// Every VAE tensor, or with decoder_only the decoder's and post_quant_conv's.
VaeParams make_vae_params(VAE& vae, Grads& g, bool decoder_only) {
  VaeParams p;
  for (const std::string& n : trainable_names(vae.prepared(), vae.norms())) {
    if (decoder_only && n.rfind("decoder.", 0) != 0 && n.rfind("post_quant_conv.", 0) != 0) continue;
    p.owned.push_back(make_trainable(g, vae.prepared(), vae.norms(), n, "VAE"));
    p.all.push_back(p.owned.back().get());
    p.keys.push_back("vae/" + n);
    p.values += p.owned.back()->value.numel();
  }
  return p;
}

void reprepare_vae(Backend& be, Grads& g, VAE& vae, const VaeParams& p) {
  for (Param* q : p.all) reprepare(be, g, vae.prepared(), q->name);
}

// Items `idx` of the dataset as one f32 [B, H, W, 3] batch in [-1, 1].
Tensor load_batch(Dataset& data, const std::vector<size_t>& idx) {
  std::vector<Tensor> parts;
  for (size_t i : idx) parts.push_back(load_training_image(data.items[i]));
  return concat0(parts);
}

// Standard normal noise [shape] from `g`.
Tensor normal(const Shape& shape, std::mt19937_64& g) {
  std::normal_distribution<float> n(0.0f, 1.0f);
  Tensor t = Tensor::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g);
  return t;
}

struct LossParts {
  double total = 0, rec = 0, kl = 0, edge = 0;  // kl: Σ KL per image; edge: weighted
};

// The objective on one pass (see vae_trainer.h); fills the gradients of the reconstruction and
// of the posterior's KL term when asked.
// edge_weight · mean over neighbouring pixel pairs (right and down) of |Δrecon − Δx|, per channel;
// its gradient is added to *d_recon.
double edge_loss(const Tensor& x, const Tensor& recon, double edge_weight, Tensor* d_recon) {
  const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  const float* a = x.f32();
  const float* r = recon.f32();
  const double pairs = double(B * C) * double(H * (W - 1) + (H - 1) * W);
  const float g = float(edge_weight / pairs);
  double sum = 0;
  auto pair = [&](int64_t i, int64_t j) {  // the pair (i, j): Δ = v[j] − v[i]
    const float d = (r[j] - r[i]) - (a[j] - a[i]);
    sum += std::fabs(d);
    if (!d_recon) return;
    const float s = d > 0 ? g : d < 0 ? -g : 0.0f;
    d_recon->f32()[j] += s, d_recon->f32()[i] -= s;
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t xx = 0; xx < W; ++xx)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = ((b * H + y) * W + xx) * C + c;
          if (xx + 1 < W) pair(i, i + C);
          if (y + 1 < H) pair(i, i + W * C);
        }
  return edge_weight * sum / pairs;
}

LossParts vae_loss(const Tensor& x, const Tensor& recon, const VAE::TrainPass& pass, double kl_weight,
                   double edge_weight, Tensor* d_recon, Tensor* d_mean, Tensor* d_logvar) {
  const int64_t n = x.numel(), B = x.dim(0);
  LossParts l;
  const float* a = x.f32();
  const float* r = recon.f32();
  const float inv_n = 1.0f / float(n);
  for (int64_t i = 0; i < n; ++i) {
    const float d = r[i] - a[i];
    l.rec += std::fabs(d);
    if (d_recon) d_recon->f32()[i] = d > 0 ? inv_n : d < 0 ? -inv_n : 0.0f;
  }
  l.rec /= double(n);
  const float kw = float(kl_weight / double(n));
  for (int64_t i = 0, m = pass.mean.numel(); i < m; ++i) {
    const double mu = pass.mean.f32()[i], lv = pass.logvar.f32()[i], var = std::exp(lv);
    l.kl += 0.5 * (mu * mu + var - 1.0 - lv);
    if (d_mean) d_mean->f32()[i] = kw * float(mu);
    if (d_logvar) d_logvar->f32()[i] = kw * float(0.5 * (var - 1.0));
  }
  l.edge = edge_weight > 0 ? edge_loss(x, recon, edge_weight, d_recon) : 0.0;
  l.total = l.rec + kl_weight * l.kl / double(n) + l.edge;
  l.kl /= double(B);
  return l;
}

struct Run {
  Run(const VaeTrainOptions& o_, Backend& be_, SDModel& model_, Dataset& data_)
      : o(o_), be(be_), model(model_), data(data_) {}
  const VaeTrainOptions& o;
  Backend& be;
  SDModel& model;
  Dataset& data;
  Grads grads;
  Arena arena;
  Workspace ws;

  Ctx ctx() { return Ctx{be, arena, DType::F32, &ws, &grads}; }

  // The images' reconstructions from their posterior means (no sampling); mean |x − D(mean)|.
  double reconstruct(const Tensor& x, Tensor* recon_out) {
    Ctx c = ctx();
    VAE::TrainPass pass;
    const int64_t f = model.vae_cfg.downscale();
    Tensor eps = Tensor::zeros({x.dim(0), x.dim(1) / f, x.dim(2) / f, int64_t(model.vae_cfg.latent_channels)});
    Tensor r = model.vae.forward_train(c, x, eps, pass);
    double s = 0;
    for (int64_t i = 0; i < x.numel(); ++i) s += std::fabs(r.f32()[i] - x.f32()[i]);
    if (recon_out) *recon_out = r.clone();
    arena.reset();
    return s / double(x.numel());
  }

  // Per latent channel: the mean and standard deviation of the posterior means over up to `limit` images.
  void latent_stats(size_t limit, std::vector<double>& mean, std::vector<double>& sd) {
    const int64_t L = model.vae_cfg.latent_channels, f = model.vae_cfg.downscale();
    std::vector<double> s(static_cast<size_t>(L), 0.0), s2(static_cast<size_t>(L), 0.0);
    int64_t count = 0;
    const size_t n = std::min(limit, data.items.size());
    for (size_t b = 0; b < n; b += size_t(o.batch)) {
      std::vector<size_t> idx;
      for (size_t i = b; i < std::min(n, b + size_t(o.batch)); ++i) idx.push_back(i);
      Tensor x = load_batch(data, idx);
      Ctx c = ctx();
      VAE::TrainPass pass;
      model.vae.forward_train(c, x, Tensor::zeros({x.dim(0), x.dim(1) / f, x.dim(2) / f, L}), pass);
      for (int64_t i = 0; i < pass.mean.numel(); ++i) {
        const double v = pass.mean.f32()[i];
        s[size_t(i % L)] += v, s2[size_t(i % L)] += v * v;
      }
      count += pass.mean.numel() / L;
      arena.reset();
    }
    mean.resize(size_t(L)), sd.resize(size_t(L));
    for (size_t j = 0; j < size_t(L); ++j) {
      mean[j] = s[j] / double(count);
      sd[j] = std::sqrt(std::max(0.0, s2[j] / double(count) - mean[j] * mean[j]));
    }
  }
};

// z' = k·(z − m) per latent channel c (k = target / std_c, m = mean_c), exactly: quant_conv's mean
// half ×k with its bias (b − m)·k, the log-variance bias + 2·ln k; post_quant_conv (its input is
// z = z'/k + m) weights ÷k per input channel and its bias + W·m.
void rescale_latents(const VaeParams& p, int64_t L, const std::vector<double>& m, const std::vector<double>& k) {
  Param* qw = p.find("quant_conv.weight");
  Param* qb = p.find("quant_conv.bias");
  Param* pw = p.find("post_quant_conv.weight");
  Param* pb = p.find("post_quant_conv.bias");
  const int64_t in = qw->value.numel() / (2 * L);
  for (int64_t c = 0; c < L; ++c) {
    for (int64_t i = 0; i < in; ++i) qw->value.f32()[c * in + i] *= float(k[size_t(c)]);
    qb->value.f32()[c] = float((double(qb->value.f32()[c]) - m[size_t(c)]) * k[size_t(c)]);
    qb->value.f32()[L + c] += float(2.0 * std::log(k[size_t(c)]));
  }
  DF_ASSERT(pw->value.numel() == L * L);
  float* W = pw->value.f32();  // [out L, in L, 1, 1]
  for (int64_t o = 0; o < L; ++o) {
    double add = 0;
    for (int64_t c = 0; c < L; ++c) add += double(W[o * L + c]) * m[size_t(c)];
    pb->value.f32()[o] += float(add);
    for (int64_t c = 0; c < L; ++c) W[o * L + c] = float(double(W[o * L + c]) / k[size_t(c)]);
  }
}

// Validation images (top row) above their reconstructions (bottom row), 8-bit RGB.
void write_recon_png(const std::string& path, const Tensor& x, const Tensor& r) {
  const int B = int(x.dim(0)), H = int(x.dim(1)), W = int(x.dim(2));
  Image im;
  im.width = W * B, im.height = 2 * H, im.channels = 3;
  im.pixels.assign(size_t(im.width) * size_t(im.height) * 3, 0);
  for (int row = 0; row < 2; ++row)
    for (int b = 0; b < B; ++b)
      for (int y = 0; y < H; ++y)
        for (int xx = 0; xx < W; ++xx)
          for (int ch = 0; ch < 3; ++ch) {
            const float v = (row == 0 ? x : r).f32()[((int64_t(b) * H + y) * W + xx) * 3 + ch];
            const float u = std::clamp((v + 1.0f) * 127.5f, 0.0f, 255.0f);
            im.pixels[(size_t(row * H + y) * size_t(im.width) + size_t(b * W + xx)) * 3 + size_t(ch)] =
                uint8_t(std::lround(u));
          }
  write_png(path, im);
}

std::string run_fingerprint_vae(const VaeTrainOptions& o, const Dataset& data, int resolution) {
  nlohmann::json j;
  j["trainer"] = "vae";
  j["model"] = fs::path(o.model).filename().string();
  j["model_bytes"] = fs::is_regular_file(o.model) ? int64_t(fs::file_size(o.model)) : int64_t(0);
  j["images"] = data.items.size();
  j["batch"] = o.batch, j["seed"] = o.seed, j["lr"] = o.lr, j["warmup"] = o.warmup_steps;
  j["kl_weight"] = o.kl_weight, j["weight_decay"] = o.weight_decay, j["max_grad_norm"] = o.max_grad_norm;
  j["resolution"] = resolution, j["steps"] = o.steps;
  j["decoder_only"] = o.decoder_only, j["edge_weight"] = o.edge_weight;
  if (o.lr_scheduler != "constant") j["lr_scheduler"] = o.lr_scheduler;  // the states of older runs resume
  return j.dump();
}

void check_vae_options(const VaeTrainOptions& o) {
  DF_CHECK(o.steps > 0, "--steps ", o.steps, ": must be positive");
  DF_CHECK(o.batch > 0 && o.batch <= 1024, "--batch ", o.batch, ": must be in 1..1024");
  DF_CHECK(o.lr > 0 && std::isfinite(o.lr), "--lr ", o.lr, ": must be a positive number");
  DF_CHECK(o.warmup_steps >= 0, "--warmup-steps ", o.warmup_steps, ": must not be negative");
  parse_lr_schedule(o.lr_scheduler);
  DF_CHECK(o.kl_weight >= 0 && std::isfinite(o.kl_weight), "--kl-weight ", o.kl_weight, ": must not be negative");
  DF_CHECK(o.edge_weight >= 0 && std::isfinite(o.edge_weight), "--edge-weight ", o.edge_weight,
           ": must not be negative");
  DF_CHECK(o.save_every >= 0, "--save-every ", o.save_every, ": must not be negative");
  DF_CHECK(o.resolution >= 0, "--resolution ", o.resolution, ": must not be negative");
}

// The rate of the step about to be taken (0-based): o.lr·(step + 1)/warmup during the warmup (every
// schedule warms up here), then lr_at's: constant, or decaying to 0 at the last step.
double vae_lr(const VaeTrainOptions& o, LrSchedule schedule, int step) {
  if (o.warmup_steps > 0 && step < o.warmup_steps) return o.lr * double(step + 1) / o.warmup_steps;
  return lr_at(schedule, float(o.lr), step, o.warmup_steps, o.steps);
}

DType save_dtype(const std::string& s) {
  if (s == "fp16" || s == "float16") return DType::F16;
  if (s == "bf16") return DType::BF16;
  if (s == "float" || s == "fp32") return DType::F32;
  fail("--save-precision '", s, "' is not fp16, bf16 or float");
}

}  // namespace

VaeTrainResult train_vae(const VaeTrainOptions& o, const LogFn& log) {
  check_vae_options(o);
  const DType save_dt = save_dtype(o.save_precision);
  const TensorFile input = open_model_file(o.model);
  DatasetOptions dopt;
  dopt.resolution = o.resolution;
  if (dopt.resolution == 0) {
    const DeclaredResolution d = declared_resolution(input);
    dopt.resolution = d.width > 0 && d.width == d.height ? d.width : 512;
  }
  Dataset data = scan_dataset(o.data, dopt);
  for (const std::string& w : data.warnings) log("diffuse: warning: " + w, false);

  auto be = make_cpu_backend(Precision::F32);
  SDLoadOptions lo;
  lo.text_encoders = false, lo.unet = false, lo.vae_training = true;
  log("loading " + o.model, false);
  std::unique_ptr<SDModel> model = SDModel::load(o.model, *be, lo);
  const int64_t f = model->vae_cfg.downscale(), L = model->vae_cfg.latent_channels;
  DF_CHECK(dopt.resolution % f == 0, "--resolution ", dopt.resolution, ": must be a multiple of the VAE's factor ", f);

  Run run(o, *be, *model, data);
  {
    const WeightStore store = component_weights(input, Component::VAE, model->family);
    register_layers(run.grads, model->vae.prepared(), model->vae.norms(), store, DType::F32);
  }
  VaeParams params = make_vae_params(model->vae, run.grads, o.decoder_only);
  const LrSchedule schedule = parse_lr_schedule(o.lr_scheduler);
  const bool decays = schedule == LrSchedule::Linear || schedule == LrSchedule::Cosine;
  log(cat(data.items.size(), " images at ", dopt.resolution, "²; training the VAE: ", params.all.size(),
          " tensors (", params.values, " values), batch ", o.batch, ", ", o.steps, " steps, lr ", o.lr,
          decays ? " (" + o.lr_scheduler + " to 0)" : std::string(), ", KL weight ", o.kl_weight),
      false);
  AdamW adam(params.all, AdamWOptions{o.lr, 0.9, 0.999, 1e-8, o.weight_decay});

  const std::string fingerprint = run_fingerprint_vae(o, data, dopt.resolution);
  const std::string state_path = o.output + ".state.safetensors";
  int start = 0;
  std::string csv_before;
  if (!o.resume.empty()) {
    start = resume_from(o.resume, fingerprint, params.all, params.keys, "param.", adam, &csv_before);
    reprepare_vae(*be, run.grads, model->vae, params);
    log(cat("resuming at step ", start, "/", o.steps, " from ", o.resume), false);
  }

  // Validation: the first images in sorted order (fixed whatever the seed).
  std::vector<size_t> val_idx;
  for (size_t i = 0; i < std::min<size_t>(kValImages, data.items.size()); ++i) val_idx.push_back(i);
  const Tensor val_x = load_batch(data, val_idx);
  VaeTrainResult res;
  res.val_start = run.reconstruct(val_x, nullptr);
  log("validation reconstruction |x - D(E(x))| at the start: " + fmt("%.5f", res.val_start), false);
  LossLog loss_log(o.output, csv_before, res.val_start);

  auto write_state = [&](int step) {
    std::vector<std::pair<std::string, Tensor>> t;
    for (size_t i = 0; i < params.all.size(); ++i) {
      t.emplace_back("param." + params.keys[i], params.all[i]->value);
      t.emplace_back("adam.exp_avg." + params.keys[i], adam.exp_avg(i));
      t.emplace_back("adam.exp_avg_sq." + params.keys[i], adam.exp_avg_sq(i));
    }
    save_safetensors(state_path, t, state_metadata(fingerprint, step, loss_log.text()));
  };
  auto save = [&](const std::string& path, int step, const std::vector<double>& latent_scale) {
    std::vector<TrainedComponent> tc = {{Component::VAE, {}}};
    for (Param* p : params.all) tc[0].tensors[p->name] = p->value;
    nlohmann::json t;
    t["trainer"] = "diffuse train vae", t["steps"] = step, t["max_steps"] = o.steps, t["batch"] = o.batch;
    t["lr"] = o.lr, t["lr_scheduler"] = o.lr_scheduler, t["kl_weight"] = o.kl_weight, t["seed"] = o.seed;
    t["resolution"] = dopt.resolution;
    t["decoder_only"] = o.decoder_only, t["edge_weight"] = o.edge_weight;
    t["latent_scale"] = latent_scale;
    std::map<std::string, std::string> meta = {{"diffuse_vae_training", t.dump()}};
    const CheckpointWriteResult r = save_ldm_checkpoint(path, input, model->family, tc, save_dt, meta);
    log(cat("wrote ", path, " (", r.replaced, " VAE tensors trained, ", describe_untrained(r, save_dt), ")"), false);
  };

  const int64_t n_items = int64_t(data.items.size());
  const auto t0 = std::chrono::steady_clock::now();
  double recent = 0;
  int recent_n = 0;
  const int log_every = std::max(1, std::min(100, o.steps / 50));
  for (int step = start; step < o.steps; ++step) {
    std::mt19937_64 g = step_rng(o.seed, uint64_t(step), 11);
    std::vector<size_t> idx;
    for (int b = 0; b < o.batch; ++b) idx.push_back(size_t(std::uniform_int_distribution<int64_t>(0, n_items - 1)(g)));
    Tensor x = load_batch(data, idx);
    Tensor eps = normal({x.dim(0), x.dim(1) / f, x.dim(2) / f, L}, g);
    adam.zero_grad();
    Ctx c = run.ctx();
    VAE::TrainPass pass;
    Tensor recon = model->vae.forward_train(c, x, eps, pass);
    Tensor d_recon = Tensor::empty(recon.shape()), d_mean = Tensor::empty(pass.mean.shape()),
           d_logvar = Tensor::empty(pass.mean.shape());
    const LossParts l = vae_loss(x, recon, pass, o.kl_weight, o.edge_weight, &d_recon, &d_mean, &d_logvar);
    DF_CHECK(std::isfinite(l.total), "train vae: the loss is not finite at step ", step + 1,
             " (try a lower --lr); the last saved state is ", o.save_every ? state_path : std::string("none"));
    model->vae.backward(c, pass, d_recon, d_mean, d_logvar, /*encoder=*/!o.decoder_only);
    run.arena.reset();
    clip_grad_norm(params.all, o.max_grad_norm);
    const double lr = vae_lr(o, schedule, step);
    adam.step(lr);
    reprepare_vae(*be, run.grads, model->vae, params);
    recent += l.total, ++recent_n;
    const int done = step + 1;
    const bool last = done == o.steps;
    double val = 0;
    if (done % log_every == 0 || last) {
      val = run.reconstruct(val_x, nullptr);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      log(cat("step ", done, "/", o.steps, "  loss ", fmt("%.5f", recent / recent_n), "  (L1 ", fmt("%.5f", l.rec),
              o.edge_weight > 0 ? ", edges " + fmt("%.5f", l.edge) : std::string(), ", KL/image ", fmt("%.1f", l.kl),
              ")  val ", fmt("%.5f", val), "  ",
              fmt("%.2f", secs / double(done - start)), " s/step"),
          true);
      loss_log.step(done, recent / recent_n, float(lr), &val);
      recent = 0, recent_n = 0;
    }
    if (o.save_every > 0 && done % o.save_every == 0 && !last) {
      save(intermediate_path(o.output, done), done, {});
      loss_log.write();
      write_state(done);
      log("saved the training state " + state_path, false);
    }
  }
  Tensor recon;
  res.val_end = run.reconstruct(val_x, &recon);
  write_recon_png(o.output + ".recon.png", val_x, recon);
  loss_log.end(o.steps, res.val_end);
  loss_log.write();
  res.steps = o.steps;
  log("validation reconstruction at the end: " + fmt("%.5f", res.val_end) + " (start " + fmt("%.5f", res.val_start) +
          "); " + o.output + ".recon.png: validation images above their reconstructions",
      false);

  if (o.decoder_only) {  // the encoder, so the latent space, is as it was
    save(o.output, o.steps, {});
    return res;
  }
  std::vector<double> lmean, lstd, k;
  run.latent_stats(512, lmean, lstd);
  const double target = 1.0 / double(model->vae_cfg.scaling_factor);
  std::string stats;
  for (size_t c = 0; c < lmean.size(); ++c) {
    k.push_back(lstd[c] > 1e-6 ? target / lstd[c] : 1.0);
    stats += cat(c ? ", " : "", fmt("%.3f", lmean[c]), " ± ", fmt("%.3f", lstd[c]));
  }
  res.latent_mean = lmean, res.latent_std = lstd, res.latent_scale = k;
  rescale_latents(params, L, lmean, k);
  log("latent channels (mean ± std over " + std::to_string(std::min<size_t>(512, data.items.size())) + " images): " +
          stats + "; quant_conv / post_quant_conv reparametrised so that each channel has mean 0 and std " +
          fmt("%.4f", target) + " (unit std after the scaling factor " + fmt("%g", model->vae_cfg.scaling_factor) +
          "), same decoded images",
      false);
  save(o.output, o.steps, k);
  log("peak memory (RSS): " + fmt("%.2f GB", double(peak_rss_bytes()) / 1e9), false);
  return res;
}

}  // namespace diffuse::train
