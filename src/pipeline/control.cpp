#include "pipeline/control.h"

#include <cstring>
#include <memory>

#include "core/error.h"
#include "pipeline/generate.h"

namespace diffuse {

namespace {

Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

// Rows [from, from + n) of t (dim 0), copied into the arena.
Tensor rows(Ctx& c, const Tensor& t, int64_t from, int64_t n) {
  const Tensor f = as_f32(t);
  Shape s = f.shape();
  const size_t row = size_t(f.numel() / s[0]);
  s[0] = n;
  Tensor out = c.alloc(s, DType::F32);
  std::memcpy(out.f32(), f.f32() + size_t(from) * row, size_t(n) * row * sizeof(float));
  return out;
}

// [zeros like r; r] along dim 0 (the unconditional half gets no control).
Tensor zeros_then(Ctx& c, const Tensor& r) {
  const Tensor f = as_f32(r);
  Shape s = f.shape();
  s[0] *= 2;
  Tensor out = c.alloc(s, DType::F32);
  std::memset(out.f32(), 0, size_t(f.numel()) * sizeof(float));
  std::memcpy(out.f32() + f.numel(), f.f32(), f.bytes());
  return out;
}

void add_into(Ctx& c, ControlResiduals& sum, const ControlResiduals& r) {
  if (sum.empty()) {
    sum = r;
    return;
  }
  DF_CHECK(sum.down.size() == r.down.size(), "ControlNet units: ", sum.down.size(), " and ", r.down.size(),
           " residuals: the units' ControlNets do not fit the same UNet");
  auto add = [&](Tensor& a, const Tensor& b) {
    DF_CHECK(a.shape() == b.shape(), "ControlNet units: residual ", b.str(), " does not match ", a.str());
    Tensor s = c.alloc(a.shape(), DType::F32);
    c.be.binary(Binary::Add, as_f32(a), as_f32(b), s);
    a = s;
  };
  for (size_t i = 0; i < r.down.size(); ++i) add(sum.down[i], r.down[i]);
  add(sum.mid, r.mid);
}

}  // namespace

bool control_active(double start, double end, int step, int steps) {
  const double at = steps > 0 ? double(step) / double(steps) : 0.0;
  return !(at < start || at > end);
}

std::function<ControlResiduals(Ctx&, const ControlInputs&)> control_hook(std::vector<ControlUnit> units) {
  DF_CHECK(!units.empty(), "control_hook: no ControlNet units");
  struct Unit {
    ControlUnit u;
    std::function<ControlResiduals(Ctx&, const ControlInputs&)> hook;
  };
  auto list = std::make_shared<std::vector<Unit>>();
  for (size_t i = 0; i < units.size(); ++i) {
    const ControlUnit& u = units[i];
    DF_CHECK(u.net, "ControlNet unit ", i, ": no ControlNet");
    DF_CHECK(u.start >= 0 && u.start <= u.end && u.end <= 1, "ControlNet unit ", i, ": guidance start ", u.start,
             " / end ", u.end, ": need 0 <= start <= end <= 1");
    list->push_back({u, control_hook(*u.net, u.hint, u.strength, u.guess_mode)});
  }
  return [list](Ctx& c, const ControlInputs& in) {
    ControlResiduals sum;
    for (const Unit& unit : *list) {
      if (!control_active(unit.u.start, unit.u.end, in.step, in.steps)) continue;
      if (!(unit.u.guess_mode && in.guided)) {
        add_into(c, sum, unit.hook(c, in));
        continue;
      }
      // Guess mode: the ControlNet sees the conditional half only.
      const int64_t half = in.x.dim(0) / 2;
      DF_CHECK(half * 2 == in.x.dim(0), "ControlNet guess mode: ", in.x.dim(0), " rows are not two halves");
      const Tensor x = rows(c, in.x, half, half), context = rows(c, in.context, half, half);
      Tensor te, ti;
      if (in.text_embeds) te = rows(c, *in.text_embeds, half, half);
      if (in.time_ids) ti = rows(c, *in.time_ids, half, half);
      const std::vector<float> t(in.t.begin() + half, in.t.end());
      ControlResiduals r = unit.hook(c, ControlInputs{x, t, context, in.text_embeds ? &te : nullptr,
                                                      in.time_ids ? &ti : nullptr, in.step, in.steps, false});
      for (Tensor& d : r.down) d = zeros_then(c, d);
      r.mid = zeros_then(c, r.mid);
      add_into(c, sum, r);
    }
    return sum;
  };
}

std::function<ControlResiduals(Ctx&, const ControlInputs&)> control_hook(const GenerateParams& p) {
  std::vector<ControlUnit> units;
  if (p.control) {
    DF_CHECK(p.control_image, "ControlNet given without a control image");
    units.push_back({p.control, prepare_hint(to_rgb(*p.control_image), p.width, p.height), p.control_strength});
  }
  for (size_t i = 0; i < p.controls.size(); ++i) {
    const GenerateParams::ControlUnitParams& u = p.controls[i];
    DF_CHECK(u.net && u.image, "ControlNet unit ", units.size(), ": ", u.net ? "no control image" : "no ControlNet");
    units.push_back({u.net, prepare_hint(to_rgb(*u.image), p.width, p.height), u.strength, u.start, u.end,
                     u.guess_mode});
  }
  return control_hook(std::move(units));
}

}  // namespace diffuse
