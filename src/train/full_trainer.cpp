#include "train/full_trainer.h"

#include <chrono>
#include <ctime>
#include <filesystem>

#include "core/error.h"
#include "core/memory_stats.h"
#include "io/tensor_file.h"
#include "models/name_map.h"
#include "train/checkpoint_writer.h"
#include "train/ema.h"
#include "train/layer_params.h"

namespace fs = std::filesystem;

namespace diffuse::train {

namespace {

// The run's trained parameters: the UNet's (owned by the UNetTrainer), then the text encoder's.
struct FullParams {
  std::vector<Param*> all;        // the optimiser's order
  std::vector<std::string> keys;  // "unet/<name>", "text_encoder/<name>": state file keys
  std::vector<std::unique_ptr<Param>> te_owned;
  size_t unet_count = 0;
  int64_t unet_values = 0, te_values = 0;
};

// Every UNet tensor of the model file must be one the trainer trains (a layer's or norm's).
void check_covers_unet(const SDModel& model, UNetTrainer& trainer) {
  const WeightStore store = component_weights(open_model_file(model.path), Component::UNet, model.family);
  for (const std::string& name : store.names())
    DF_CHECK(trainer.has_param(name), model.path, ": the UNet tensor ", name,
             " is not a trainable layer or norm parameter here (full fine-tuning would leave it frozen)");
}

FullParams make_params(SDModel& model, UNetTrainer& trainer, bool text_encoder, bool embeddings, float te_lr_scale) {
  FullParams p;
  for (const std::string& n : trainable_names(model.unet.prepared(), model.unet.norms())) {
    Param& q = trainer.train_param(n);
    p.all.push_back(&q);
    p.keys.push_back("unet/" + n);
    p.unet_values += q.value.numel();
  }
  p.unet_count = p.all.size();
  if (!text_encoder) return p;
  for (const std::string& n : trainable_names(model.te.prepared(), model.te.norms())) {
    p.te_owned.push_back(make_trainable(trainer.grads(), model.te.prepared(), model.te.norms(), n, "text encoder"));
    p.te_owned.back()->lr_scale = te_lr_scale;
    p.all.push_back(p.te_owned.back().get());
    p.keys.push_back("text_encoder/" + n);
    p.te_values += p.te_owned.back()->value.numel();
  }
  if (!embeddings) return p;
  const auto [tok, pos] = model.te.trainable_embeddings();
  for (const auto& [name, t] : {std::pair<std::string, Tensor>{"text_model.embeddings.token_embedding.weight", tok},
                                {"text_model.embeddings.position_embedding.weight", pos}}) {
    auto q = std::make_unique<Param>();
    q->name = name;
    q->value = t;  // the tensor the encoder reads: updates apply at once
    q->grad = Tensor::zeros(t.shape());
    q->lr_scale = te_lr_scale;
    trainer.grads().tables[t.data()] = q->grad;
    p.te_values += t.numel();
    p.all.push_back(q.get());
    p.keys.push_back("text_encoder/" + name);
    p.te_owned.push_back(std::move(q));
  }
  return p;
}

// The prepared layers from the parameters' current values (after an update, a resume, an EMA swap).
void reprepare_all(Backend& be, SDModel& model, UNetTrainer& trainer, const FullParams& p) {
  for (size_t i = 0; i < p.all.size(); ++i)
    reprepare(be, trainer.grads(), i < p.unet_count ? model.unet.prepared() : model.te.prepared(), p.all[i]->name);
}

std::vector<TrainedComponent> trained_components(const FullParams& p) {
  std::vector<TrainedComponent> out = {{Component::UNet, {}}};
  if (p.all.size() > p.unet_count) out.push_back({Component::TextEncoder, {}});
  for (size_t i = 0; i < p.all.size(); ++i) out[i < p.unet_count ? 0 : 1].tensors[p.all[i]->name] = p.all[i]->value;
  return out;
}

std::string architecture(const SDModel& m, Objective obj) {
  if (m.family == Family::SDXL) return "stable-diffusion-xl-v1-base";
  if (m.family == Family::SD2) return obj == Objective::V ? "stable-diffusion-v2-768-v" : "stable-diffusion-v2-512";
  return "stable-diffusion-v1";
}

std::map<std::string, std::string> checkpoint_metadata(const FullTrainOptions& o, const SDModel& m, Objective obj,
                                                       bool zero_snr, int step, int total, int resolution) {
  nlohmann::json t;
  t["trainer"] = "diffuse train full", t["base_model"] = fs::path(o.model).filename().string();
  t["steps"] = step, t["max_steps"] = total, t["lr"] = o.lr, t["lr_scheduler"] = o.lr_schedule;
  t["batch"] = o.batch, t["seed"] = o.seed, t["resolution"] = resolution, t["precision"] = o.precision;
  t["train_text_encoder"] = o.train_text_encoder, t["train_embeddings"] = o.train_embeddings;
  if (o.ema >= 0) t["ema_decay"] = o.ema, t["ema_warmup"] = o.ema_warmup, t["weights"] = "ema";
  else t["weights"] = "trained";
  const std::string res = std::to_string(resolution);
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", std::gmtime(&now));
  std::map<std::string, std::string> meta = {{"modelspec.sai_model_spec", "1.0.0"},
          {"modelspec.architecture", architecture(m, obj)},
          {"modelspec.implementation",
           m.family == Family::SDXL ? "https://github.com/Stability-AI/generative-models" : "diffusers"},
          {"modelspec.title", fs::path(o.output).stem().string()},
          {"modelspec.date", date},
          {"modelspec.resolution", res + "x" + res},
          {"modelspec.prediction_type", obj == Objective::V ? "v" : "epsilon"},
          {"diffuse_training", t.dump()}};
  if (zero_snr) meta["ss_zero_terminal_snr"] = "True";  // (kohya's key; what the engine samples with)
  return meta;
}

void check_full_options(const FullTrainOptions& o) {
  DF_CHECK(!is_diffusers_dir(o.model), o.model, ": a diffusers folder; train full writes the original (ldm) ",
           "single-file layout, and the name mapping (models/name_map.h) goes from diffusers names back to ldm ones ",
           "for the UNet only, not for the VAE and text encoders: give the model as one .safetensors or .ckpt file");
  DF_CHECK(o.ema < 0 || (o.ema >= 0 && o.ema < 1), "--ema ", o.ema, ": the EMA decay must be in [0, 1)");
}

}  // namespace

FullTrainResult train_full(const FullTrainOptions& o, const LogFn& log) {
  check_full_options(o);
  const DType save_dt = check_run_options(o);
  RunData rd = load_run_data(o, log);  // a folder without usable images fails before the model loads

  auto be = make_cpu_backend(o.precision == "bf16" ? Precision::BF16 : Precision::F32);
  SDLoadOptions lo;
  lo.vae_decoder = false;
  log("loading " + o.model, false);
  std::unique_ptr<SDModel> model = SDModel::load(o.model, *be, lo);
  DF_CHECK(!o.train_text_encoder || !model->has_te2,
           "--train-text-encoder: full fine-tuning trains the SD 1.x/2.x text encoder (not SDXL's two yet)");
  UNetTrainer trainer(*model, *be);
  check_covers_unet(*model, trainer);
  TrainData data(*model, *be, rd.data, o, rd.dopt, trainer);
  const Objective obj = data.objective();
  log(data_summary(rd, data), false);

  const double te_lr = o.text_encoder_lr > 0 ? o.text_encoder_lr : o.lr;
  DF_CHECK(!o.train_embeddings || o.train_text_encoder, "--train-embeddings: only with --train-text-encoder");
  FullParams params = make_params(*model, trainer, o.train_text_encoder, o.train_embeddings, float(te_lr / o.lr));
  log("full fine-tuning: " + std::to_string(params.unet_count) + " UNet tensors (" +
          std::to_string(params.unet_values) + " values)" +
          (o.train_text_encoder ? ", " + std::to_string(params.all.size() - params.unet_count) +
                                      " text encoder tensors (" + std::to_string(params.te_values) +
                                      (o.train_embeddings ? " values, its embeddings included) at lr "
                                                          : " values; its token and position embeddings stay frozen) at lr ") +
                                      fmt("%g", te_lr)
                                : std::string()) +
          "; f32 master weights and AdamW moments",
      false);
  auto adam = std::make_unique<AdamW>(params.all, AdamWOptions{o.lr, 0.9, 0.999, 1e-8, o.weight_decay});
  const double f32_copies = o.ema >= 0 ? 5 : 4;  // weights, gradients, 2 AdamW moments, EMA
  log("training state in memory: " +
          fmt("%.2f GB", double(params.unet_values + params.te_values) * 4 * f32_copies / 1e9) +
          " (f32 weights, gradients, AdamW moments" + (o.ema >= 0 ? ", EMA" : "") +
          ") besides the model's prepared weights and activations",
      false);
  std::unique_ptr<Ema> ema;
  if (o.ema >= 0) {
    ema = std::make_unique<Ema>(params.all, o.ema, o.ema_warmup);
    log("EMA of the trained weights, decay " + fmt("%g", o.ema) +
            (o.ema_warmup ? " with diffusers' warmup (decay at step k: 0 at k = 1, then min(decay, k/(9 + k)))"
                          : " from the first step") +
            "; the checkpoints hold the EMA weights (ema-only)",
        false);
  }

  const RunLength len = run_length(o, rd.data);
  nlohmann::json fp = run_fingerprint(o, rd.data, len.total, rd.dopt.resolution);
  fp["trainer"] = "full", fp["ema"] = o.ema, fp["ema_warmup"] = o.ema_warmup, fp["embeddings"] = o.train_embeddings;
  const std::string fingerprint = fp.dump();
  const std::string state_path = o.output + ".state.safetensors";
  int start_step = 0;
  std::string csv_before;
  if (!o.resume.empty()) {
    start_step = resume_from(o.resume, fingerprint, params.all, params.keys, "param.", *adam, &csv_before,
                             [&](size_t i, const RunState& st) {
                               if (ema) ema->shadow(i).copy_from(st.get("ema." + params.keys[i], params.all[i]->value.shape()));
                             });
    reprepare_all(*be, *model, trainer, params);
    log("resuming at step " + std::to_string(start_step) + "/" + std::to_string(len.total) + " from " + o.resume, false);
  }

  const TensorFile input = open_model_file(o.model);
  auto save_checkpoint = [&](const std::string& path, int step) {
    if (ema) ema->swap_with_params();  // the EMA weights in the parameters' place while writing
    CheckpointWriteResult r;
    try {
      r = save_ldm_checkpoint(path, input, model->family, trained_components(params), save_dt,
                              checkpoint_metadata(o, *model, obj, data.zero_terminal_snr(), step, len.total, rd.dopt.resolution));
    } catch (...) {
      if (ema) ema->swap_with_params();
      throw;
    }
    if (ema) ema->swap_with_params();
    log("wrote " + path + " (ldm layout: " + std::to_string(r.replaced) + " trained tensors" +
            (ema ? " holding the EMA weights" : "") + ", " + describe_untrained(r, save_dt) +
            (r.dropped_ema ? ", " + std::to_string(r.dropped_ema) + " stale model_ema.* tensors left out" : "") + ")",
        false);
  };
  auto write_state = [&](int step, const std::string& csv_text) {
    std::vector<std::pair<std::string, Tensor>> t;
    for (size_t i = 0; i < params.all.size(); ++i) {
      t.emplace_back("param." + params.keys[i], params.all[i]->value);
      t.emplace_back("adam.exp_avg." + params.keys[i], adam->exp_avg(i));
      t.emplace_back("adam.exp_avg_sq." + params.keys[i], adam->exp_avg_sq(i));
      if (ema) t.emplace_back("ema." + params.keys[i], ema->shadow(i));
    }
    save_safetensors(state_path, t, state_metadata(fingerprint, step, csv_text));
  };

  FullTrainResult res;
  res.output = o.output;
  res.parameters = params.unet_values + params.te_values;
  res.val_loss_start = data.validation();
  log("validation loss at the start: " + fmt("%.6f", res.val_loss_start), false);
  LossLog loss_log(o.output, csv_before, res.val_loss_start);

  StepHooks hooks;
  hooks.after_update = [&](int step) {
    reprepare_all(*be, *model, trainer, params);
    if (ema) ema->update(step);
  };
  hooks.save = [&](int step) {
    save_checkpoint(intermediate_path(o.output, step), step);
    loss_log.write();
    write_state(step, loss_log.text());
    log("saved the training state " + state_path, false);
  };
  run_steps(o, data, *adam, loss_log, start_step, len.total, "checkpoint", hooks, log);
  log("peak memory (RSS) of the steps: " + fmt("%.2f GB", double(peak_rss_bytes()) / 1e9), false);
  adam.reset();  // the moments are not saved at the end: their memory goes before the checkpoint's

  res.steps = len.total;
  res.val_loss_end = end_validation(data, loss_log, len.total, res.val_loss_start, log);
  if (ema) {
    ema->swap_with_params();
    reprepare_all(*be, *model, trainer, params);
    res.val_loss_ema = data.validation();
    ema->swap_with_params();  // the prepared layers keep the EMA weights: only the save follows
    log("validation loss of the EMA weights: " + fmt("%.6f", res.val_loss_ema), false);
  }
  save_checkpoint(o.output, len.total);
  loss_log.write();
  log("peak memory (RSS) of the run: " + fmt("%.2f GB", double(peak_rss_bytes()) / 1e9), false);
  return res;
}

}  // namespace diffuse::train
