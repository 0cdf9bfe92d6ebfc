#include "train/lora_trainer.h"

#include <cmath>
#include <filesystem>
#include <map>
#include <memory>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/tensor_file.h"
#include "train/lora_network.h"
#include "train/reg_data.h"
#include "train/sample_images.h"

namespace fs = std::filesystem;

namespace diffuse::train {

namespace {

void check_lora_options(const LoraTrainOptions& o) {
  DF_CHECK(o.conv_rank >= 0 && o.conv_rank <= 4096, "--conv-rank ", o.conv_rank, ": must be in [0, 4096] (0: off)");
  DF_CHECK(o.conv_rank == 0 || o.network_weights.empty(),
           "--conv-rank: not with --network-weights (the file's modules train, LoCon ones included)");
}

// The sample-image settings of a run (the VAE decoder is loaded only for them).
SampleSettings sample_settings(const LoraTrainOptions& o, int resolution) {
  SampleSettings s;
  s.prompts = o.sample_prompts, s.every = o.sample_every, s.steps = o.sample_steps;
  s.cfg = o.sample_cfg, s.sampler = o.sample_sampler, s.seed = o.seed;
  s.width = s.height = resolution;
  check_sample_settings(s);
  return s;
}

// What the file says about the network: rank and alpha (a --network_weights file's: from its first
// module), kohya's conv_dim/conv_alpha when it has LoCon modules, module counts.
struct NetworkInfo {
  int rank = 0, conv_rank = 0, te1 = 0, te2 = 0;
  float alpha = 0, conv_alpha = 0;
};

NetworkInfo network_info(LoraNetwork& net) {
  NetworkInfo n;
  n.rank = int(net.modules().front().down.value.dim(0));
  n.alpha = net.modules().front().alpha;
  if (const LoraModule* conv = net.first_kxk_conv()) n.conv_rank = int(conv->down.value.dim(0)), n.conv_alpha = conv->alpha;
  n.te1 = net.count(LoraTarget::TextEncoder), n.te2 = net.count(LoraTarget::TextEncoder2);
  return n;
}

// The LoRA: fresh on kohya's targets (+ LoCon) or a --network_weights file's modules; with the
// text encoder(s) in training, their modules (fresh unless the file has some) at the text
// encoder's learning-rate scale.
std::unique_ptr<LoraNetwork> make_network(SDModel& model, const LoraTrainOptions& o, const LogFn& log) {
  const bool sdxl = model.has_te2;
  ClipTextModel* te1 = o.train_text_encoder ? &model.te : nullptr;  // the encoders whose LoRA trains
  ClipTextModel* te2 = o.train_text_encoder && sdxl ? &model.te2 : nullptr;
  std::unique_ptr<LoraNetwork> net = o.network_weights.empty()
                                         ? LoraNetwork::create_unet(model.unet, o.rank, o.alpha, o.seed)
                                         : LoraNetwork::from_file(o.network_weights, model.unet, te1, te2);
  if (!o.network_weights.empty())
    log("starting from " + o.network_weights + " (" + std::to_string(net->modules().size()) + " modules)", false);
  if (o.conv_rank > 0) net->add_unet_conv_targets(model.unet, o.rank, o.alpha, o.conv_rank, o.conv_alpha, o.seed);
  if (o.train_text_encoder) {
    if (net->count(LoraTarget::TextEncoder) + net->count(LoraTarget::TextEncoder2) == 0) {
      net->add_text_encoder(model.te, sdxl ? "lora_te1" : "lora_te", o.rank, o.alpha, o.seed);
      if (sdxl) net->add_text_encoder(model.te2, "lora_te2", o.rank, o.alpha, o.seed);
    }
    const float te_scale = float((o.text_encoder_lr > 0 ? o.text_encoder_lr : o.lr) / o.lr);
    net->set_lr_scale(LoraTarget::TextEncoder, te_scale);
    net->set_lr_scale(LoraTarget::TextEncoder2, te_scale);
  }
  const NetworkInfo n = network_info(*net);
  const int te = n.te1 + n.te2;
  log("lora: " + std::to_string(net->modules().size() - size_t(te)) + " UNet modules" +
          (te ? ", " + std::to_string(te) + " text encoder modules" +
                    (sdxl ? " (te1 " + std::to_string(n.te1) + ", te2 " + std::to_string(n.te2) + ")" : std::string())
              : std::string()) +
          ", rank " + std::to_string(n.rank) + ", alpha " + fmt("%g", n.alpha) +
          (n.conv_rank ? ", conv rank " + std::to_string(n.conv_rank) + ", conv alpha " + fmt("%g", n.conv_alpha)
                       : std::string()),
      false);
  return net;
}

// kohya's ss_* (and modelspec.*) metadata of a LoRA file saved at `step`.
struct MetaContext {
  const LoraTrainOptions& o;
  const SDModel& model;
  const RunData& rd;
  const NetworkInfo& net;
  Objective obj;
  bool zero_snr;
  RunLength len;
};

std::map<std::string, std::string> lora_metadata(const MetaContext& x, int step) {
  const LoraTrainOptions& o = x.o;
  const SDModel* model = &x.model;
  const Dataset& data = x.rd.data;
  const DatasetOptions& dopt = x.rd.dopt;
  const bool sdxl = x.model.unet_cfg.text_time;
  const Objective obj = x.obj;
  const int total = x.len.total;
  const int64_t per_epoch = x.len.per_epoch;
  const int net_rank = x.net.rank, net_conv_rank = x.net.conv_rank;
  const float net_alpha = x.net.alpha, net_conv_alpha = x.net.conv_alpha;
  const LrSchedule sched_kind = parse_lr_schedule(o.lr_schedule);
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
      {"ss_v_parameterization", obj == Objective::V ? "True" : "False"},
      {"ss_zero_terminal_snr", x.zero_snr ? "True" : "False"},
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
      {"ss_multires_noise_iterations", std::to_string(o.multires_noise_iterations)},
      {"ss_multires_noise_discount", fmt("%g", o.multires_noise_discount)},
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
  for (const auto& kv : reg_metadata(x.rd.reg, o.prior_loss_weight)) m.insert(kv);
  if (net_conv_rank > 0)  // kohya: json.dumps of the --network_args strings
    m["ss_network_args"] = "{\"conv_dim\": \"" + std::to_string(net_conv_rank) + "\", \"conv_alpha\": \"" +
                           fmt("%g", net_conv_alpha) + "\"}";
  return m;
}

}  // namespace

LoraTrainResult train_lora(const LoraTrainOptions& o, const LogFn& log) {
  check_lora_options(o);
  const DType save_dt = check_run_options(o);
  RunData rd = load_run_data(o, log);  // a folder without usable images fails before the model loads
  SampleSettings samples = sample_settings(o, rd.dopt.resolution);

  auto be = make_cpu_backend(o.precision == "bf16" ? Precision::BF16 : Precision::F32);
  SDLoadOptions lo;
  lo.vae_decoder = !samples.prompts.empty();
  log("loading " + o.model, false);
  std::unique_ptr<SDModel> model = SDModel::load(o.model, *be, lo);
  UNetTrainer trainer(*model, *be);
  TrainData data(*model, *be, rd.data, o, rd.dopt, trainer);
  const Objective obj = data.objective();
  samples.prediction = obj == Objective::V ? Prediction::VPrediction : Prediction::Epsilon;
  samples.zero_terminal_snr = data.zero_terminal_snr();
  log(data_summary(rd, data), false);
  if (!o.reg_data.empty())
    log("reg data: " + std::to_string(rd.reg.num_reg_images) + " samples with repeats in " + o.reg_data +
            ", matched to " + std::to_string(rd.reg.matched) + " per epoch; prior loss weight " +
            fmt("%g", o.prior_loss_weight),
        false);

  std::unique_ptr<LoraNetwork> net = make_network(*model, o, log);
  const NetworkInfo info = network_info(*net);
  net->attach(trainer.grads());
  std::vector<Param*> params = net->params();
  AdamW adam(params, AdamWOptions{o.lr, 0.9, 0.999, 1e-8, o.weight_decay});

  // Resume: weights, AdamW moments and the step from a state file of this very run.
  const RunLength len = run_length(o, rd.data);
  nlohmann::json fp = run_fingerprint(o, rd.data, len.total, rd.dopt.resolution);
  fp["rank"] = o.rank, fp["alpha"] = o.alpha;
  fp["network_weights"] = o.network_weights.empty() ? std::string() : fs::path(o.network_weights).filename().string();
  if (o.conv_rank > 0) fp["conv_rank"] = o.conv_rank, fp["conv_alpha"] = o.conv_alpha;  // LoCon only: old states match
  const std::string fingerprint = fp.dump();
  const std::string state_path = o.output + ".state.safetensors";
  int start_step = 0;
  std::string csv_before;
  if (!o.resume.empty()) {
    std::vector<std::string> keys;
    for (const Param* p : params) keys.push_back(p->name);
    start_step = resume_from(o.resume, fingerprint, params, keys, "lora.", adam, &csv_before);
    log("resuming at step " + std::to_string(start_step) + "/" + std::to_string(len.total) + " from " + o.resume, false);
  }
  auto write_state = [&](int step, const std::string& csv_text) {
    std::vector<std::pair<std::string, Tensor>> t;
    for (size_t i = 0; i < params.size(); ++i) {
      t.emplace_back("lora." + params[i]->name, params[i]->value.clone());
      t.emplace_back("adam.exp_avg." + params[i]->name, adam.exp_avg(i).clone());
      t.emplace_back("adam.exp_avg_sq." + params[i]->name, adam.exp_avg_sq(i).clone());
    }
    save_safetensors(state_path, t, state_metadata(fingerprint, step, csv_text));
  };

  LoraTrainResult res;
  res.output = o.output;
  res.val_loss_start = data.validation();
  log("validation loss at the start: " + fmt("%.6f", res.val_loss_start), false);
  LossLog loss_log(o.output, csv_before, res.val_loss_start);
  const MetaContext meta{o, *model, rd, info, obj, data.zero_terminal_snr(), len};

  StepHooks hooks;
  hooks.save = [&](int step) {
    const std::string inter = intermediate_path(o.output, step);
    net->save(inter, save_dt, lora_metadata(meta, step));
    loss_log.write();
    write_state(step, loss_log.text());
    log("saved " + inter, false);
  };
  hooks.after_step = [&](int step) {
    if (sample_due(samples, step, len.total))
      write_samples(*model, *be, *net, samples, step, o.output, [&](const std::string& l) { log(l, false); });
  };
  run_steps(o, data, adam, loss_log, start_step, len.total, "LoRA", hooks, log);

  res.steps = len.total;
  res.val_loss_end = end_validation(data, loss_log, len.total, res.val_loss_start, log);
  net->save(o.output, save_dt, lora_metadata(meta, len.total));
  loss_log.write();
  write_state(len.total, loss_log.text());
  log("wrote " + o.output + " (" + std::to_string(net->modules().size()) + " modules)", false);
  return res;
}

}  // namespace diffuse::train
