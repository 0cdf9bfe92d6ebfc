// RRDBNet (ESRGAN / Real-ESRGAN), NHWC. See rrdbnet.h for the architecture and the layouts.
#include "models/rrdbnet.h"

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/tensor_file.h"
#include "models/family.h"

namespace diffuse {

const char* rrdb_layout_name(RRDBLayout l) {
  switch (l) {
    case RRDBLayout::RealESRGAN: return "Real-ESRGAN";
    case RRDBLayout::ESRGAN: return "ESRGAN";
    case RRDBLayout::OldESRGAN: return "old ESRGAN";
  }
  return "?";
}

namespace {

constexpr int kMaxUpsample = 3;  // x8 at most

// The module names of one layout (without ".weight"/".bias"), under the file's prefix.
struct Names {
  RRDBLayout layout = RRDBLayout::RealESRGAN;
  std::string pre;        // "", "params_ema." or "params."
  int num_block = 0, num_upsample = 0;

  std::string first() const { return pre + (layout == RRDBLayout::OldESRGAN ? "model.0" : "conv_first"); }
  // Block i (from 0), dense block k (1-3), conv m (1-5).
  std::string rdb(int i, int k, int m) const {
    switch (layout) {
      case RRDBLayout::RealESRGAN: return cat(pre, "body.", i, ".rdb", k, ".conv", m);
      case RRDBLayout::ESRGAN: return cat(pre, "RRDB_trunk.", i, ".RDB", k, ".conv", m);
      case RRDBLayout::OldESRGAN: return cat(pre, "model.1.sub.", i, ".RDB", k, ".conv", m, ".0");
    }
    return {};
  }
  std::string body() const {
    switch (layout) {
      case RRDBLayout::RealESRGAN: return pre + "conv_body";
      case RRDBLayout::ESRGAN: return pre + "trunk_conv";
      case RRDBLayout::OldESRGAN: return cat(pre, "model.1.sub.", num_block);
    }
    return {};
  }
  // Upsample stage k (from 1).
  std::string up(int k) const {
    switch (layout) {
      case RRDBLayout::RealESRGAN: return cat(pre, "conv_up", k);
      case RRDBLayout::ESRGAN: return cat(pre, "upconv", k);
      case RRDBLayout::OldESRGAN: return cat(pre, "model.", 3 * k);
    }
    return {};
  }
  std::string hr() const {
    switch (layout) {
      case RRDBLayout::RealESRGAN: return pre + "conv_hr";
      case RRDBLayout::ESRGAN: return pre + "HRconv";
      case RRDBLayout::OldESRGAN: return cat(pre, "model.", 3 * num_upsample + 2);
    }
    return {};
  }
  std::string last() const {
    return layout == RRDBLayout::OldESRGAN ? cat(pre, "model.", 3 * num_upsample + 4) : pre + "conv_last";
  }
};

// The layout of `w`'s tensors under prefix `pre`, if they look like one.
bool detect_layout(const WeightStore& w, const std::string& pre, RRDBLayout* out) {
  auto has = [&](const std::string& n) { return w.has(pre + n); };
  if (has("conv_first.weight") && (has("body.0.rdb1.conv1.weight") || has("conv_body.weight"))) {
    *out = RRDBLayout::RealESRGAN;
    return true;
  }
  if (has("conv_first.weight") && (has("RRDB_trunk.0.RDB1.conv1.weight") || has("trunk_conv.weight"))) {
    *out = RRDBLayout::ESRGAN;
    return true;
  }
  if (has("model.0.weight") && has("model.1.sub.0.RDB1.conv1.0.weight")) {
    *out = RRDBLayout::OldESRGAN;
    return true;
  }
  return false;
}

// What the file looks like instead, for the wrong-architecture message.
std::string what_it_is(const WeightStore& w) {
  std::vector<std::string> names = w.names();
  if (names.empty()) return "the file holds no tensors";
  for (const std::string& n : names)
    if (n.find("lora_") != std::string::npos || n.find(".lora.") != std::string::npos ||
        n.find("hada_w1") != std::string::npos || n.find("lokr_w1") != std::string::npos)
      return cat("it looks like a LoRA / LyCORIS file (", n, ")");
  TensorFile tf;
  for (const std::string& n : names) tf.tensors.push_back({n, *w.find(n)});
  tf.build_index();
  const ModelSummary s = summarize_model(tf);
  if (s.family != Family::Unknown) return cat("it looks like a Stable Diffusion ", family_name(s.family), " model");
  for (const ComponentSummary& c : s.components)
    if (c.component != Component::Other && c.tensors * 2 > int64_t(names.size()))
      return cat("it looks like a Stable Diffusion ", component_name(c.component));
  std::string first;
  for (size_t i = 0; i < names.size() && i < 3; ++i) first += cat(i ? ", " : "", names[i]);
  return cat("its ", names.size(), " tensor", names.size() == 1 ? "" : "s", " start with ", first);
}

// [O, I, 3, 3] of `name` (+ ".weight"), or an error naming the file.
Shape conv_shape(const WeightStore& w, const std::string& module) {
  const Tensor* t = w.find(module + ".weight");
  DF_CHECK(t, w.origin(), ": RRDBNet (", w.component(), "): ", module, ".weight is missing");
  DF_CHECK(t->rank() == 4 && t->dim(2) == 3 && t->dim(3) == 3 && t->dim(0) > 0 && t->dim(1) > 0, w.origin(),
           ": RRDBNet: ", module, ".weight is ", t->str(), ", expected a 3×3 convolution [out, in, 3, 3]");
  return t->shape();
}

}  // namespace

struct RRDBNet::Impl {
  struct RDB {
    Conv2d conv[5];
  };
  struct Block {
    RDB rdb[3];
  };
  Conv2d first, body, hr, last;
  std::vector<Block> blocks;
  std::vector<Conv2d> ups;
  // Scratch: 0 feat, 1-3 the trunk's rotating block outputs, 4 temporaries.
  mutable Arena arenas[5];
  mutable std::mutex mu;
};

RRDBNet::RRDBNet() = default;
RRDBNet::~RRDBNet() = default;
RRDBNet::RRDBNet(RRDBNet&&) noexcept = default;
RRDBNet& RRDBNet::operator=(RRDBNet&&) noexcept = default;

void RRDBNet::load(Backend& be, WeightStore& w) {
  Names n;
  bool found = false;
  for (const char* pre : {"params_ema.", "params.", ""})
    if (detect_layout(w, pre, &n.layout)) {
      n.pre = pre;
      found = true;
      break;
    }
  DF_CHECK(found, w.origin(),
           ": not an ESRGAN / Real-ESRGAN upscaler (RRDBNet): expected Real-ESRGAN's conv_first.weight and "
           "body.0.rdb1.conv1.weight (also under params_ema. / params.), ESRGAN's conv_first.weight and "
           "RRDB_trunk.0.RDB1.conv1.weight, or old ESRGAN's model.0.weight and model.1.sub.0.RDB1.conv1.0.weight; ",
           what_it_is(w));

  RRDBNetConfig c;
  c.num_block = c.num_upsample = 0;
  while (w.has(n.rdb(c.num_block, 1, 1) + ".weight")) ++c.num_block;
  n.num_block = c.num_block;
  while (c.num_upsample < kMaxUpsample && w.has(n.up(c.num_upsample + 1) + ".weight")) ++c.num_upsample;
  n.num_upsample = c.num_upsample;
  const Shape first = conv_shape(w, n.first()), last = conv_shape(w, n.last());
  c.num_feat = int(first[0]);
  c.out_channels = int(last[0]);
  const int64_t cin = first[1];
  c.unshuffle = cin == 16 * last[0] ? 4 : cin == 4 * last[0] ? 2 : 1;
  c.in_channels = int(cin / (c.unshuffle * c.unshuffle));
  if (c.num_block > 0) c.num_grow_ch = int(conv_shape(w, n.rdb(0, 1, 1))[0]);
  DF_CHECK((1 << c.num_upsample) >= c.unshuffle, w.origin(), ": RRDBNet (", rrdb_layout_name(n.layout), "): ",
           n.first(), ".weight takes ", cin, " channels (an input pixel-unshuffled by ", c.unshuffle, ") but the net ",
           "upsamples only ", c.num_upsample, " time", c.num_upsample == 1 ? "" : "s",
           ": it would shrink the image");

  auto m = std::make_unique<Impl>();
  auto bind = [&](Conv2d& conv, const std::string& module, int64_t in, int64_t out) {
    conv.bind(be, Binder(w, module + "."), in, out, 3);
  };
  const int64_t nf = c.num_feat, gc = c.num_grow_ch;
  bind(m->first, n.first(), cin, nf);
  m->blocks.resize(size_t(c.num_block));
  for (int i = 0; i < c.num_block; ++i)
    for (int k = 0; k < 3; ++k) {
      Impl::RDB& r = m->blocks[size_t(i)].rdb[k];
      for (int j = 0; j < 4; ++j) bind(r.conv[j], n.rdb(i, k + 1, j + 1), nf + j * gc, gc);
      bind(r.conv[4], n.rdb(i, k + 1, 5), nf + 4 * gc, nf);
    }
  bind(m->body, n.body(), nf, nf);
  m->ups.resize(size_t(c.num_upsample));
  for (int k = 0; k < c.num_upsample; ++k) bind(m->ups[size_t(k)], n.up(k + 1), nf, nf);
  bind(m->hr, n.hr(), nf, nf);
  bind(m->last, n.last(), nf, c.out_channels);
  // BasicSR saves both params and params_ema; the EMA weights run, the others may stay unused.
  w.finish([&](const std::string& name) { return n.pre == "params_ema." && name.rfind("params.", 0) == 0; });
  cfg_ = c;
  layout_ = n.layout;
  impl_ = std::move(m);
}

namespace {

void lrelu(Backend& be, Tensor& x) { be.unary(Unary::LeakyRelu02, x, x); }

Tensor concat(Ctx& c, const Tensor& a, const Tensor& b) {
  Shape s = a.shape();
  s[-1] = a.dim(-1) + b.dim(-1);
  Tensor y = c.alloc(s);
  c.be.concat_last(a, b, y);
  return y;
}

// x: [N, H, W, nf] -> [N, H, W, nf] in `o` = x + 0.2·conv5(cat(x, x1..x4)); temporaries in `t`.
Tensor dense_block(Ctx& t, Ctx& o, const RRDBNet::Impl::RDB& d, const Tensor& x) {
  Tensor feats = x;  // cat(x, x1, ..., x_k)
  for (int j = 0; j < 4; ++j) {
    Tensor xj = d.conv[j](t, feats);
    lrelu(t.be, xj);
    feats = concat(t, feats, xj);
  }
  Tensor y = d.conv[4](o, feats);
  o.be.scale(y, 0.2f, y);
  o.be.binary(Binary::Add, y, x, y);
  return y;
}

// x: [N, H, W, C] -> [N, 2H, 2W, C], nearest.
Tensor upsample2(Ctx& c, const Tensor& x) {
  Tensor y = c.alloc({x.dim(0), 2 * x.dim(1), 2 * x.dim(2), x.dim(3)});
  c.be.upsample_nearest(x, y);
  return y;
}

}  // namespace

Tensor RRDBNet::forward(Ctx& c, const Tensor& x) const {
  DF_CHECK(impl_, "RRDBNet::forward: no model loaded");
  const RRDBNetConfig& k = cfg_;
  DF_CHECK(x.rank() == 4 && x.dim(3) == k.in_channels && x.dim(1) > 0 && x.dim(2) > 0 &&
               x.dim(1) % k.unshuffle == 0 && x.dim(2) % k.unshuffle == 0,
           "RRDBNet::forward: input ", x.str(), " must be [N, H, W, ", k.in_channels, "] with H and W multiples of ",
           k.unshuffle);
  std::lock_guard<std::mutex> lock(impl_->mu);
  Arena* a = impl_->arenas;
  struct Reset {  // every scratch arena is empty again after the pass, even on an error
    Arena* a;
    ~Reset() {
      for (int i = 0; i < 5; ++i) a[i].reset();
    }
  } reset{a};
  auto ctx = [&](int i) { return Ctx{c.be, a[i], DType::F32}; };
  Ctx feat_c = ctx(0), tmp = ctx(4);
  Backend& be = c.be;

  Tensor in = x;
  if (k.unshuffle > 1) {
    in = tmp.alloc({x.dim(0), x.dim(1) / k.unshuffle, x.dim(2) / k.unshuffle, x.dim(3) * k.unshuffle * k.unshuffle});
    be.pixel_unshuffle(x, k.unshuffle, in);
  }
  const Tensor feat = impl_->first(feat_c, in);  // [N, h, w, nf]
  a[4].reset();

  // Trunk: block i's input lives in arena `cur` (0: feat), its dense blocks write to the other two
  // of arenas 1-3 in turn; the input's arena is freed once the block's residual is added.
  Tensor h = feat;
  int cur = 0;
  for (const Impl::Block& b : impl_->blocks) {
    int free_[2], n = 0;
    for (int i = 1; i <= 3 && n < 2; ++i)
      if (i != cur) free_[n++] = i;
    Ctx o1 = ctx(free_[0]), o2 = ctx(free_[1]);
    Tensor r = dense_block(tmp, o1, b.rdb[0], h);
    a[4].reset();
    r = dense_block(tmp, o2, b.rdb[1], r);
    a[4].reset();
    a[free_[0]].reset();
    r = dense_block(tmp, o1, b.rdb[2], r);
    a[4].reset();
    a[free_[1]].reset();
    be.scale(r, 0.2f, r);
    be.binary(Binary::Add, r, h, r);
    if (cur != 0) a[cur].reset();
    h = r;
    cur = free_[0];
  }
  const int trunk_arena = cur == 1 ? 2 : 1;
  Ctx trunk_c = ctx(trunk_arena);
  Tensor trunk = impl_->body(trunk_c, h);  // feat + conv_body(h)
  be.binary(Binary::Add, trunk, feat, trunk);
  for (int i = 0; i < 4; ++i)
    if (i != trunk_arena) a[i].reset();

  // Upsampling: each stage's nearest ×2 in the temporaries, its conv output in the arena the
  // stage before last used.
  int hold = trunk_arena, next = 0;
  Tensor u = trunk;
  for (const Conv2d& conv : impl_->ups) {
    Tensor up = upsample2(tmp, u);
    Ctx oc = ctx(next);
    u = conv(oc, up);
    lrelu(be, u);
    a[4].reset();
    a[hold].reset();
    hold = next;
    next = next == 0 ? 3 : 0;
  }
  Tensor hr = impl_->hr(tmp, u);
  lrelu(be, hr);
  Ctx out_c{c.be, c.arena, DType::F32};
  return impl_->last(out_c, hr);
}

size_t RRDBNet::scratch_capacity() const {
  if (!impl_) return 0;
  std::lock_guard<std::mutex> lock(impl_->mu);
  size_t n = 0;
  for (const Arena& a : impl_->arenas) n += a.capacity();
  return n;
}

void RRDBNet::release_scratch() {
  if (!impl_) return;
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (Arena& a : impl_->arenas) a = Arena();
}

RRDBNet load_rrdbnet(const std::string& path, Backend& be) {
  TensorFile f = open_model_file(path);
  DF_CHECK(f.format != "diffusers", path, ": a diffusers folder, not an ESRGAN / Real-ESRGAN upscaler (RRDBNet) file");
  WeightStore w(path, "upscaler");
  for (TensorEntry& e : f.tensors) w.add(e.name, std::move(e.tensor));
  RRDBNet net;
  net.load(be, w);
  return net;
}

}  // namespace diffuse
