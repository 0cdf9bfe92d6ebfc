#include "train/optim.h"

#include <cmath>
#include <cstring>

#include "core/error.h"

namespace diffuse::train {

AdamW::AdamW(std::vector<Param*> params, AdamWOptions opt) : params_(std::move(params)), opt_(opt) {
  DF_CHECK(opt.lr >= 0 && opt.beta1 >= 0 && opt.beta1 < 1 && opt.beta2 >= 0 && opt.beta2 < 1 && opt.eps > 0 &&
               opt.weight_decay >= 0,
           "AdamW: invalid settings (lr ", opt.lr, ", betas ", opt.beta1, "/", opt.beta2, ", eps ", opt.eps,
           ", weight decay ", opt.weight_decay, ")");
  for (Param* p : params_) {
    DF_CHECK(p && p->value.dtype() == DType::F32 && p->grad.dtype() == DType::F32 &&
                 p->value.shape() == p->grad.shape(),
             "AdamW: parameter ", p ? p->name : "(null)", " needs an f32 value and gradient of one shape");
    m_.push_back(Tensor::zeros(p->value.shape()));
    v_.push_back(Tensor::zeros(p->value.shape()));
  }
}

void AdamW::step(double lr_in) {
  ++step_;
  const double bc1 = 1.0 - std::pow(opt_.beta1, double(step_)), bc2 = 1.0 - std::pow(opt_.beta2, double(step_));
  const float bc2_sqrt = float(std::sqrt(bc2));
  const float w1 = float(1.0 - opt_.beta1), b2 = float(opt_.beta2), w2 = float(1.0 - opt_.beta2), eps = float(opt_.eps);
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = *params_[i];
    const double lr = (lr_in >= 0 ? lr_in : opt_.lr) * double(p.lr_scale);
    const float decay = float(1.0 - lr * opt_.weight_decay);  // param.mul_(1 − lr·wd)
    const float neg_step = float(-(lr / bc1));
    float *w = p.value.f32(), *m = m_[i].f32(), *v = v_[i].f32();
    const float* g = p.grad.f32();
    const int64_t n = p.value.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t j = 0; j < n; ++j) {
      w[j] *= decay;
      m[j] = m[j] + w1 * (g[j] - m[j]);                   // exp_avg.lerp_(grad, 1 − β1)
      v[j] = v[j] * b2 + w2 * g[j] * g[j];                // exp_avg_sq.mul_(β2).addcmul_(g, g, value=1 − β2)
      const float denom = std::sqrt(v[j]) / bc2_sqrt + eps;  // (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
      w[j] = w[j] + neg_step * m[j] / denom;              // param.addcdiv_(exp_avg, denom, value=−step_size)
    }
  }
}

void AdamW::zero_grad() {
  for (Param* p : params_) std::memset(p->grad.data(), 0, p->grad.bytes());
}

void AdamW::set_state(int64_t steps, std::vector<Tensor> m, std::vector<Tensor> v) {
  DF_CHECK(m.size() == params_.size() && v.size() == params_.size() && steps >= 0, "AdamW: state for ", m.size(),
           " parameters, expected ", params_.size());
  for (size_t i = 0; i < params_.size(); ++i)
    DF_CHECK(m[i].shape() == params_[i]->value.shape() && v[i].shape() == params_[i]->value.shape() &&
                 m[i].dtype() == DType::F32 && v[i].dtype() == DType::F32,
             "AdamW: state of ", params_[i]->name, " is ", m[i].str(), "/", v[i].str(), ", expected f32",
             params_[i]->value.shape().str());
  step_ = steps, m_ = std::move(m), v_ = std::move(v);
}

LrSchedule parse_lr_schedule(const std::string& s) {
  if (s == "constant") return LrSchedule::Constant;
  if (s == "constant_with_warmup") return LrSchedule::ConstantWithWarmup;
  if (s == "linear") return LrSchedule::Linear;
  if (s == "cosine") return LrSchedule::Cosine;
  fail("--lr-scheduler '", s, "': expected constant, constant_with_warmup, linear or cosine");
}

const char* lr_schedule_name(LrSchedule s) {
  switch (s) {
    case LrSchedule::Constant: return "constant";
    case LrSchedule::ConstantWithWarmup: return "constant_with_warmup";
    case LrSchedule::Linear: return "linear";
    case LrSchedule::Cosine: return "cosine";
  }
  return "?";
}

float lr_at(LrSchedule s, float base_lr, int64_t step, int64_t warmup, int64_t total) {
  if (s == LrSchedule::Constant) return base_lr;
  if (step < warmup) return base_lr * float(double(step) / double(std::max<int64_t>(1, warmup)));
  if (s == LrSchedule::ConstantWithWarmup) return base_lr;
  const double progress = double(step - warmup) / double(std::max<int64_t>(1, total - warmup));
  if (s == LrSchedule::Linear) return base_lr * float(std::max(0.0, 1.0 - progress));
  return base_lr * float(std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress))));  // cosine, 0.5 cycles
}

double clip_grad_norm(const std::vector<Param*>& params, double max_norm) {
  double sq = 0;
  for (const Param* p : params) {
    const float* g = p->grad.f32();
    for (int64_t i = 0, n = p->grad.numel(); i < n; ++i) sq += double(g[i]) * double(g[i]);
  }
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const float coef = float(max_norm / (norm + 1e-6));
    for (Param* p : params) {
      float* g = p->grad.f32();
      for (int64_t i = 0, n = p->grad.numel(); i < n; ++i) g[i] *= coef;
    }
  }
  return norm;
}

}  // namespace diffuse::train
