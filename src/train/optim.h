// Optimisation: AdamW (decoupled weight decay, as torch.optim.AdamW), learning-rate schedules
// (diffusers' get_scheduler: constant, constant_with_warmup, linear, cosine — with warmup), and
// max-norm gradient clipping (torch.nn.utils.clip_grad_norm_). Parameters are f32 master tensors
// (training keeps fp32 master weights whatever the compute precision).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace diffuse::train {

// A trained tensor and its gradient (same shape, f32; the gradient accumulates, zero_grad clears).
struct Param {
  std::string name;
  Tensor value, grad;
  float lr_scale = 1;  // per-group learning rate as a multiple of the base (kohya's unet_lr/text_encoder_lr)
};

// Hyperparameters as Python floats (double), rounded to f32 where torch rounds them.
struct AdamWOptions {
  double lr = 1e-4;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 1e-2;
};

class AdamW {
 public:
  AdamW(std::vector<Param*> params, AdamWOptions opt);
  // One step with learning rate `lr` (the schedule's value; opt.lr if negative), in torch's
  // order and f32 roundings (torch.optim.AdamW, single-tensor path): p ← p·(1 − lr·wd);
  // m ← m + (1−β1)·(g − m) (lerp); v ← β2·v + (1−β2)·g·g; p ← p − lr/(1−β1^k) · m / (√v/√(1−β2^k) + eps),
  // k = steps taken including this one; scalars computed in double, then rounded to f32.
  void step(double lr = -1);
  void zero_grad();
  int64_t steps() const { return step_; }
  const Tensor& exp_avg(size_t i) const { return m_[i]; }
  const Tensor& exp_avg_sq(size_t i) const { return v_[i]; }
  // State for resuming (m, v per parameter and the step count).
  void set_state(int64_t steps, std::vector<Tensor> m, std::vector<Tensor> v);
  const std::vector<Param*>& params() const { return params_; }
  const AdamWOptions& options() const { return opt_; }

 private:
  std::vector<Param*> params_;
  AdamWOptions opt_;
  std::vector<Tensor> m_, v_;
  int64_t step_ = 0;
};

enum class LrSchedule { Constant, ConstantWithWarmup, Linear, Cosine };
LrSchedule parse_lr_schedule(const std::string& s);  // "constant", "constant_with_warmup", "linear", "cosine"
const char* lr_schedule_name(LrSchedule s);
// The learning rate at `step` (0-based: the step about to be taken) of `total`, with linear
// warmup over `warmup` steps from 0 (diffusers: lr·step/warmup), then constant, linear decay to 0
// or half-cosine decay to 0 over the remaining steps.
float lr_at(LrSchedule s, float base_lr, int64_t step, int64_t warmup, int64_t total);

// Scales every gradient by max_norm/(norm + 1e-6) when their global L2 norm exceeds max_norm
// (max_norm <= 0: no clipping). Returns the norm before clipping.
double clip_grad_norm(const std::vector<Param*>& params, double max_norm);

}  // namespace diffuse::train
