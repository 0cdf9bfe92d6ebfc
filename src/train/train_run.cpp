#include "train/train_run.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/arena.h"
#include "core/error.h"
#include "io/output_file.h"
#include "models/family.h"
#include "models/name_map.h"
#include "pipeline/rng.h"
#include "train/loss_plot.h"

namespace fs = std::filesystem;

namespace diffuse::train {

std::mt19937_64 step_rng(uint64_t seed, uint64_t step, uint64_t stream) {
  std::seed_seq s{uint32_t(seed), uint32_t(seed >> 32), uint32_t(step), uint32_t(step >> 32), uint32_t(stream)};
  return std::mt19937_64(s);
}

double uniform01(std::mt19937_64& g) { return double(g() >> 11) * (1.0 / 9007199254740992.0); }

std::string fmt(const char* format, double v) {
  char b[64];
  std::snprintf(b, sizeof b, format, v);
  return b;
}

Tensor concat0(const std::vector<Tensor>& parts) {
  Shape s = parts[0].shape();
  s[0] = 0;
  for (const Tensor& p : parts) s[0] += p.dim(0);
  Tensor out = Tensor::empty(s);
  size_t off = 0;
  for (const Tensor& p : parts) {
    std::memcpy(static_cast<uint8_t*>(out.data()) + off, p.data(), p.bytes());
    off += p.bytes();
  }
  return out;
}

DType check_run_options(const RunOptions& o) {
  DF_CHECK(o.steps > 0 || o.epochs > 0, "give --steps N or --epochs N");
  DF_CHECK(o.batch >= 1 && o.batch <= 64, "--batch ", o.batch, ": must be in [1, 64]");
  DF_CHECK(std::isfinite(o.lr) && o.lr > 0, "--lr ", o.lr, ": must be a positive number");
  parse_lr_schedule(o.lr_schedule);
  DF_CHECK(o.save_precision == "fp16" || o.save_precision == "bf16" || o.save_precision == "float" ||
               o.save_precision == "fp32",
           "--save-precision ", o.save_precision, ": expected fp16, bf16 or float");
  DF_CHECK(o.precision == "fp32" || o.precision == "bf16", "--precision ", o.precision, ": expected fp32 or bf16");
  check_prior_loss_weight(o.prior_loss_weight);
  DF_CHECK(o.min_timestep >= 0 && o.min_timestep < o.max_timestep && o.max_timestep <= 1000, "--min-timestep ",
           o.min_timestep, " / --max-timestep ", o.max_timestep, ": need 0 <= min < max <= 1000");
  DF_CHECK(o.prediction.empty() || o.prediction == "eps" || o.prediction == "v", "--prediction ", o.prediction,
           ": expected eps or v");
  return o.save_precision == "fp16" ? DType::F16 : o.save_precision == "bf16" ? DType::BF16 : DType::F32;
}

RunData load_run_data(const RunOptions& o, const LogFn& log) {
  RunData r;
  r.dopt = o.data_opts;
  if (r.dopt.resolution == 0) {  // the checkpoint's declared square size, else the family's
    const TensorFile f = open_model_file(o.model);
    const DeclaredResolution d = declared_resolution(f);
    const Family fam = summarize_model(f).family;
    r.dopt.resolution = d.width > 0 && d.width == d.height ? d.width
                        : fam == Family::SDXL                ? 1024
                        : fam == Family::SD2                 ? 768
                                                             : 512;
  }
  r.data = scan_dataset(o.data, r.dopt);
  if (!o.reg_data.empty()) r.reg = add_reg_data(r.data, o.reg_data, r.dopt);
  for (const std::string& w : r.data.warnings) log("diffuse: warning: " + w, false);
  return r;
}

RunLength run_length(const RunOptions& o, const Dataset& data) {
  RunLength r;
  r.per_epoch = std::max<int64_t>(1, (data.epoch_length() + o.batch - 1) / o.batch);
  r.total = o.steps > 0 ? o.steps : int(r.per_epoch * o.epochs);
  return r;
}

// ---------------------------------------------------------------------------------------------
// TrainData

struct TrainData::Example {
  Tensor latent;        // [1, h, w, 4]
  std::string caption;  // as scanned
  Tensor time_ids;      // SDXL: [1, 6] (original size, crop top-left, target size)
  const DatasetItem* item = nullptr;
};

TrainData::TrainData(SDModel& model, Backend& be, Dataset& data, const RunOptions& o, const DatasetOptions& dopt,
                     UNetTrainer& trainer)
    : model_(model),
      be_(be),
      trainer_(trainer),
      o_(o),
      dopt_(dopt),
      obj_(trained_objective(o.prediction, model)),
      ztsnr_(o.zero_terminal_snr || model.declared_zero_snr),
      sdxl_(model.unet_cfg.text_time),
      sched_(DdpmSchedule::sd(ztsnr_)) {
  DF_CHECK(!ztsnr_ || obj_ == Objective::V, o.zero_terminal_snr ? "--zero-terminal-snr" : model.path + ": zero terminal SNR",
           " needs the v objective (--prediction v): at t = T the noised latent holds no signal, where ε-prediction "
           "cannot recover the image");
  if (o.train_text_encoder) tenc_ = std::make_unique<TextEncoderTrainer>(model, trainer.grads());
  Arena arena;
  Ctx c{be, arena, DType::F32, &ws_};
  for (DatasetItem& it : data.items) {
    Tensor px = load_training_image(it);
    VAE::Posterior post = model.vae.encode(c, px);
    Example e;
    e.latent = post.mean.to(DType::F32);
    for (int64_t i = 0; i < e.latent.numel(); ++i) e.latent.f32()[i] *= model.vae_cfg.scaling_factor;
    e.caption = it.caption;
    e.item = &it;
    if (sdxl_) {
      e.time_ids = Tensor::empty({1, 6});
      const float ids[6] = {float(it.orig_height), float(it.orig_width), float(it.crop_top), float(it.crop_left),
                            float(it.height), float(it.width)};
      std::copy(ids, ids + 6, e.time_ids.f32());
    }
    examples_.push_back(std::move(e));
    arena.reset();
  }
  for (size_t i = 0; i < examples_.size() && val_idx_.size() < 4; ++i)
    if (!examples_[i].item->is_reg) val_idx_.push_back(i);
  val_t_ = {100, 300, 500, 700, 900};
  val_noise_.resize(val_t_.size());
  auto r = make_cpu_rng(o.seed ^ 0x5eed);
  for (auto& vn : val_noise_)
    for (size_t i : val_idx_) vn.push_back(r->randn(examples_[i].latent.shape()));
}

TrainData::~TrainData() = default;

const Conditioning& TrainData::conditioning(const std::string& text) {
  auto it = cond_cache_.find(text);
  if (it != cond_cache_.end()) return it->second;
  Arena arena;
  Ctx c{be_, arena, DType::F32, &ws_};
  std::vector<WeightedText> runs = {{text, 1.0f}};  // captions are plain text (no A1111 weights)
  const std::vector<TokenChunk> ch = chunk_weighted(runs, pad_token(model_.family, 0));
  std::vector<TokenChunk> ch2;
  if (model_.has_te2) ch2 = chunk_weighted(runs, pad_token(model_.family, 1));
  Conditioning cd = encode_chunks(c, model_, {ch.front()}, ch2.empty() ? ch2 : std::vector<TokenChunk>{ch2.front()},
                                  PromptOptions{});
  return cond_cache_.emplace(text, cd).first->second;
}

TrainBatch TrainData::make_batch(const std::vector<size_t>& idx, std::mt19937_64& g, const std::vector<int>* fixed_t,
                                 const std::vector<Tensor>* fixed_noise, bool for_train) {
  std::vector<Tensor> x0, noise, ctx, pooled, tids;
  std::vector<int> ts;
  TrainBatch b;
  auto rng = make_cpu_rng(g());
  for (size_t k = 0; k < idx.size(); ++k) {
    const Example& e = examples_[idx[k]];
    x0.push_back(e.latent);
    noise.push_back(fixed_noise ? (*fixed_noise)[k] : rng->randn(e.latent.shape()));
    ts.push_back(fixed_t ? (*fixed_t)[k] : sample_timestep(uniform01(g), o_.min_timestep, o_.max_timestep));
    std::string cap = for_train ? caption_for_step(e.caption, dopt_, g) : e.caption;
    if (for_train && drop_caption(uniform01(g), o_.caption_dropout)) cap.clear();
    b.is_reg.push_back(e.item->is_reg);
    if (sdxl_) tids.push_back(e.time_ids);
    if (tenc_) {  // encoded by the (training) text encoder(s) with the batch
      tenc_->add_caption(b.ids, cap);
      continue;
    }
    const Conditioning& cd = conditioning(cap);
    ctx.push_back(cd.context);
    if (sdxl_) pooled.push_back(cd.pooled);
  }
  Tensor n = concat0(noise);
  if (for_train && o_.noise_offset != 0) apply_noise_offset(n, o_.noise_offset, *rng);
  if (for_train && o_.multires_noise_iterations > 0)
    apply_multires_noise(n, o_.multires_noise_iterations, o_.multires_noise_discount, *rng, [&] { return uniform01(g); });
  b.nb = make_noised_batch(sched_, concat0(x0), n, ts, obj_);
  if (!ctx.empty()) b.ctx = concat0(ctx);
  if (!pooled.empty()) b.pooled = concat0(pooled);
  if (sdxl_) b.tids = concat0(tids);
  return b;
}

std::vector<size_t> TrainData::take_indices() {
  const size_t batch = size_t(o_.batch);
  if (pos_ + batch > order_.size()) {  // a new epoch: every item `repeats` times, shuffled
    ++epoch_;
    order_.clear();
    for (size_t i = 0; i < examples_.size(); ++i)
      for (int r = 0; r < examples_[i].item->repeats; ++r) order_.push_back(i);
    std::mt19937_64 g = step_rng(o_.seed, uint64_t(epoch_), 1);
    std::shuffle(order_.begin(), order_.end(), g);
    pos_ = 0;
  }
  std::vector<size_t> idx(order_.begin() + int64_t(pos_), order_.begin() + int64_t(std::min(order_.size(), pos_ + batch)));
  pos_ += batch;
  return idx;
}

void TrainData::skip(int steps) {
  for (int s = 0; s < steps; ++s) take_indices();
}

TrainBatch TrainData::next_batch(int step) {
  std::vector<size_t> idx = take_indices();
  // One latent size per batch: examples of another bucket wait for a later batch.
  idx.erase(std::remove_if(idx.begin() + 1, idx.end(),
                           [&](size_t i) { return examples_[i].latent.shape() != examples_[idx[0]].latent.shape(); }),
            idx.end());
  std::mt19937_64 g = step_rng(o_.seed, uint64_t(step), 2);
  return make_batch(idx, g, nullptr, nullptr, true);
}

std::vector<float> TrainData::loss_weights_of(const TrainBatch& b) const {
  return with_prior_loss_weight(loss_weights(sched_, b.nb.timesteps, obj_, o_.min_snr_gamma), b.is_reg,
                                o_.prior_loss_weight);
}

// With the text encoder(s) in training, their forward (and backward, from the UNet's context and,
// SDXL, pooled-embedding gradients) runs here with the Grads.
UNetTrainer::Step TrainData::run(TrainBatch& b, const std::vector<float>& w, bool backward) {
  if (!tenc_)
    return trainer_.run(b.nb, b.ctx, w, backward, 1.0f, sdxl_ ? &b.pooled : nullptr, sdxl_ ? &b.tids : nullptr);
  Arena arena;
  Ctx c{be_, arena, DType::F32, &ws_, &trainer_.grads()};
  const TextEncoderTrainer::Encoded enc = tenc_->forward(c, b.ids);
  Tensor dctx = Tensor::zeros(enc.context.shape()), dpooled = sdxl_ ? Tensor::zeros(enc.pooled.shape()) : Tensor();
  UNetTrainer::Step s = trainer_.run(b.nb, enc.context, w, backward, 1.0f, sdxl_ ? &enc.pooled : nullptr,
                                     sdxl_ ? &b.tids : nullptr, backward ? &dctx : nullptr,
                                     backward && sdxl_ ? &dpooled : nullptr);
  if (backward) tenc_->backward(c, dctx, dpooled);
  return s;
}

double TrainData::validation() {
  double sum = 0;
  int n = 0;
  for (size_t k = 0; k < val_t_.size(); ++k)
    for (size_t j = 0; j < val_idx_.size(); ++j) {
      std::mt19937_64 g(0);
      const std::vector<int> t = {val_t_[k]};
      const std::vector<Tensor> nz = {val_noise_[k][j]};
      TrainBatch b = make_batch({val_idx_[j]}, g, &t, &nz, false);
      sum += run(b, {}, false).loss.loss;
      ++n;
    }
  return sum / n;
}

// ---------------------------------------------------------------------------------------------
// Loss log, state, loop

LossLog::LossLog(std::string output, const std::string& before, double val_start) : output_(std::move(output)) {
  if (before.empty()) csv_ << "step,loss,lr,val_loss\n0,,," << val_start << "\n";
  else csv_ << before;
}

void LossLog::step(int step, double loss, float lr, const double* val_loss) {
  csv_ << step << "," << loss << "," << lr << ",";
  if (val_loss) csv_ << *val_loss;
  csv_ << "\n";
}

void LossLog::end(int total, double val_loss) { csv_ << total << ",,," << val_loss << "\n"; }

void LossLog::write() const {
  const std::string text = csv_.str();
  write_file_safely(output_ + ".csv", text.data(), text.size());
  write_loss_plot(output_ + ".loss.png", text);  // the chart of the same log
}

Objective trained_objective(const std::string& prediction, const SDModel& model) {
  if (!prediction.empty()) return parse_objective(prediction);
  if (model.declared_prediction == "v") return Objective::V;
  if (model.declared_prediction == "epsilon") return Objective::Eps;
  return model.family == Family::SD2 ? Objective::V : Objective::Eps;
}

std::string data_summary(const RunData& rd, const TrainData& data) {
  const RunOptions& o = data.options();
  const std::string timesteps = o.min_timestep == 0 && o.max_timestep == 1000 ? std::string()
                                : "; timesteps [" + std::to_string(o.min_timestep) + ", " +
                                      std::to_string(o.max_timestep) + ")";
  return std::to_string(rd.data.items.size()) + " images, " + std::to_string(rd.data.epoch_length()) +
         " per epoch with repeats; resolution " + std::to_string(rd.dopt.resolution) + ", objective " +
         objective_name(data.objective()) + (data.zero_terminal_snr() ? " (zero terminal SNR)" : "") + timesteps;
}

nlohmann::json run_fingerprint(const RunOptions& o, const Dataset& data, int total, int resolution) {
  nlohmann::json j;
  j["model"] = fs::path(o.model).filename().string();
  j["model_bytes"] = fs::is_regular_file(o.model) ? int64_t(fs::file_size(o.model)) : int64_t(0);
  j["images"] = data.items.size();
  j["epoch_length"] = data.epoch_length();
  j["batch"] = o.batch, j["seed"] = o.seed, j["lr"] = o.lr;
  j["resolution"] = resolution, j["buckets"] = o.data_opts.buckets, j["steps"] = total;
  j["lr_scheduler"] = o.lr_schedule, j["warmup"] = o.warmup_steps, j["min_snr_gamma"] = o.min_snr_gamma;
  j["noise_offset"] = o.noise_offset, j["caption_dropout"] = o.caption_dropout, j["weight_decay"] = o.weight_decay;
  if (!o.prediction.empty()) j["prediction"] = o.prediction;
  if (o.zero_terminal_snr) j["zero_terminal_snr"] = true;  // (absent when the model's: as before)
  if (o.min_timestep != 0 || o.max_timestep != 1000)  // (absent at the default: earlier states still match)
    j["timesteps"] = {o.min_timestep, o.max_timestep};
  if (o.multires_noise_iterations > 0)  // (absent when off: state files of earlier runs still match)
    j["multires_noise"] = {o.multires_noise_iterations, o.multires_noise_discount};
  j["train_text_encoder"] = o.train_text_encoder, j["text_encoder_lr"] = o.text_encoder_lr;
  j["precision"] = o.precision;
  j["max_grad_norm"] = o.max_grad_norm, j["shuffle"] = o.data_opts.shuffle_captions, j["keep"] = o.data_opts.keep_tokens;
  j["reg_data"] = o.reg_data.empty() ? std::string() : fs::path(o.reg_data).lexically_normal().filename().string();
  j["reg_samples"] = samples_per_epoch(data, true), j["prior_loss_weight"] = o.prior_loss_weight;
  return j;
}

RunState::RunState(const std::string& path, const std::string& fingerprint) : f_(open_model_file(path)) {
  auto meta = [&](const char* k) {
    auto it = f_.metadata.find(k);
    DF_CHECK(it != f_.metadata.end(), path, ": not a diffuse training state (no ", k, ")");
    return it->second;
  };
  const std::string theirs = meta("diffuse_run");
  if (theirs != fingerprint) {
    const nlohmann::json a = nlohmann::json::parse(theirs, nullptr, false), b = nlohmann::json::parse(fingerprint);
    std::string diff;
    if (a.is_object())
      for (auto it = b.begin(); it != b.end(); ++it)
        if (!a.contains(it.key()) || a[it.key()] != it.value())
          diff += (diff.empty() ? "" : ", ") + it.key() + " (state " + (a.contains(it.key()) ? a[it.key()].dump() : "-") +
                  ", now " + it.value().dump() + ")";
    fail("--resume ", path, ": the state is from another model, dataset or settings: ", diff.empty() ? "unreadable" : diff);
  }
  step_ = std::stoi(meta("diffuse_step"));
  csv_ = meta("diffuse_csv");
}

Tensor RunState::get(const std::string& key, const Shape& shape) const {
  const Tensor* t = f_.find(key);
  DF_CHECK(t && t->shape() == shape, f_.path, ": ", key, " is missing or mis-shaped (expected ", shape.str(), ")");
  return t->to(DType::F32);
}

std::map<std::string, std::string> state_metadata(const std::string& fingerprint, int step, const std::string& csv) {
  return {{"diffuse_run", fingerprint}, {"diffuse_step", std::to_string(step)}, {"diffuse_csv", csv}};
}

int resume_from(const std::string& path, const std::string& fingerprint, const std::vector<Param*>& params,
                const std::vector<std::string>& keys, const std::string& value_prefix, AdamW& adam, std::string* csv,
                const std::function<void(size_t, const RunState&)>& extra) {
  DF_ASSERT(params.size() == keys.size());
  const RunState st(path, fingerprint);
  std::vector<Tensor> m, v;
  for (size_t i = 0; i < params.size(); ++i) {
    const Shape& s = params[i]->value.shape();
    params[i]->value.copy_from(st.get(value_prefix + keys[i], s));
    m.push_back(st.get("adam.exp_avg." + keys[i], s));
    v.push_back(st.get("adam.exp_avg_sq." + keys[i], s));
    if (extra) extra(i, st);
  }
  adam.set_state(st.step(), std::move(m), std::move(v));
  *csv = st.csv();
  return st.step();
}

double end_validation(TrainData& data, LossLog& loss_log, int total, double val_start, const LogFn& log) {
  const double v = data.validation();
  loss_log.end(total, v);
  log("validation loss at the end: " + fmt("%.6f", v) + " (start " + fmt("%.6f", val_start) + ")", false);
  return v;
}

std::string intermediate_path(const std::string& output, int step) {
  const fs::path p(output);
  return (p.parent_path() / (p.stem().string() + "-step" + std::to_string(step))).string() + p.extension().string();
}

void run_steps(const RunOptions& o, TrainData& data, AdamW& adam, LossLog& loss_log, int start, int total,
               const std::string& what, const StepHooks& hooks, const LogFn& log) {
  const LrSchedule kind = parse_lr_schedule(o.lr_schedule);
  const auto t0 = std::chrono::steady_clock::now();
  double smooth = 0;
  data.skip(start);  // a resumed run: where the data order stands
  for (int step = start; step < total; ++step) {
    TrainBatch b = data.next_batch(step);
    const std::vector<float> w = data.loss_weights_of(b);
    adam.zero_grad();
    UNetTrainer::Step s = data.run(b, w, true);
    DF_CHECK(std::isfinite(s.loss.loss), "the loss became non-finite at step ", step + 1,
             (step > 0 && o.save_every ? "; the last saved " + what + " is kept" : std::string()),
             " (try a lower --lr)");
    clip_grad_norm(adam.params(), o.max_grad_norm);
    const float lr = lr_at(kind, float(o.lr), step, o.warmup_steps, total);
    adam.step(lr);
    if (hooks.after_update) hooks.after_update(step + 1);
    smooth = step == start ? s.loss.loss : 0.95 * smooth + 0.05 * s.loss.loss;
    const double its = double(step + 1 - start) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double val = 0;
    const bool validate = o.validate_every > 0 && (step + 1) % o.validate_every == 0 && step + 1 < total;
    if (validate) val = data.validation();
    loss_log.step(step + 1, s.loss.loss, lr, validate ? &val : nullptr);
    const int every = std::max(1, total / 100);  // at most ~100 progress lines
    if ((step + 1) % every == 0 || step + 1 == total)
      log("step " + std::to_string(step + 1) + "/" + std::to_string(total) + "  loss " + fmt("%.4f", smooth) + "  lr " +
              fmt("%.2e", lr) + "  " + fmt("%.2f it/s", its) + "  ETA " + fmt("%.0f s", double(total - step - 1) / its),
          true);
    if (o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < total && hooks.save) hooks.save(step + 1);
    if (hooks.after_step) hooks.after_step(step + 1);
  }
}

}  // namespace diffuse::train
