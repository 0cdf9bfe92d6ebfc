#include "train/lora_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <cstring>
#include <map>
#include <numeric>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/output_file.h"
#include "io/tensor_file.h"
#include "pipeline/conditioning.h"
#include "models/name_map.h"
#include "pipeline/rng.h"
#include "train/lora_network.h"
#include "train/loss_plot.h"
#include "train/reg_data.h"
#include "train/sample_images.h"
#include "train/text_encoder_trainer.h"
#include "train/unet_trainer.h"

namespace fs = std::filesystem;

namespace diffuse::train {

namespace {

// A generator for step `step`'s draws: runs that stop and resume draw the same numbers.
std::mt19937_64 step_rng(uint64_t seed, uint64_t step, uint64_t stream) {
  std::seed_seq s{uint32_t(seed), uint32_t(seed >> 32), uint32_t(step), uint32_t(step >> 32), uint32_t(stream)};
  return std::mt19937_64(s);
}

double uniform(std::mt19937_64& g) { return double(g() >> 11) * (1.0 / 9007199254740992.0); }

// One cached training example: the latent (NHWC, × scaling factor) and its conditioning.
struct Example {
  Tensor latent;                  // [1, h, w, 4]
  std::string caption;            // as scanned
  Tensor time_ids;                // SDXL: [1, 6] (original size, crop top-left, target size)
  const DatasetItem* item = nullptr;
};

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

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

}  // namespace

// What a state file must agree on to continue a run.
std::string run_fingerprint(const LoraTrainOptions& o, const Dataset& data, int total, int resolution) {
  nlohmann::json j;
  j["model"] = fs::path(o.model).filename().string();
  j["model_bytes"] = fs::is_regular_file(o.model) ? int64_t(fs::file_size(o.model)) : int64_t(0);
  j["images"] = data.items.size();
  j["epoch_length"] = data.epoch_length();
  j["rank"] = o.rank, j["alpha"] = o.alpha, j["batch"] = o.batch, j["seed"] = o.seed, j["lr"] = o.lr;
  j["resolution"] = resolution, j["buckets"] = o.data_opts.buckets, j["steps"] = total;
  j["lr_scheduler"] = o.lr_schedule, j["warmup"] = o.warmup_steps, j["min_snr_gamma"] = o.min_snr_gamma;
  j["noise_offset"] = o.noise_offset, j["caption_dropout"] = o.caption_dropout, j["weight_decay"] = o.weight_decay;
  j["train_text_encoder"] = o.train_text_encoder, j["text_encoder_lr"] = o.text_encoder_lr;
  j["network_weights"] = o.network_weights.empty() ? std::string() : fs::path(o.network_weights).filename().string();
  j["precision"] = o.precision;
  j["max_grad_norm"] = o.max_grad_norm, j["shuffle"] = o.data_opts.shuffle_captions, j["keep"] = o.data_opts.keep_tokens;
  if (o.conv_rank > 0) j["conv_rank"] = o.conv_rank, j["conv_alpha"] = o.conv_alpha;  // LoCon only: old states match
  j["reg_data"] = o.reg_data.empty() ? std::string() : fs::path(o.reg_data).lexically_normal().filename().string();
  j["reg_samples"] = samples_per_epoch(data, true), j["prior_loss_weight"] = o.prior_loss_weight;
  return j.dump();
}

LoraTrainResult train_lora(const LoraTrainOptions& o, const std::function<void(const std::string&, bool)>& log) {
  DF_CHECK(o.steps > 0 || o.epochs > 0, "give --steps N or --epochs N");
  DF_CHECK(o.batch >= 1 && o.batch <= 64, "--batch ", o.batch, ": must be in [1, 64]");
  DF_CHECK(o.conv_rank >= 0 && o.conv_rank <= 4096, "--conv-rank ", o.conv_rank, ": must be in [0, 4096] (0: off)");
  DF_CHECK(o.conv_rank == 0 || o.network_weights.empty(),
           "--conv-rank: not with --network-weights (the file's modules train, LoCon ones included)");
  DF_CHECK(std::isfinite(o.lr) && o.lr > 0, "--lr ", o.lr, ": must be a positive number");
  const LrSchedule sched_kind = parse_lr_schedule(o.lr_schedule);
  DType save_dt = o.save_precision == "fp16" ? DType::F16 : o.save_precision == "bf16" ? DType::BF16 : DType::F32;
  DF_CHECK(o.save_precision == "fp16" || o.save_precision == "bf16" || o.save_precision == "float" ||
               o.save_precision == "fp32",
           "--save-precision ", o.save_precision, ": expected fp16, bf16 or float");

  // The data first (a folder without usable images fails before the model loads); the default
  // resolution is the family's native size, from the file's tensor names.
  DatasetOptions dopt = o.data_opts;
  if (dopt.resolution == 0) {
    const Family fam = summarize_model(open_model_file(o.model)).family;
    dopt.resolution = fam == Family::SDXL ? 1024 : fam == Family::SD2 ? 768 : 512;
  }
  Dataset data = scan_dataset(o.data, dopt);
  check_prior_loss_weight(o.prior_loss_weight);
  const RegInfo reg = o.reg_data.empty() ? RegInfo{} : add_reg_data(data, o.reg_data, dopt);
  for (const std::string& w : data.warnings) log("diffuse: warning: " + w, false);

  DF_CHECK(o.precision == "fp32" || o.precision == "bf16", "--precision ", o.precision, ": expected fp32 or bf16");
  auto be = make_cpu_backend(o.precision == "bf16" ? Precision::BF16 : Precision::F32);
  SDLoadOptions lo;
  SampleSettings samples;  // sample images (the VAE decoder only for them)
  samples.prompts = o.sample_prompts, samples.every = o.sample_every, samples.steps = o.sample_steps;
  samples.cfg = o.sample_cfg, samples.sampler = o.sample_sampler, samples.seed = o.seed;
  samples.width = samples.height = dopt.resolution;
  check_sample_settings(samples);
  lo.vae_decoder = !samples.prompts.empty();
  log("loading " + o.model, false);
  std::unique_ptr<SDModel> model = SDModel::load(o.model, *be, lo);
  const bool sdxl = model->unet_cfg.text_time;
  const Objective obj = model->family == Family::SD2 ? Objective::V : Objective::Eps;
  samples.prediction = obj == Objective::V ? Prediction::VPrediction : Prediction::Epsilon;
  log(std::to_string(data.items.size()) + " images, " + std::to_string(data.epoch_length()) +
          " per epoch with repeats; resolution " + std::to_string(dopt.resolution) + ", objective " + objective_name(obj),
      false);
  if (!o.reg_data.empty())
    log("reg data: " + std::to_string(reg.num_reg_images) + " samples with repeats in " + o.reg_data + ", matched to " +
            std::to_string(reg.matched) + " per epoch; prior loss weight " + fmt("%g", o.prior_loss_weight),
        false);

  // Latents, once (posterior mean × scaling factor), and captions, once per distinct text.
  Workspace ws;
  std::vector<Example> examples;
  {
    Arena arena;
    Ctx c{*be, arena, DType::F32, &ws};
    for (DatasetItem& it : data.items) {
      Tensor px = load_training_image(it);
      VAE::Posterior post = model->vae.encode(c, px);
      Example e;
      e.latent = post.mean.to(DType::F32);
      for (int64_t i = 0; i < e.latent.numel(); ++i) e.latent.f32()[i] *= model->vae_cfg.scaling_factor;
      e.caption = it.caption;
      e.item = &it;
      if (sdxl) {
        e.time_ids = Tensor::empty({1, 6});
        const float ids[6] = {float(it.orig_height), float(it.orig_width), float(it.crop_top), float(it.crop_left),
                              float(it.height), float(it.width)};
        std::copy(ids, ids + 6, e.time_ids.f32());
      }
      examples.push_back(std::move(e));
      arena.reset();
    }
  }
  std::map<std::string, Conditioning> cond_cache;
  auto conditioning = [&](const std::string& text) -> const Conditioning& {
    auto it = cond_cache.find(text);
    if (it != cond_cache.end()) return it->second;
    Arena arena;
    Ctx c{*be, arena, DType::F32, &ws};
    std::vector<WeightedText> runs = {{text, 1.0f}};  // captions are plain text (no A1111 weights)
    const std::vector<TokenChunk> ch = chunk_weighted(runs, pad_token(model->family, 0));
    std::vector<TokenChunk> ch2;
    if (model->has_te2) ch2 = chunk_weighted(runs, pad_token(model->family, 1));
    PromptOptions po;
    Conditioning cd = encode_chunks(c, *model, {ch.front()}, ch2.empty() ? ch2 : std::vector<TokenChunk>{ch2.front()}, po);
    return cond_cache.emplace(text, cd).first->second;
  };

  UNetTrainer trainer(*model, *be);
  ClipTextModel* te1 = o.train_text_encoder ? &model->te : nullptr;  // the encoders whose LoRA trains
  ClipTextModel* te2 = o.train_text_encoder && sdxl ? &model->te2 : nullptr;
  std::unique_ptr<LoraNetwork> net = o.network_weights.empty()
                                         ? LoraNetwork::create_unet(model->unet, o.rank, o.alpha, o.seed)
                                         : LoraNetwork::from_file(o.network_weights, model->unet, te1, te2);
  if (!o.network_weights.empty())
    log("starting from " + o.network_weights + " (" + std::to_string(net->modules().size()) + " modules)", false);
  if (o.conv_rank > 0) net->add_unet_conv_targets(model->unet, o.rank, o.alpha, o.conv_rank, o.conv_alpha, o.seed);
  // Text-encoder LoRA: kohya's lora_te_ (SDXL: lora_te1_ and lora_te2_) modules, fresh unless
  // the --network-weights file has some.
  std::unique_ptr<TextEncoderTrainer> tenc;
  if (o.train_text_encoder) {
    tenc = std::make_unique<TextEncoderTrainer>(*model, trainer.grads());
    const float te_scale = float((o.text_encoder_lr > 0 ? o.text_encoder_lr : o.lr) / o.lr);
    if (net->count(LoraTarget::TextEncoder) + net->count(LoraTarget::TextEncoder2) == 0) {
      net->add_text_encoder(model->te, sdxl ? "lora_te1" : "lora_te", o.rank, o.alpha, o.seed);
      if (sdxl) net->add_text_encoder(model->te2, "lora_te2", o.rank, o.alpha, o.seed);
    }
    net->set_lr_scale(LoraTarget::TextEncoder, te_scale);
    net->set_lr_scale(LoraTarget::TextEncoder2, te_scale);
  }
  const int te1_modules = net->count(LoraTarget::TextEncoder), te2_modules = net->count(LoraTarget::TextEncoder2);
  const int te_modules = te1_modules + te2_modules;
  // The network's rank and alpha (--network_weights: the file's, from its first module).
  const int net_rank = int(net->modules().front().down.value.dim(0));
  const float net_alpha = net->modules().front().alpha;
  // LoCon: kohya's conv_dim and conv_alpha, from the network (a --network_weights file's too).
  const LoraModule* conv = net->first_kxk_conv();
  const int net_conv_rank = conv ? int(conv->down.value.dim(0)) : 0;
  const float net_conv_alpha = conv ? conv->alpha : 0.0f;
  net->attach(trainer.grads());
  std::vector<Param*> params = net->params();
  AdamW adam(params, AdamWOptions{o.lr, 0.9, 0.999, 1e-8, o.weight_decay});
  log("lora: " + std::to_string(net->modules().size() - size_t(te_modules)) + " UNet modules" +
          (te_modules ? ", " + std::to_string(te_modules) + " text encoder modules" +
                            (sdxl ? " (te1 " + std::to_string(te1_modules) + ", te2 " + std::to_string(te2_modules) + ")"
                                  : std::string())
                      : std::string()) +
          ", rank " +
          std::to_string(net_rank) + ", alpha " + fmt("%g", net_alpha) +
          (net_conv_rank ? ", conv rank " + std::to_string(net_conv_rank) + ", conv alpha " + fmt("%g", net_conv_alpha)
                         : std::string()),
      false);

  const DdpmSchedule sched = DdpmSchedule::sd();
  const int64_t per_epoch = std::max<int64_t>(1, (data.epoch_length() + o.batch - 1) / o.batch);
  const int total = o.steps > 0 ? o.steps : int(per_epoch * o.epochs);

  // Epoch order: every item `repeats` times, shuffled per epoch from the seed.
  auto epoch_order = [&](int64_t epoch) {
    std::vector<size_t> order;
    for (size_t i = 0; i < examples.size(); ++i)
      for (int r = 0; r < examples[i].item->repeats; ++r) order.push_back(i);
    std::mt19937_64 g = step_rng(o.seed, uint64_t(epoch), 1);
    std::shuffle(order.begin(), order.end(), g);
    return order;
  };
  // A batch of examples of one latent size (the first example's bucket).
  auto make_batch = [&](const std::vector<size_t>& idx, std::mt19937_64& g, const std::vector<int>* fixed_t,
                        const std::vector<Tensor>* fixed_noise, bool for_train) {
    std::vector<Tensor> x0, noise, ctx, pooled, tids;
    TextEncoderTrainer::Batch ids;
    std::vector<int> ts;
    auto rng = make_cpu_rng(g());
    for (size_t k = 0; k < idx.size(); ++k) {
      const Example& e = examples[idx[k]];
      x0.push_back(e.latent);
      noise.push_back(fixed_noise ? (*fixed_noise)[k] : rng->randn(e.latent.shape()));
      ts.push_back(fixed_t ? (*fixed_t)[k] : sample_timestep(uniform(g)));
      std::string cap = for_train ? caption_for_step(e.caption, dopt, g) : e.caption;
      if (for_train && drop_caption(uniform(g), o.caption_dropout)) cap.clear();
      if (sdxl) tids.push_back(e.time_ids);
      if (o.train_text_encoder) {  // encoded by the (training) text encoder(s) with the batch
        tenc->add_caption(ids, cap);
        continue;
      }
      const Conditioning& cd = conditioning(cap);
      ctx.push_back(cd.context);
      if (sdxl) pooled.push_back(cd.pooled);
    }
    Tensor n = concat0(noise);
    if (for_train && o.noise_offset != 0) apply_noise_offset(n, o.noise_offset, *rng);
    struct B {
      NoisedBatch nb;
      Tensor ctx, pooled, tids;
      TextEncoderTrainer::Batch ids;
    } b{make_noised_batch(sched, concat0(x0), n, ts, obj), ctx.empty() ? Tensor() : concat0(ctx),
        pooled.empty() ? Tensor() : concat0(pooled), sdxl ? concat0(tids) : Tensor(), ids};
    return b;
  };
  // One step (backward) or evaluation of a batch; with the text encoder(s) in training, their
  // forward (and backward, from the UNet's context and, SDXL, pooled-embedding gradients) runs
  // here with the LoRA's adapters.
  auto run_batch = [&](auto& b, const std::vector<float>& w, bool backward) {
    if (!o.train_text_encoder)
      return trainer.run(b.nb, b.ctx, w, backward, 1.0f, sdxl ? &b.pooled : nullptr, sdxl ? &b.tids : nullptr);
    Arena arena;
    Ctx c{*be, arena, DType::F32, &ws, &trainer.grads()};
    const TextEncoderTrainer::Encoded enc = tenc->forward(c, b.ids);
    Tensor dctx = Tensor::zeros(enc.context.shape()), dpooled = sdxl ? Tensor::zeros(enc.pooled.shape()) : Tensor();
    UNetTrainer::Step s = trainer.run(b.nb, enc.context, w, backward, 1.0f, sdxl ? &enc.pooled : nullptr,
                                      sdxl ? &b.tids : nullptr, backward ? &dctx : nullptr,
                                      backward && sdxl ? &dpooled : nullptr);
    if (backward) tenc->backward(c, dctx, dpooled);
    return s;
  };

  // Resume: weights, AdamW moments and the step from a state file of this very run.
  const std::string fingerprint = run_fingerprint(o, data, total, dopt.resolution);
  const std::string state_path = o.output + ".state.safetensors";
  int start_step = 0;
  std::string csv_before;
  if (!o.resume.empty()) {
    const TensorFile st = open_model_file(o.resume);
    auto meta = [&](const char* k) {
      auto it = st.metadata.find(k);
      DF_CHECK(it != st.metadata.end(), o.resume, ": not a diffuse training state (no ", k, ")");
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
      fail("--resume ", o.resume, ": the state is from another model, dataset or settings: ", diff.empty() ? "unreadable" : diff);
    }
    start_step = std::stoi(meta("diffuse_step"));
    csv_before = meta("diffuse_csv");
    std::vector<Tensor> m, v;
    for (Param* p : params) {
      auto get = [&](const std::string& k) {
        const Tensor* t = st.find(k);
        DF_CHECK(t && t->shape() == p->value.shape(), o.resume, ": ", k, " is missing or mis-shaped");
        return t->to(DType::F32);
      };
      p->value.copy_from(get("lora." + p->name));
      m.push_back(get("adam.exp_avg." + p->name));
      v.push_back(get("adam.exp_avg_sq." + p->name));
    }
    adam.set_state(start_step, std::move(m), std::move(v));
    log("resuming at step " + std::to_string(start_step) + "/" + std::to_string(total) + " from " + o.resume, false);
  }
  auto write_state = [&](int step, const std::string& csv_text) {
    std::vector<std::pair<std::string, Tensor>> t;
    for (size_t i = 0; i < params.size(); ++i) {
      t.emplace_back("lora." + params[i]->name, params[i]->value.clone());
      t.emplace_back("adam.exp_avg." + params[i]->name, adam.exp_avg(i).clone());
      t.emplace_back("adam.exp_avg_sq." + params[i]->name, adam.exp_avg_sq(i).clone());
    }
    save_safetensors(state_path, t,
                     {{"diffuse_run", fingerprint}, {"diffuse_step", std::to_string(step)}, {"diffuse_csv", csv_text}});
  };

  // Validation: up to 4 examples at fixed timesteps with fixed noise (the raw training loss is
  // dominated by the random timestep).
  std::vector<size_t> val_idx;
  for (size_t i = 0; i < examples.size() && val_idx.size() < 4; ++i)
    if (!examples[i].item->is_reg) val_idx.push_back(i);
  const std::vector<int> val_t = {100, 300, 500, 700, 900};
  std::vector<std::vector<Tensor>> val_noise(val_t.size());
  {
    auto r = make_cpu_rng(o.seed ^ 0x5eed);
    for (auto& vn : val_noise)
      for (size_t i : val_idx) vn.push_back(r->randn(examples[i].latent.shape()));
  }
  auto validation = [&] {
    double sum = 0;
    int n = 0;
    for (size_t k = 0; k < val_t.size(); ++k)
      for (size_t j = 0; j < val_idx.size(); ++j) {
        std::mt19937_64 g(0);
        const std::vector<int> t = {val_t[k]};
        const std::vector<Tensor> nz = {val_noise[k][j]};
        auto b = make_batch({val_idx[j]}, g, &t, &nz, false);
        sum += run_batch(b, {}, false).loss.loss;
        ++n;
      }
    return sum / n;
  };

  LoraTrainResult res;
  res.output = o.output;
  res.val_loss_start = validation();
  log("validation loss at the start: " + fmt("%.6f", res.val_loss_start), false);
  // The loss log beside the output (written with the LoRA: step, loss, lr, validation loss).
  std::ostringstream csv;
  if (csv_before.empty()) csv << "step,loss,lr,val_loss\n0,,," << res.val_loss_start << "\n";
  else csv << csv_before;
  auto write_csv = [&] {
    const std::string text = csv.str();
    write_file_safely(o.output + ".csv", text.data(), text.size());
    write_loss_plot(o.output + ".loss.png", text);  // the chart of the same log
  };

  auto metadata = [&](int step) {
    std::map<std::string, std::string> m = {
        {"ss_network_module", "networks.lora"},
        {"ss_network_dim", std::to_string(net_rank)},
        {"ss_network_alpha", fmt("%g", net_alpha)},
        {"ss_base_model_version", sdxl ? "sdxl_base_v1-0"
                                  : model->family == Family::SD2 ? (obj == Objective::V ? "sd_v2_v" : "sd_v2")
                                                                 : "sd_v1"},
        {"ss_sd_model_name", fs::path(o.model).filename().string()},
        {"ss_num_epochs", std::to_string((total + per_epoch - 1) / per_epoch)},
        {"ss_optimizer", "torch.optim.adamw.AdamW"},
        {"ss_mixed_precision", o.precision == "bf16" ? "bf16" : "no"},
        {"ss_max_grad_norm", fmt("%g", o.max_grad_norm)},
        {"ss_shuffle_caption", o.data_opts.shuffle_captions ? "True" : "False"},
        {"ss_keep_tokens", std::to_string(o.data_opts.keep_tokens)},
        {"ss_enable_bucket", o.data_opts.buckets ? "True" : "False"},
        {"ss_cache_latents", "True"},
        {"ss_caption_dropout_rate", fmt("%g", o.caption_dropout)},
        {"ss_lr_warmup_steps", std::to_string(o.warmup_steps)},
        {"modelspec.sai_model_spec", "1.0.1"},
        {"modelspec.architecture", sdxl ? "stable-diffusion-xl-v1-base/lora"
                                   : model->family == Family::SD2
                                       ? (obj == Objective::V ? "stable-diffusion-v2-768-v/lora" : "stable-diffusion-v2-512/lora")
                                       : "stable-diffusion-v1/lora"},
        {"modelspec.implementation", sdxl ? "https://github.com/Stability-AI/generative-models" : "diffusers"},
        {"modelspec.title", fs::path(o.output).stem().string()},
        {"modelspec.resolution", std::to_string(dopt.resolution) + "x" + std::to_string(dopt.resolution)},
        {"modelspec.prediction_type", obj == Objective::V ? "v" : "epsilon"},
        {"ss_v2", model->family == Family::SD2 ? "True" : "False"},
        {"ss_output_name", fs::path(o.output).stem().string()},
        {"ss_resolution", "(" + std::to_string(dopt.resolution) + ", " + std::to_string(dopt.resolution) + ")"},
        {"ss_steps", std::to_string(step)},
        {"ss_max_train_steps", std::to_string(total)},
        {"ss_learning_rate", fmt("%g", o.lr)},
        {"ss_unet_lr", fmt("%g", o.lr)},
        {"ss_text_encoder_lr", o.train_text_encoder ? fmt("%g", o.text_encoder_lr > 0 ? o.text_encoder_lr : o.lr) : "0"},
        {"ss_lr_scheduler", lr_schedule_name(sched_kind)},
        {"ss_batch_size_per_device", std::to_string(o.batch)},
        {"ss_num_train_images", std::to_string(samples_per_epoch(data, false))},
        {"ss_seed", std::to_string(o.seed)},
        {"ss_min_snr_gamma", fmt("%g", o.min_snr_gamma)},
        {"ss_noise_offset", fmt("%g", o.noise_offset)},
        {"ss_training_comment", "trained by diffuse train lora"},
    };
    nlohmann::json tf = nlohmann::json::object();
    for (const auto& [folder, tags] : data.tag_frequency)
      for (const auto& [tag, n] : tags) tf[folder][tag] = n;
    m["ss_tag_frequency"] = tf.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    nlohmann::json dirs = nlohmann::json::object();
    for (const DatasetItem& it : data.items) {
      if (it.is_reg) continue;  // ss_reg_dataset_dirs
      const std::string folder = fs::path(it.image_path).parent_path().filename().string();
      dirs[folder]["n_repeats"] = it.repeats;
      dirs[folder]["img_count"] = dirs[folder].value("img_count", 0) + 1;
    }
    m["ss_dataset_dirs"] = dirs.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    for (const auto& kv : reg_metadata(reg, o.prior_loss_weight)) m.insert(kv);
    if (net_conv_rank > 0)  // kohya: json.dumps of the --network_args strings
      m["ss_network_args"] = "{\"conv_dim\": \"" + std::to_string(net_conv_rank) + "\", \"conv_alpha\": \"" +
                             fmt("%g", net_conv_alpha) + "\"}";
    return m;
  };

  const auto t0 = std::chrono::steady_clock::now();
  double smooth = 0;
  int64_t epoch = -1;
  std::vector<size_t> order;
  size_t pos = 0;
  for (int step = 0; step < start_step; ++step) {  // a resumed run: where the data order stands
    if (pos + size_t(o.batch) > order.size()) order = epoch_order(++epoch), pos = 0;
    pos += size_t(o.batch);
  }
  for (int step = start_step; step < total; ++step) {
    if (pos + size_t(o.batch) > order.size()) order = epoch_order(++epoch), pos = 0;
    std::vector<size_t> idx(order.begin() + int64_t(pos), order.begin() + int64_t(std::min(order.size(), pos + size_t(o.batch))));
    pos += size_t(o.batch);
    // One latent size per batch: examples of another bucket wait for a later batch.
    idx.erase(std::remove_if(idx.begin() + 1, idx.end(),
                             [&](size_t i) { return examples[i].latent.shape() != examples[idx[0]].latent.shape(); }),
              idx.end());
    std::mt19937_64 g = step_rng(o.seed, uint64_t(step), 2);
    auto b = make_batch(idx, g, nullptr, nullptr, true);
    std::vector<bool> is_reg;  // reg samples' loss × prior_loss_weight
    for (size_t i : idx) is_reg.push_back(examples[i].item->is_reg);
    const std::vector<float> w =
        with_prior_loss_weight(loss_weights(sched, b.nb.timesteps, obj, o.min_snr_gamma), is_reg, o.prior_loss_weight);
    adam.zero_grad();
    UNetTrainer::Step s = run_batch(b, w, true);
    DF_CHECK(std::isfinite(s.loss.loss), "the loss became non-finite at step ", step + 1,
             (step > 0 && o.save_every ? "; the last saved LoRA is kept" : ""), " (try a lower --lr)");
    clip_grad_norm(params, o.max_grad_norm);
    const float lr = lr_at(sched_kind, float(o.lr), step, o.warmup_steps, total);
    adam.step(lr);
    smooth = step == 0 ? s.loss.loss : 0.95 * smooth + 0.05 * s.loss.loss;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double its = double(step + 1) / el;
    csv << step + 1 << "," << s.loss.loss << "," << lr << ",";
    if (o.validate_every > 0 && (step + 1) % o.validate_every == 0 && step + 1 < total) csv << validation();
    csv << "\n";
    const int every = std::max(1, total / 100);  // at most ~100 progress lines
    if ((step + 1) % every == 0 || step + 1 == total)
      log("step " + std::to_string(step + 1) + "/" + std::to_string(total) + "  loss " + fmt("%.4f", smooth) + "  lr " +
            fmt("%.2e", lr) + "  " + fmt("%.2f it/s", its) + "  ETA " + fmt("%.0f s", double(total - step - 1) / its),
        true);
    if (o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < total) {
      const fs::path p(o.output);
      const std::string inter = (p.parent_path() / (p.stem().string() + "-step" + std::to_string(step + 1))).string() +
                                p.extension().string();
      net->save(inter, save_dt, metadata(step + 1));
      write_csv();
      write_state(step + 1, csv.str());
      log("saved " + inter, false);
    }
    if (sample_due(samples, step + 1, total))
      write_samples(*model, *be, *net, samples, step + 1, o.output, [&](const std::string& l) { log(l, false); });
  }
  res.steps = total;
  res.val_loss_end = validation();
  csv << total << ",,," << res.val_loss_end << "\n";
  log("validation loss at the end: " + fmt("%.6f", res.val_loss_end) + " (start " + fmt("%.6f", res.val_loss_start) + ")",
      false);
  net->save(o.output, save_dt, metadata(total));
  write_csv();
  write_state(total, csv.str());
  log("wrote " + o.output + " (" + std::to_string(net->modules().size()) + " modules)", false);
  return res;
}

}  // namespace diffuse::train
