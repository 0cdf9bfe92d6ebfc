#include "train/check.h"

#include <cmath>
#include <cstdio>
#include <memory>

#include "backend/backend.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/sd_model.h"
#include "train/lora_network.h"
#include "train/optim.h"
#include "train/unet_trainer.h"

namespace diffuse::train {

namespace {

using Out = std::vector<std::pair<std::string, Tensor>>;

Tensor scalar(double v) { return Tensor::full(Shape{}, float(v)); }

std::string gamma_tag(float g) {
  char buf[32];
  if (g == std::floor(g)) std::snprintf(buf, sizeof buf, "%d", int(g));
  else std::snprintf(buf, sizeof buf, "%g", double(g));
  return buf;
}

const Tensor& need(const TensorFile& f, const std::string& name) {
  const Tensor* t = f.find(name);
  DF_CHECK(t != nullptr, f.path, ": no tensor ", name);
  return *t;
}

Tensor float_input(const TensorFile& f, const std::string& name, int rank) {
  const Tensor& t = need(f, name);
  DF_CHECK(dtype_is_float(t.dtype()) && t.rank() == rank && t.numel() > 0, f.path, ": ", name, " is ", t.str(),
           ", expected a ", rank, "-d float tensor");
  Tensor x = t.to(DType::F32);
  for (int64_t i = 0; i < x.numel(); ++i)
    DF_CHECK(std::isfinite(x.f32()[i]), f.path, ": ", name, " has a non-finite value at element ", i);
  return x;
}

std::vector<int> timesteps_input(const TensorFile& f, int64_t B) {
  const Tensor& t = need(f, "input.timesteps");
  DF_CHECK(t.rank() == 1 && t.dim(0) == B, f.path, ": input.timesteps is ", t.str(), ", expected [", B, "]");
  std::vector<int> out;
  for (int64_t i = 0; i < B; ++i) {
    double v = 0;
    switch (t.dtype()) {
      case DType::I64: v = double(t.data<int64_t>()[i]); break;
      case DType::I32: v = double(t.data<int32_t>()[i]); break;
      default: v = double(t.to(DType::F32).f32()[i]);
    }
    DF_CHECK(v == std::floor(v) && v >= 0 && v < 1000, f.path, ": input.timesteps[", i, "] = ", v,
             " is not an integer in [0, 1000)");
    out.push_back(int(v));
  }
  return out;
}

}  // namespace

void run_check(const CheckOptions& opt, const std::function<void(const std::string&)>& log) {
  DF_CHECK(opt.adamw_steps == 0 || !opt.lora.empty(), "train check: AdamW steps need a LoRA (--lora)");
  DF_CHECK(opt.adamw_steps >= 0 && opt.adamw_steps <= 1000, "train check: --adamw-steps ", opt.adamw_steps,
           " is outside [0, 1000]");
  const TensorFile in = open_model_file(opt.inputs);
  const Tensor x0 = nchw_to_nhwc(float_input(in, "input.x0", 4));
  const Tensor noise = nchw_to_nhwc(float_input(in, "input.noise", 4));
  DF_CHECK(x0.shape() == noise.shape(), opt.inputs, ": input.x0 and input.noise differ in shape");
  const int64_t B = x0.dim(0);
  const std::vector<int> ts = timesteps_input(in, B);
  const Tensor ctx = float_input(in, "input.encoder_hidden_states", 3);
  DF_CHECK(ctx.dim(0) == B, opt.inputs, ": input.encoder_hidden_states ", ctx.str(), " has another batch size than input.x0");

  auto be = make_cpu_backend(Precision::F32);
  SDLoadOptions lo;
  lo.text_encoders = false, lo.vae_encoder = false, lo.vae_decoder = false;
  log("loading " + opt.model);
  std::unique_ptr<SDModel> model = SDModel::load(opt.model, *be, lo);
  const UNetConfig& ucfg = model->unet.config();
  DF_CHECK(x0.dim(3) == ucfg.in_channels, opt.inputs, ": input.x0 has ", x0.dim(3), " channels, the UNet takes ",
           ucfg.in_channels);
  DF_CHECK(ctx.dim(2) == ucfg.context_dim, opt.inputs, ": input.encoder_hidden_states ", ctx.str(),
           " does not match the UNet's context width ", ucfg.context_dim);
  Tensor text_embeds, time_ids;
  if (ucfg.text_time) {
    text_embeds = float_input(in, "input.text_embeds", 2);
    time_ids = float_input(in, "input.time_ids", 2);
  }
  const Tensor* te = text_embeds.defined() ? &text_embeds : nullptr;
  const Tensor* ti = time_ids.defined() ? &time_ids : nullptr;

  UNetTrainer trainer(*model, *be);
  for (const std::string& name : opt.full_grads)
    DF_CHECK(trainer.has_param(name), "--full-grads: the UNet of ", opt.model, " has no parameter ", name);
  std::unique_ptr<LoraNetwork> net;
  if (!opt.lora.empty()) {
    net = LoraNetwork::from_file(opt.lora, model->unet);
    net->attach(trainer.grads());
    log("lora: " + std::to_string(net->modules().size()) + " modules from " + opt.lora);
  }
  const DdpmSchedule sched = DdpmSchedule::sd();
  const NoisedBatch eps_batch = make_noised_batch(sched, x0, noise, ts, Objective::Eps);
  const NoisedBatch v_batch = make_noised_batch(sched, x0, noise, ts, Objective::V);
  const NoisedBatch& trained = opt.objective == Objective::Eps ? eps_batch : v_batch;
  const std::vector<float> weights = loss_weights(sched, ts, opt.objective, opt.min_snr_gamma);
  Out out;

  // The reference losses (unweighted) and, with γ, the min-SNR weights and weighted losses.
  const std::string ref = net ? "ref.lora." : "ref.base.";
  UNetTrainer::Step base = trainer.run(eps_batch, ctx, {}, false, 1.0f, te, ti);
  out.emplace_back(ref + "pred", nhwc_to_nchw(base.pred));
  out.emplace_back(ref + "loss_eps", scalar(base.loss.unweighted));
  out.emplace_back(ref + "loss_v", scalar(mse_loss(base.pred, v_batch.target, {}).unweighted));
  if (opt.min_snr_gamma > 0) {
    Tensor snr = Tensor::empty({B});
    for (int64_t b = 0; b < B; ++b) snr.f32()[b] = sched.snr(ts[size_t(b)]);
    out.emplace_back(ref + "snr", snr);
    const std::string g = gamma_tag(opt.min_snr_gamma);
    for (Objective o : {Objective::Eps, Objective::V}) {
      const std::vector<float> w = loss_weights(sched, ts, o, opt.min_snr_gamma);
      Tensor wt = Tensor::empty({B});
      for (int64_t b = 0; b < B; ++b) wt.f32()[b] = w[size_t(b)];
      const NoisedBatch& nb = o == Objective::Eps ? eps_batch : v_batch;
      out.emplace_back(ref + "minsnr" + g + "_weight_" + objective_name(o), wt);
      out.emplace_back(ref + "loss_minsnr" + g + "_" + objective_name(o), scalar(mse_loss(base.pred, nb.target, w).loss));
    }
  }
  log(ref + "loss_eps " + std::to_string(base.loss.unweighted));

  if (net) {
    // Gradients at the initial LoRA, then AdamW steps (zero grads -> loss -> backward -> step).
    std::vector<Param*> params = net->params();
    AdamW adam(params, AdamWOptions{opt.lr, 0.9, 0.999, 1e-8, opt.weight_decay});
    net->zero_grad();
    UNetTrainer::Step s = trainer.run(trained, ctx, weights, true, 1.0f, te, ti);
    Out grads = net->gradients("grad.");
    out.insert(out.end(), grads.begin(), grads.end());
    for (int k = 1; k <= opt.adamw_steps; ++k) {
      out.emplace_back("train.loss." + std::to_string(k - 1), scalar(s.loss.loss));
      adam.step();
      Out w = net->tensors("train.step" + std::to_string(k) + ".", false);
      out.insert(out.end(), w.begin(), w.end());
      if (k == 1)
        for (size_t i = 0; i < params.size(); ++i) {
          out.emplace_back("train.step1.adam.exp_avg." + params[i]->name, adam.exp_avg(i).clone());
          out.emplace_back("train.step1.adam.exp_avg_sq." + params[i]->name, adam.exp_avg_sq(i).clone());
        }
      log("adamw step " + std::to_string(k) + "/" + std::to_string(opt.adamw_steps) + ": loss " +
          std::to_string(s.loss.loss));
      net->zero_grad();
      s = trainer.run(trained, ctx, weights, k < opt.adamw_steps, 1.0f, te, ti);
    }
    if (opt.adamw_steps > 0) out.emplace_back("train.loss." + std::to_string(opt.adamw_steps), scalar(s.loss.loss));
    net->detach(trainer.grads());
  }

  if (!opt.full_grads.empty()) {
    std::vector<Param*> params;
    for (const std::string& name : opt.full_grads) params.push_back(&trainer.train_param(name));
    trainer.run(trained, ctx, weights, true, 1.0f, te, ti);
    for (Param* p : params) out.emplace_back("fullft.grad." + p->name, p->grad.clone());
  }
  std::map<std::string, std::string> meta = {
      {"diffuse_train_check", "fp32; objective " + std::string(objective_name(opt.objective)) +
                                  (opt.min_snr_gamma > 0 ? "; min-SNR gamma " + gamma_tag(opt.min_snr_gamma) : "")}};
  save_safetensors(opt.output, out, meta);
  log("wrote " + std::to_string(out.size()) + " tensors to " + opt.output);
}

}  // namespace diffuse::train
