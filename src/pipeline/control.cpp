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
  auto add = [&](Tensor& a, const Tensor& b) {
    DF_CHECK(a.shape() == b.shape(), "ControlNet units: residual ", b.str(), " does not match ", a.str());
    Tensor s = c.alloc(a.shape(), DType::F32);
    c.be.binary(Binary::Add, as_f32(a), as_f32(b), s);
    a = s;
  };
  if (sum.down.empty()) {
    sum.down = r.down;
    sum.mid = r.mid;
  } else if (!r.down.empty()) {
    DF_CHECK(sum.down.size() == r.down.size(), "ControlNet units: ", sum.down.size(), " and ", r.down.size(),
             " residuals: the units' ControlNets do not fit the same UNet");
    for (size_t i = 0; i < r.down.size(); ++i) add(sum.down[i], r.down[i]);
    add(sum.mid, r.mid);
  }
  if (sum.intrablock.empty()) {
    sum.intrablock = r.intrablock;
  } else if (!r.intrablock.empty()) {
    DF_CHECK(sum.intrablock.size() == r.intrablock.size(), "T2I-Adapter units: ", sum.intrablock.size(), " and ",
             r.intrablock.size(), " features: the adapters do not fit the same UNet");
    for (size_t i = 0; i < r.intrablock.size(); ++i) add(sum.intrablock[i], r.intrablock[i]);
  }
}

// A T2I-Adapter unit's hook: strength · features, computed on the first call (owned copies), each
// repeated to the batch's rows.
std::function<ControlResiduals(Ctx&, const ControlInputs&)> adapter_hook(const T2IAdapter& a, Tensor hint,
                                                                         float strength) {
  DF_CHECK(a.loaded(), "control_hook: T2I-Adapter not loaded");
  auto features = std::make_shared<std::vector<Tensor>>();
  Tensor h = hint.to(DType::F32);
  return [&a, h, strength, features](Ctx& c, const ControlInputs& in) {
    if (features->empty())
      for (const Tensor& f : a.forward(c, h)) {
        Tensor o = f.to(DType::F32);  // an owned copy
        if (strength != 1.0f) c.be.scale(o, strength, o);
        features->push_back(o);
      }
    ControlResiduals r;
    const int64_t rows = in.x.dim(0);
    for (const Tensor& f : *features) {
      DF_CHECK(rows % f.dim(0) == 0, "T2I-Adapter: hint has ", f.dim(0), " rows for a batch of ", rows);
      Shape s = f.shape();
      s[0] = rows;
      Tensor t = c.alloc(s, DType::F32);
      for (int64_t k = 0; k < rows / f.dim(0); ++k) std::memcpy(t.f32() + k * f.numel(), f.f32(), f.bytes());
      r.intrablock.push_back(t);
    }
    return r;
  };
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
    DF_CHECK(u.net || u.adapter, "ControlNet unit ", i, ": no ControlNet or T2I-Adapter");
    DF_CHECK(u.start >= 0 && u.start <= u.end && u.end <= 1, "ControlNet unit ", i, ": guidance start ", u.start,
             " / end ", u.end, ": need 0 <= start <= end <= 1");
    DF_CHECK(!u.adapter || !u.guess_mode, "ControlNet unit ", i, ": guess mode applies to ControlNets, not T2I-Adapters");
    list->push_back({u, u.adapter ? adapter_hook(*u.adapter, u.hint, u.strength)
                                  : control_hook(*u.net, u.hint, u.strength, u.guess_mode)});
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
    DF_CHECK((u.net || u.adapter) && u.image, "ControlNet unit ", units.size(), ": ",
             u.image ? "no ControlNet or T2I-Adapter" : "no control image");
    units.push_back({u.net, prepare_hint(to_rgb(*u.image), p.width, p.height), u.strength, u.start, u.end,
                     u.guess_mode, u.adapter});
  }
  return control_hook(std::move(units));
}

}  // namespace diffuse
