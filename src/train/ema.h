// An exponential moving average of trained parameters (diffusers' EMAModel, as
// train_text_to_image.py --use_ema uses it): after optimiser step k,
//   ema ← ema − (1 − d_k)·(ema − w)   (= d_k·ema + (1 − d_k)·w), in f32,
// starting from the weights before the first step. The decay d_k:
//  - warmup (diffusers' default, use_ema_warmup=False): s = k − 1; d_k = 0 for s = 0 (the EMA takes
//    the first step's weights), else min(decay, (1 + s)/(10 + s)), so early steps are not held
//    back by the initial weights (d = 0.18 at k = 2, 0.5 at k = 9, 0.9 at k = 81);
//  - constant: d_k = decay from the first step.
#pragma once
#include <cstdint>
#include <vector>

#include "train/optim.h"

namespace diffuse::train {

// The decay at optimiser step k (1-based). decay in [0, 1).
double ema_decay(double decay, int64_t k, bool warmup);

class Ema {
 public:
  // Shadow copies of the parameters' current values.
  Ema(const std::vector<Param*>& params, double decay, bool warmup);
  // After optimiser step k (1-based).
  void update(int64_t k);
  double decay() const { return decay_; }
  bool warmup() const { return warmup_; }
  const std::vector<Param*>& params() const { return params_; }
  Tensor& shadow(size_t i) { return shadow_[i]; }
  const Tensor& shadow(size_t i) const { return shadow_[i]; }
  // Exchanges every parameter's values with its shadow (to evaluate or save the EMA weights
  // without a second copy); calling it again restores them.
  void swap_with_params();

 private:
  std::vector<Param*> params_;
  std::vector<Tensor> shadow_;
  double decay_;
  bool warmup_;
};

}  // namespace diffuse::train
