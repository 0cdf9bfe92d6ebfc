// LoRA / LyCORIS factor sets: key roles, shape checks, and the weight difference of each kind.
#include "models/lycoris.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace diffuse {

namespace {

bool ends_with(const std::string& s, const std::string& x) {
  return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
}

// Spatial size of a base weight: kh, kw (1, 1 for [O, I]).
int64_t kh_of(const Shape& b) { return b.rank() == 4 ? b[2] : 1; }
int64_t kw_of(const Shape& b) { return b.rank() == 4 ? b[3] : 1; }

// A 4-D tensor whose trailing dims are 1 × 1, or a 2-D one.
bool is_2d_or_1x1(const Tensor& t) { return t.rank() == 2 || (t.rank() == 4 && t.dim(2) == 1 && t.dim(3) == 1); }

// t as f32 [rows, numel / rows] (a copy: the file's tensors stay as stored).
Tensor f32_rows(const Tensor& t, int64_t rows) { return t.to(DType::F32).reshape({rows, t.numel() / rows}); }

Tensor transposed(const Tensor& m) {  // f32 [R, C] -> [C, R]
  const int64_t R = m.dim(0), C = m.dim(1);
  Tensor o = Tensor::empty({C, R});
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) o.f32()[c * R + r] = m.f32()[r * C + c];
  return o;
}

// c [M, N] = a [M, K] · b [K, N], all f32 and contiguous.
void mm(Backend& g, const Tensor& a, const Tensor& b, float* c) {
  const int64_t M = a.dim(0), K = a.dim(1), N = b.dim(1);
  DF_ASSERT(b.dim(0) == K);
  Tensor ta = Tensor::borrow(const_cast<float*>(a.f32()), {1, M, K}, DType::F32);
  Tensor tb = Tensor::borrow(const_cast<float*>(b.f32()), {1, K, N}, DType::F32);
  Tensor tc = Tensor::borrow(c, {1, M, N}, DType::F32);
  g.matmul(ta, tb, tc, false, 1.0f);
}
Tensor mm(Backend& g, const Tensor& a, const Tensor& b) {
  Tensor c = Tensor::empty({a.dim(0), b.dim(1)});
  mm(g, a, b, c.f32());
  return c;
}

// A Tucker-decomposed factor: core t [r1, r2, kh, kw], up [P, r1] (f32), down [r2, Q] (f32)
// -> [P, Q·kh·kw], element [p, q·kk + k] = Σ_ij t[i, j, k] · up[p, i] · down[j, q]
// (LyCORIS's rebuild_tucker, einsum "i j ..., i p, j r -> p r ..." with up transposed).
void tucker(Backend& g, const Tensor& t_in, const Tensor& up, const Tensor& down, float* out) {
  const Tensor t = t_in.to(DType::F32);
  const int64_t r1 = t.dim(0), r2 = t.dim(1), kk = t.dim(2) * t.dim(3), Q = down.dim(1);
  DF_ASSERT(up.dim(1) == r1 && down.dim(0) == r2);
  Tensor tmp = Tensor::zeros({r1, Q * kk});  // tmp[i, q·kk + k] = Σ_j t[i, j, k] · down[j, q]
  for (int64_t i = 0; i < r1; ++i)
    for (int64_t j = 0; j < r2; ++j)
      for (int64_t q = 0; q < Q; ++q) {
        const float d = down.f32()[j * Q + q];
        const float* tk = t.f32() + (i * r2 + j) * kk;
        float* o = tmp.f32() + i * Q * kk + q * kk;
        for (int64_t k = 0; k < kk; ++k) o[k] += tk[k] * d;
      }
  mm(g, up, tmp, out);
}

// LoKr's factors as matrices: w1 [a, c]; w2 [b, m] with m = d·kh·kw (LyCORIS's layout: the
// spatial taps of w2 follow each input index).
Tensor lokr_w1(Backend& g, const LoraEntry& e) {
  return e.w1.defined() ? f32_rows(e.w1, e.w1.dim(0)) : mm(g, f32_rows(e.w1a, e.w1a.dim(0)), f32_rows(e.w1b, e.w1b.dim(0)));
}
Tensor lokr_w2(Backend& g, const LoraEntry& e) {
  if (e.w2.defined()) return f32_rows(e.w2, e.w2.dim(0));
  if (e.t2.defined()) {
    const int64_t b = e.w2a.dim(1), kk = e.t2.dim(2) * e.t2.dim(3);
    Tensor o = Tensor::empty({b, e.w2b.dim(1) * kk});
    tucker(g, e.t2, transposed(f32_rows(e.w2a, e.w2a.dim(0))), f32_rows(e.w2b, e.w2b.dim(0)), o.f32());
    return o;
  }
  return mm(g, f32_rows(e.w2a, e.w2a.dim(0)), f32_rows(e.w2b, e.w2b.dim(0)));
}

// ΔW (unscaled) of e for a base of shape b, into out [O, K].
void delta(Backend& g, const LoraEntry& e, const Shape& b, float* out) {
  const int64_t O = b[0], K = b.numel() / O;
  switch (e.kind) {
    case LoraKind::LoRA:
      if (e.mid.defined()) {
        tucker(g, e.mid, f32_rows(e.up, O), f32_rows(e.down, e.down.dim(0)), out);
      } else {
        mm(g, f32_rows(e.up, O), f32_rows(e.down, e.down.dim(0)), out);
      }
      return;
    case LoraKind::LoHa: {
      Tensor p1 = Tensor::empty({O, K});
      if (e.t1.defined()) {
        tucker(g, e.t1, transposed(f32_rows(e.w1a, e.w1a.dim(0))), f32_rows(e.w1b, e.w1b.dim(0)), p1.f32());
        tucker(g, e.t2, transposed(f32_rows(e.w2a, e.w2a.dim(0))), f32_rows(e.w2b, e.w2b.dim(0)), out);
      } else {
        mm(g, f32_rows(e.w1a, O), f32_rows(e.w1b, e.w1b.dim(0)), p1.f32());
        mm(g, f32_rows(e.w2a, O), f32_rows(e.w2b, e.w2b.dim(0)), out);
      }
      const float* p = p1.f32();
#pragma omp parallel for schedule(static) if (O * K > (1 << 15))
      for (int64_t i = 0; i < O * K; ++i) out[i] *= p[i];
      return;
    }
    case LoraKind::LoKr: {
      const Tensor w1 = lokr_w1(g, e), w2 = lokr_w2(g, e);
      const int64_t a = w1.dim(0), c = w1.dim(1), bb = w2.dim(0), m = w2.dim(1);
      DF_ASSERT(a * bb == O && c * m == K);
      // kron: out[i·b + p, j·m + q] = w1[i, j] · w2[p, q]
#pragma omp parallel for schedule(static) if (O * K > (1 << 15))
      for (int64_t i = 0; i < a; ++i)
        for (int64_t p = 0; p < bb; ++p) {
          float* row = out + (i * bb + p) * K;
          const float* w2r = w2.f32() + p * m;
          for (int64_t j = 0; j < c; ++j) {
            const float s = w1.f32()[i * c + j];
            for (int64_t q = 0; q < m; ++q) row[j * m + q] = s * w2r[q];
          }
        }
      return;
    }
    case LoraKind::Full: {
      const Tensor d = e.diff.to(DType::F32);
      std::memcpy(out, d.f32(), size_t(O * K) * sizeof(float));
      return;
    }
  }
}

// DoRA's axis for a base b: 1 per output channel, 2 per input channel, 0 if the magnitude does
// not fit. LyCORIS stores dora_scale [1, I(, 1, 1)] (per input); [O, 1(, 1, 1)] and a vector [O]
// (diffusers' conversion of PEFT's magnitude) are per output; PEFT's lora_magnitude_vector holds
// O values ([O], or [1, O, 1, 1] on convolutions).
int dora_axis(const Shape& b, const LoraEntry& e) {
  const Shape& s = e.dora.shape();
  const int64_t O = b[0], I = b[1];
  auto ones_from = [&](int i) {
    for (int k = i; k < s.rank(); ++k)
      if (s[k] != 1) return false;
    return true;
  };
  if (e.dora_peft) {
    int big = 0;
    for (int k = 0; k < s.rank(); ++k) big += s[k] != 1;
    return s.numel() == O && big <= 1 ? 1 : 0;
  }
  if (s.rank() >= 2 && s[0] == 1 && s[1] == I && ones_from(2)) return 2;
  if (s.rank() >= 2 && s[0] == O && ones_from(1)) return 1;
  if (s.rank() == 1 && s[0] == O) return 1;
  return 0;
}

bool factors_fit(const Shape& b, const LoraEntry& e) {
  const int64_t O = b[0], I = b[1], kh = kh_of(b), kw = kw_of(b), kk = kh * kw;
  switch (e.kind) {
    case LoraKind::LoRA: {
      if (e.mid.defined()) return e.up.dim(0) == O && e.down.dim(1) == I && e.mid.dim(2) == kh && e.mid.dim(3) == kw;
      const Shape& d = e.down.shape();
      if (e.up.dim(0) != O || d[1] != I) return false;
      if (d.rank() == 2) return kk == 1;
      return d[2] == kh && d[3] == kw;
    }
    case LoraKind::LoHa:
      if (e.t1.defined()) return e.w1a.dim(1) == O && e.w1b.dim(1) == I && e.t1.dim(2) == kh && e.t1.dim(3) == kw;
      if (e.w1a.dim(0) != O) return false;
      if (e.w1b.rank() == 2) return e.w1b.dim(1) == I * kk;
      return e.w1b.dim(1) == I && e.w1b.dim(2) == kh && e.w1b.dim(3) == kw;
    case LoraKind::LoKr: {
      const int64_t a = e.w1.defined() ? e.w1.dim(0) : e.w1a.dim(0);
      const int64_t c = e.w1.defined() ? e.w1.dim(1) : e.w1b.dim(1);
      if (e.t2.defined())  // w2 [w2a cols, w2b cols, kh, kw]
        return a * e.w2a.dim(1) == O && c * e.w2b.dim(1) == I && e.t2.dim(2) == kh && e.t2.dim(3) == kw;
      if (e.w2.defined() && e.w2.rank() == 4)
        return a * e.w2.dim(0) == O && c * e.w2.dim(1) == I && e.w2.dim(2) == kh && e.w2.dim(3) == kw;
      const int64_t bb = e.w2.defined() ? e.w2.dim(0) : e.w2a.dim(0), m = e.w2.defined() ? e.w2.dim(1) : e.w2b.dim(1);
      return a * bb == O && m % kk == 0 && c * (m / kk) == I;
    }
    case LoraKind::Full: {
      const Shape& d = e.diff.shape();
      if (d == b) return true;
      return d[0] == O && d[1] == I && kk == 1 && d.numel() == b.numel();  // [O, I] vs [O, I, 1, 1]
    }
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Assembling a module's tensors

std::string shapes_of(const ModuleTensors& t, std::initializer_list<const char*> roles) {
  std::string s;
  for (const char* r : roles) {
    auto it = t.find(r);
    if (it == t.end()) continue;
    s += (s.empty() ? "" : ", ") + it->second.key.substr(it->second.key.rfind('.') + 1) + " " + it->second.t.shape().str();
  }
  return s;
}

}  // namespace

bool parse_lora_key(const std::string& key, std::string* stem, std::string* role) {
  static const std::pair<const char*, const char*> kSuffixes[] = {
      {".lora_down.weight", "down"},       {".lora_up.weight", "up"},   {".lora_mid.weight", "mid"},  // kohya
      {".lora_A.weight", "down"},          {".lora_B.weight", "up"},                                  // PEFT
      {".lora_A.default.weight", "down"},  {".lora_B.default.weight", "up"},                          // PEFT, adapter named
      {".lora_linear_layer.down.weight", "down"}, {".lora_linear_layer.up.weight", "up"},             // diffusers < 0.21
      {".lora.down.weight", "down"},       {".lora.up.weight", "up"},
      {".lora_magnitude_vector", "magnitude"},        {".lora_magnitude_vector.weight", "magnitude"},  // PEFT DoRA
      {".lora_magnitude_vector.default", "magnitude"}, {".lora_magnitude_vector.default.weight", "magnitude"},
      {".alpha", "alpha"},                 {".dora_scale", "dora_scale"},
      {".hada_w1_a", "hada_w1_a"}, {".hada_w1_b", "hada_w1_b"}, {".hada_w2_a", "hada_w2_a"}, {".hada_w2_b", "hada_w2_b"},
      {".hada_t1", "hada_t1"},     {".hada_t2", "hada_t2"},
      {".lokr_w1", "lokr_w1"},     {".lokr_w1_a", "lokr_w1_a"}, {".lokr_w1_b", "lokr_w1_b"},
      {".lokr_w2", "lokr_w2"},     {".lokr_w2_a", "lokr_w2_a"}, {".lokr_w2_b", "lokr_w2_b"}, {".lokr_t2", "lokr_t2"},
      {".diff", "diff"},           {".diff_b", "diff_b"},
  };
  for (const auto& [suf, r] : kSuffixes) {
    const size_t n = std::strlen(suf);
    if (ends_with(key, suf) && key.size() > n) {
      *stem = key.substr(0, key.size() - n);
      *role = r;
      return true;
    }
  }
  // diffusers attention processors: "<attn>.processor.to_q_lora.down.weight" -> "<attn>.to_q".
  const std::string proc = ".processor.";
  size_t at = key.rfind(proc);
  if (at != std::string::npos) {
    std::string rest = key.substr(at + proc.size());
    for (const char* proj : {"to_q", "to_k", "to_v", "to_out"}) {
      for (auto [suf, r] : {std::pair<const char*, const char*>{"_lora.down.weight", "down"}, {"_lora.up.weight", "up"}}) {
        if (rest == std::string(proj) + suf) {
          std::string mod = std::string(proj) == "to_out" ? "to_out.0" : proj;
          *stem = key.substr(0, at) + "." + mod;
          *role = r;
          return true;
        }
      }
    }
  }
  return false;
}

bool assemble_entry(const std::string& path, const std::string& stem, const ModuleTensors& t, LoraEntry* e,
                    std::vector<std::string>* unknown) {
  auto has = [&](const char* r) { return t.count(r) != 0; };
  auto get = [&](const char* r) -> const Tensor& { return t.at(r).t; };
  auto report_all = [&](const std::string& why) {
    for (const auto& [r, rt] : t) unknown->push_back(rt.key + " (" + why + ")");
    return false;
  };
  auto any_of = [&](std::initializer_list<const char*> rs) {
    for (const char* r : rs)
      if (has(r)) return true;
    return false;
  };
  const bool lora = any_of({"down", "up", "mid"});
  const bool loha = any_of({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"});
  const bool lokr = any_of({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"});
  const bool full = has("diff");
  if (!lora && !loha && !lokr && !full)
    return report_all(has("alpha") ? "an alpha without up/down tensors" : "without the module's LoRA/LyCORIS factors");
  if (int(lora) + int(loha) + int(lokr) + int(full) > 1) {
    std::string keys;
    for (const auto& [r, rt] : t) keys += (keys.empty() ? "" : ", ") + rt.key;
    fail(path, ": ", stem, ": mixes the tensors of different kinds (", keys, "); expected one of LoRA ",
         "(lora_down/lora_up), LoHa (hada_*), LoKr (lokr_*) or a full difference (diff)");
  }

  if (lora) {
    if (!has("down") || !has("up")) return report_all("no matching up/down tensor");
    const Tensor &d = get("down"), &u = get("up");
    if (has("mid")) {
      const Tensor& m = get("mid");
      const bool ok = is_2d_or_1x1(d) && is_2d_or_1x1(u) && m.rank() == 4 && m.dim(0) == u.dim(1) && m.dim(1) == d.dim(0) &&
                      d.dim(0) > 0 && m.dim(0) > 0;
      DF_CHECK(ok, path, ": ", stem, ": down ", d.shape().str(), ", mid ", m.shape().str(), " and up ", u.shape().str(),
               " do not form a LoCon Tucker set (expected down [r, in, 1, 1], lora_mid [r, r, kh, kw], up [out, r, 1, 1])");
      e->mid = m;
    } else {
      const bool d_ok = (d.rank() == 2 || d.rank() == 4) && d.dim(0) > 0;
      const bool u_ok = (u.rank() == 2 || (u.rank() == 4 && u.dim(2) == 1 && u.dim(3) == 1)) && d_ok && u.dim(1) == d.dim(0);
      DF_CHECK(d_ok && u_ok, path, ": ", stem, ": down ", d.shape().str(), " and up ", u.shape().str(),
               " do not form a LoRA pair (expected down [r, in] or [r, in, kh, kw] and up [out, r] or [out, r, 1, 1])");
    }
    e->kind = LoraKind::LoRA;
    e->down = d;
    e->up = u;
  } else if (loha) {
    for (const char* r : {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
      if (!has(r)) return report_all(std::string("incomplete LoHa: no ") + r);
    const Tensor &a1 = get("hada_w1_a"), &b1 = get("hada_w1_b"), &a2 = get("hada_w2_a"), &b2 = get("hada_w2_b");
    const std::string shapes = shapes_of(t, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"});
    DF_CHECK(has("hada_t1") == has("hada_t2"), path, ": ", stem, ": LoHa Tucker needs both hada_t1 and hada_t2 (", shapes, ")");
    const bool mats = a1.rank() == 2 && a2.rank() == 2 && (b1.rank() == 2 || b1.rank() == 4) && b1.rank() == b2.rank();
    if (has("hada_t1")) {
      const Tensor &t1 = get("hada_t1"), &t2 = get("hada_t2");
      const bool ok = mats && b1.rank() == 2 && t1.rank() == 4 && t2.rank() == 4 && t1.dim(0) == a1.dim(0) &&
                      t1.dim(1) == b1.dim(0) && t2.dim(0) == a2.dim(0) && t2.dim(1) == b2.dim(0) && a1.dim(1) == a2.dim(1) &&
                      b1.dim(1) == b2.dim(1) && t1.dim(2) == t2.dim(2) && t1.dim(3) == t2.dim(3) && b1.dim(0) > 0;
      DF_CHECK(ok, path, ": ", stem, ": LoHa Tucker factors ", shapes, " are inconsistent (expected hada_t1/t2 ",
               "[r, r, kh, kw], hada_w1_a/w2_a [r, out], hada_w1_b/w2_b [r, in])");
      e->t1 = t1;
      e->t2 = t2;
    } else {
      bool ok = mats && a1.dim(1) == b1.dim(0) && a2.dim(1) == b2.dim(0) && a1.dim(0) == a2.dim(0) && b1.dim(0) > 0;
      for (int k = 1; ok && k < b1.rank(); ++k) ok = b1.dim(k) == b2.dim(k);
      DF_CHECK(ok, path, ": ", stem, ": LoHa factors ", shapes, " are inconsistent (expected hada_w1_a/w2_a [out, r], ",
               "hada_w1_b/w2_b [r, in·kh·kw] or [r, in, kh, kw])");
    }
    e->kind = LoraKind::LoHa;
    e->w1a = a1, e->w1b = b1, e->w2a = a2, e->w2b = b2;
  } else if (lokr) {
    const std::string shapes =
        shapes_of(t, {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"});
    DF_CHECK(!(has("lokr_w1") && (has("lokr_w1_a") || has("lokr_w1_b"))) &&
                 !(has("lokr_w2") && (has("lokr_w2_a") || has("lokr_w2_b") || has("lokr_t2"))),
             path, ": ", stem, ": LoKr has both a full and a decomposed factor (", shapes, ")");
    const bool w1 = has("lokr_w1") || (has("lokr_w1_a") && has("lokr_w1_b"));
    const bool w2 = has("lokr_w2") || (has("lokr_w2_a") && has("lokr_w2_b"));
    if (!w1 || !w2) return report_all(std::string("incomplete LoKr: no ") + (w1 ? "lokr_w2" : "lokr_w1") + " or its _a/_b pair");
    if (has("lokr_w1")) {
      DF_CHECK(get("lokr_w1").rank() == 2, path, ": ", stem, ": lokr_w1 ", get("lokr_w1").shape().str(),
               " is not a matrix [a, c]");
      e->w1 = get("lokr_w1");
    } else {
      const Tensor &a = get("lokr_w1_a"), &b = get("lokr_w1_b");
      DF_CHECK(a.rank() == 2 && b.rank() == 2 && a.dim(1) == b.dim(0) && b.dim(0) > 0, path, ": ", stem, ": LoKr factors ",
               shapes, " are inconsistent (expected lokr_w1_a [a, r], lokr_w1_b [r, c])");
      e->w1a = a, e->w1b = b;
    }
    if (has("lokr_w2")) {
      const Tensor& w = get("lokr_w2");
      DF_CHECK(w.rank() == 2 || w.rank() == 4, path, ": ", stem, ": lokr_w2 ", w.shape().str(),
               " is not [b, d] or [b, d, kh, kw]");
      e->w2 = w;
    } else {
      const Tensor &a = get("lokr_w2_a"), &b = get("lokr_w2_b");
      bool ok = a.rank() == 2 && b.rank() == 2 && b.dim(0) > 0;
      if (has("lokr_t2")) {
        const Tensor& t2 = get("lokr_t2");
        ok = ok && t2.rank() == 4 && t2.dim(0) == a.dim(0) && t2.dim(1) == b.dim(0);
        DF_CHECK(ok, path, ": ", stem, ": LoKr Tucker factors ", shapes, " are inconsistent (expected lokr_t2 ",
                 "[r, r, kh, kw], lokr_w2_a [r, b], lokr_w2_b [r, d])");
        e->t2 = t2;
      } else {
        DF_CHECK(ok && a.dim(1) == b.dim(0), path, ": ", stem, ": LoKr factors ", shapes,
                 " are inconsistent (expected lokr_w2_a [b, r], lokr_w2_b [r, d·kh·kw])");
      }
      e->w2a = a, e->w2b = b;
    }
    DF_CHECK(!e->w1b.defined() || !e->w2b.defined() || e->w1b.dim(0) == e->w2b.dim(0), path, ": ", stem,
             ": LoKr factors ", shapes, " decompose w1 and w2 with different ranks");
    e->kind = LoraKind::LoKr;
  } else {
    const Tensor& d = get("diff");
    DF_CHECK(d.rank() == 2 || d.rank() == 4, path, ": ", stem, ": diff ", d.shape().str(),
             " is not a weight [out, in] or [out, in, kh, kw]");
    e->kind = LoraKind::Full;
    e->diff = d;
  }

  if (has("alpha")) {
    const RoleTensor& a = t.at("alpha");
    DF_CHECK(a.t.numel() == 1, path, ": ", a.key, " has shape ", a.t.shape().str(), ", expected one value");
    e->has_alpha = true;
    e->alpha = a.t.to(DType::F32).f32()[0];
    DF_CHECK(std::isfinite(e->alpha), path, ": ", a.key, " is not finite");
  }
  DF_CHECK(!(has("dora_scale") && has("magnitude")), path, ": ", stem,
           ": has both dora_scale and lora_magnitude_vector (one DoRA magnitude expected)");
  for (const char* r : {"dora_scale", "magnitude"}) {
    if (!has(r)) continue;
    const RoleTensor& m = t.at(r);
    DF_CHECK(m.t.numel() > 0, path, ": ", m.key, " is empty");
    e->dora = m.t;
    e->dora_peft = std::strcmp(r, "magnitude") == 0;
  }
  if (has("diff_b")) unknown->push_back(t.at("diff_b").key + " (bias differences are not applied)");
  return true;
}

// ---------------------------------------------------------------------------------------------
// LoraEntry, fitting, messages

const char* lora_kind_name(LoraKind k) {
  switch (k) {
    case LoraKind::LoRA: return "LoRA";
    case LoraKind::LoHa: return "LoHa";
    case LoraKind::LoKr: return "LoKr";
    case LoraKind::Full: return "full";
  }
  return "?";
}

int64_t LoraEntry::rank() const {
  switch (kind) {
    case LoraKind::LoRA: return down.dim(0);
    case LoraKind::LoHa: return w1b.dim(0);
    case LoraKind::LoKr: return w1b.defined() ? w1b.dim(0) : w2b.defined() ? w2b.dim(0) : 0;
    case LoraKind::Full: return 0;
  }
  return 0;
}

float LoraEntry::scale() const {
  const int64_t r = rank();
  if (!has_alpha || r <= 0) return 1.0f;
  return rs_lora ? float(double(alpha) / std::sqrt(double(r))) : alpha / float(r);
}

bool lora_fits(const Shape& b, const LoraEntry& e) {
  if (b.rank() != 2 && b.rank() != 4) return false;
  return factors_fit(b, e) && (!e.dora.defined() || dora_axis(b, e) != 0);
}

std::string lora_factor_shapes(const LoraEntry& e) {
  std::string s;
  auto add = [&](const char* name, const Tensor& t) {
    if (t.defined()) s += cat(s.empty() ? "" : ", ", name, " ", t.shape().str());
  };
  switch (e.kind) {
    case LoraKind::LoRA:
      s = e.mid.defined() ? cat("down ", e.down.shape().str(), ", mid ", e.mid.shape().str(), " and up ", e.up.shape().str())
                          : cat("down ", e.down.shape().str(), " and up ", e.up.shape().str());
      break;
    case LoraKind::LoHa:
      add("hada_w1_a", e.w1a), add("hada_w1_b", e.w1b), add("hada_w2_a", e.w2a), add("hada_w2_b", e.w2b);
      add("hada_t1", e.t1), add("hada_t2", e.t2);
      break;
    case LoraKind::LoKr:
      add("lokr_w1", e.w1), add("lokr_w1_a", e.w1a), add("lokr_w1_b", e.w1b);
      add("lokr_w2", e.w2), add("lokr_w2_a", e.w2a), add("lokr_w2_b", e.w2b), add("lokr_t2", e.t2);
      break;
    case LoraKind::Full: add("diff", e.diff); break;
  }
  if (e.dora.defined()) s += cat(", ", e.dora_peft ? "lora_magnitude_vector " : "dora_scale ", e.dora.shape().str());
  return s;
}

void lycoris_term(Backend& gemm, const LoraEntry& e, const Shape& base, const float* w0, float mult, float* out) {
  const int64_t O = base[0], K = base.numel() / O, I = base[1], kk = K / I;
  delta(gemm, e, base, out);
  const float s = e.scale();
  const int64_t n = O * K;
  if (!e.dora.defined()) {
    const float f = mult * s;
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) out[i] *= f;
    return;
  }
  DF_ASSERT(w0 != nullptr);
  // V = w0 + s·ΔW; its norm per output row or per input channel (over rows and taps).
  for (int64_t i = 0; i < n; ++i) out[i] = w0[i] + s * out[i];
  const int axis = dora_axis(base, e);
  DF_ASSERT(axis != 0);
  const int64_t channels = axis == 1 ? O : I;
  std::vector<double> sq(static_cast<size_t>(channels), 0.0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = 0; c < K; ++c) {
      const double v = out[o * K + c];
      sq[size_t(axis == 1 ? o : c / kk)] += v * v;
    }
  const Tensor m = e.dora.to(DType::F32);
  const double eps = e.dora_peft ? 0.0 : double(FLT_EPSILON);  // LyCORIS adds torch.finfo(float32).eps
  std::vector<float> f(static_cast<size_t>(channels));
  for (int64_t c = 0; c < channels; ++c) f[size_t(c)] = float(double(m.f32()[c]) / (std::sqrt(sq[size_t(c)]) + eps));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = 0; c < K; ++c) {
      const int64_t i = o * K + c;
      out[i] = mult * (out[i] * f[size_t(axis == 1 ? o : c / kk)] - w0[i]);
    }
}

}  // namespace diffuse
