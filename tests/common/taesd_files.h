// Test helper: TAESD weights drawn at random (kept as the f32 values the files hold) and written
// under the published names: madebyollin's nn.Sequential indices (decoder: the clamp at 0, the
// first conv at 1; encoder from 0) and diffusers' AutoencoderTiny "decoder.layers.N" /
// "encoder.layers.N" (the decoder's indices one lower: DecoderTiny has no clamp module).
#pragma once
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace taesd_files {

using diffuse::Shape;
using diffuse::Tensor;

// ---- random weights, kept as the f32 values the files hold ----

struct Conv {
  int out = 0, in = 0, stride = 1;
  bool bias = true;
  std::vector<float> w, b;  // w: [out, in, 3, 3]
};

inline Conv make_conv(std::mt19937& g, int out, int in, int stride, bool bias, double gain) {
  Conv c{out, in, stride, bias, {}, {}};
  std::normal_distribution<double> n(0.0, gain * std::sqrt(2.0 / (in * 9)));  // He, times gain
  std::uniform_real_distribution<double> u(-0.1, 0.1);
  c.w.resize(size_t(out) * in * 9);
  for (float& v : c.w) v = float(n(g));
  if (bias) {
    c.b.resize(size_t(out));
    for (float& v : c.b) v = float(u(g));
  }
  return c;
}

struct Blk {
  Conv c[3];  // conv.0, conv.2, conv.4
};
inline Blk make_block(std::mt19937& g) {
  // The branch scaled down (gain 0.5) so that ten residual blocks do not grow the activations 30×.
  return {{make_conv(g, 64, 64, 1, true, 1.0), make_conv(g, 64, 64, 1, true, 1.0), make_conv(g, 64, 64, 1, true, 0.5)}};
}

struct Dec {
  Conv in, up[3], out;
  Blk blocks[10];  // levels 0..2: 3 each, then the last one
};
inline Dec make_decoder(uint32_t seed, int latent = 4) {
  std::mt19937 g(seed);
  Dec d;
  d.in = make_conv(g, 64, latent, 1, true, 1.0);
  for (int lv = 0; lv < 3; ++lv) {
    for (int k = 0; k < 3; ++k) d.blocks[lv * 3 + k] = make_block(g);
    d.up[lv] = make_conv(g, 64, 64, 1, false, 1.0);
  }
  d.blocks[9] = make_block(g);
  // The output conv scaled down so the image spans about [0, 1] rather than ±20 (the preview's
  // clamp would hide most pixels).
  d.out = make_conv(g, 3, 64, 1, true, 0.05);
  for (float& b : d.out.b) b += 0.4f;
  return d;
}

struct Enc {
  Conv in, down[3], out;
  Blk blocks[10];  // the first one, then levels 0..2: 3 each
};
inline Enc make_encoder(uint32_t seed) {
  std::mt19937 g(seed);
  Enc e;
  e.in = make_conv(g, 64, 3, 1, true, 1.0);
  e.blocks[0] = make_block(g);
  for (int lv = 0; lv < 3; ++lv) {
    e.down[lv] = make_conv(g, 64, 64, 2, false, 1.0);
    for (int k = 0; k < 3; ++k) e.blocks[1 + lv * 3 + k] = make_block(g);
  }
  e.out = make_conv(g, 4, 64, 1, true, 1.0);
  return e;
}

// ---- files in the published layouts ----

using Named = std::vector<std::pair<std::string, Tensor>>;

inline Tensor tensor(const Shape& s, const std::vector<float>& v) {
  Tensor t = Tensor::empty(s);
  std::copy(v.begin(), v.end(), t.f32());
  return t;
}
inline void add_conv(Named& out, const std::string& name, const Conv& c) {
  out.push_back({name + ".weight", tensor({c.out, c.in, 3, 3}, c.w)});
  if (c.bias) out.push_back({name + ".bias", tensor({c.out}, c.b)});
}
inline void add_block(Named& out, const std::string& name, const Blk& b) {
  for (int k = 0; k < 3; ++k) add_conv(out, name + ".conv." + std::to_string(2 * k), b.c[k]);
}

// madebyollin's Decoder: index 0 is the clamp, the conv after it 1; diffusers' DecoderTiny numbers
// from the conv (0) under "decoder.layers.".
inline void add_decoder(Named& out, const Dec& d, const std::string& prefix, int first) {
  int i = first;
  auto at = [&](int k) { return prefix + std::to_string(k); };
  add_conv(out, at(i), d.in);
  i += 2;  // conv, ReLU
  for (int lv = 0; lv < 3; ++lv) {
    for (int k = 0; k < 3; ++k) add_block(out, at(i++), d.blocks[lv * 3 + k]);
    ++i;  // nn.Upsample
    add_conv(out, at(i++), d.up[lv]);
  }
  add_block(out, at(i++), d.blocks[9]);
  add_conv(out, at(i), d.out);
}
inline void add_encoder(Named& out, const Enc& e, const std::string& prefix) {
  int i = 0;
  auto at = [&](int k) { return prefix + std::to_string(k); };
  add_conv(out, at(i++), e.in);
  add_block(out, at(i++), e.blocks[0]);
  for (int lv = 0; lv < 3; ++lv) {
    add_conv(out, at(i++), e.down[lv]);
    for (int k = 0; k < 3; ++k) add_block(out, at(i++), e.blocks[1 + lv * 3 + k]);
  }
  add_conv(out, at(i), e.out);
}

}  // namespace taesd_files
