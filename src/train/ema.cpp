#include "train/ema.h"

#include <algorithm>

#include "core/error.h"

namespace diffuse::train {

double ema_decay(double decay, int64_t k, bool warmup) {
  if (!warmup) return decay;
  const int64_t s = k - 1;
  if (s <= 0) return 0.0;
  return std::min(decay, double(1 + s) / double(10 + s));
}

Ema::Ema(const std::vector<Param*>& params, double decay, bool warmup)
    : params_(params), decay_(decay), warmup_(warmup) {
  DF_CHECK(decay >= 0 && decay < 1, "--ema ", decay, ": the decay must be in [0, 1)");
  for (const Param* p : params_) shadow_.push_back(p->value.clone());
}

void Ema::update(int64_t k) {
  const float one_minus = float(1.0 - ema_decay(decay_, k, warmup_));
  for (size_t i = 0; i < params_.size(); ++i) {
    if (one_minus == 1.0f) {  // decay 0: the weights themselves (exactly)
      shadow_[i].copy_from(params_[i]->value);
      continue;
    }
    float* e = shadow_[i].f32();
    const float* w = params_[i]->value.f32();
    const int64_t n = shadow_[i].numel();
    for (int64_t j = 0; j < n; ++j) e[j] -= one_minus * (e[j] - w[j]);
  }
}

void Ema::swap_with_params() {
  for (size_t i = 0; i < params_.size(); ++i) {
    float* e = shadow_[i].f32();
    float* w = params_[i]->value.f32();
    std::swap_ranges(e, e + shadow_[i].numel(), w);
  }
}

}  // namespace diffuse::train
