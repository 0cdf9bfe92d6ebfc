#include "models/t2i_adapter.h"

#include <cstring>

#include "core/error.h"
#include "io/tensor_file.h"

namespace diffuse {

namespace {

// 2×2 average pool, stride 2, rounding up (a window hanging off the edge averages the pixels it
// covers): x [N, H, W, C] f32 -> [N, ceil(H/2), ceil(W/2), C].
Tensor avg_pool2(Ctx& c, const Tensor& x_in) {
  const Tensor x = x_in.dtype() == DType::F32 ? x_in : x_in.to(DType::F32);
  const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3), Ho = (H + 1) / 2, Wo = (W + 1) / 2;
  Tensor y = c.alloc({N, Ho, Wo, C}, DType::F32);
  const float* p = x.f32();
  float* q = y.f32();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < Ho; ++i)
      for (int64_t j = 0; j < Wo; ++j) {
        float* out = q + ((n * Ho + i) * Wo + j) * C;
        std::memset(out, 0, size_t(C) * sizeof(float));
        int count = 0;
        for (int64_t di = 0; di < 2; ++di)
          for (int64_t dj = 0; dj < 2; ++dj) {
            const int64_t y0 = 2 * i + di, x0 = 2 * j + dj;
            if (y0 >= H || x0 >= W) continue;
            ++count;
            const float* in = p + ((n * H + y0) * W + x0) * C;
            for (int64_t k = 0; k < C; ++k) out[k] += in[k];
          }
        for (int64_t k = 0; k < C; ++k) out[k] /= float(count);
      }
  return y;
}

}  // namespace

struct T2IAdapter::Impl {
  T2IAdapterConfig cfg;
  std::string layout;
  Conv2d conv_in;
  struct Block {
    Conv2d block1, block2;
  };
  struct Level {
    bool has_in_conv = false;
    Conv2d in_conv;
    std::vector<Block> blocks;
  };
  std::vector<Level> levels;
};

T2IAdapter::T2IAdapter() = default;
T2IAdapter::~T2IAdapter() = default;
T2IAdapter::T2IAdapter(T2IAdapter&&) noexcept = default;
T2IAdapter& T2IAdapter::operator=(T2IAdapter&&) noexcept = default;

const T2IAdapterConfig& T2IAdapter::config() const {
  DF_CHECK(impl_ != nullptr, "T2I-Adapter: not loaded");
  return impl_->cfg;
}

const std::string& T2IAdapter::layout() const {
  DF_CHECK(impl_ != nullptr, "T2I-Adapter: not loaded");
  return impl_->layout;
}

bool T2IAdapter::is_adapter(const WeightStore& w) {
  return (w.has("adapter.conv_in.weight") && w.has("adapter.body.0.resnets.0.block1.weight")) ||
         (w.has("conv_in.weight") && w.has("body.0.block1.weight"));
}

bool T2IAdapter::is_adapter_file(const std::string& path) {
  try {
    const TensorFile f = open_model_file(path);
    WeightStore w(path, "T2I-Adapter");
    for (const TensorEntry& e : f.tensors) w.add(e.name, e.tensor);
    return is_adapter(w);
  } catch (const Error&) {
    return false;
  }
}

void T2IAdapter::load(Backend& be, WeightStore& w) {
  const std::string where = w.origin();
  const char* expected =
      "expected a T2I-Adapter (TencentARC's conv_in, body.K.block1/block2[/in_conv], or diffusers' "
      "adapter.conv_in, adapter.body.I.resnets.J.block1/block2[/in_conv])";
  DF_CHECK(is_adapter(w), where, ": not a T2I-Adapter: ", expected);
  auto m = std::make_unique<Impl>();
  const bool diffusers = w.has("adapter.conv_in.weight");
  m->layout = diffusers ? "diffusers" : "TencentARC";
  const std::string pre = diffusers ? "adapter." : "";
  for (const std::string& n : w.names()) {
    DF_CHECK(n.find("skep.") == std::string::npos && n.find("down_opt.") == std::string::npos &&
                 n.find("body.0.in_conv") == std::string::npos,
             where, ": ", n, ": this T2I-Adapter variant (sk=False skip convs, conv downsamplers) is not supported; ",
             expected);
    DF_CHECK(n.rfind(pre + "conv_in.", 0) == 0 || n.rfind(pre + "body.", 0) == 0, where, ": unexpected tensor ", n,
             " (the light adapter and SDXL's full_adapter_xl are not supported); ", expected);
  }
  auto shape = [&](const std::string& n) -> Shape {
    const Tensor* t = w.find(n);
    DF_CHECK(t && t->rank() == 4, where, ": no 4-d tensor ", n, "; ", expected);
    return t->shape();
  };
  T2IAdapterConfig& cfg = m->cfg;
  const Shape ci = shape(pre + "conv_in.weight");
  DF_CHECK(ci[1] % 64 == 0 && ci[2] == 3 && ci[3] == 3, where, ": ", pre, "conv_in.weight is ", ci.str(),
           ", expected [C, 64·hint channels, 3, 3] (the hint pixel-unshuffled by 8)");
  cfg.in_channels = int(ci[1] / 64);
  DF_CHECK(cfg.in_channels == 1 || cfg.in_channels == 3, where, ": conv_in takes ", ci[1],
           " channels: a hint of ", cfg.in_channels, " channels (1 or 3 expected)");
  // Levels and blocks: diffusers counts them; the original numbers blocks K = level·nums_rb + j,
  // nums_rb being where the first in_conv (level 1 widens) sits.
  std::vector<std::vector<std::string>> blocks;  // per level, per block: the block's prefix
  std::vector<std::string> in_convs;             // per level: in_conv prefix
  if (diffusers) {
    for (int i = 0; w.has(cat(pre, "body.", i, ".resnets.0.block1.weight")); ++i) {
      blocks.emplace_back();
      for (int j = 0; w.has(cat(pre, "body.", i, ".resnets.", j, ".block1.weight")); ++j)
        blocks.back().push_back(cat(pre, "body.", i, ".resnets.", j, "."));
      in_convs.push_back(cat(pre, "body.", i, ".in_conv."));
    }
    cfg.nums_rb = int(blocks[0].size());
  } else {
    int total = 0;
    while (w.has(cat("body.", total, ".block1.weight"))) ++total;
    // The file does not say where a level that keeps its width starts: nums_rb must put every
    // in_conv at a level's first block and keep the width within a level. The original's
    // published configs have 4 levels (channels [320, 640, 1280, 1280], nums_rb 2): preferred.
    auto fits = [&](int n) {
      if (n <= 0 || total % n != 0) return false;
      for (int k = 0; k < total; ++k) {
        if (w.has(cat("body.", k, ".in_conv.weight")) && k % n != 0) return false;
        if (k % n != 0 && shape(cat("body.", k, ".block1.weight"))[0] != shape(cat("body.", k - 1, ".block1.weight"))[0])
          return false;
      }
      return true;
    };
    int nrb = total % 4 == 0 && fits(total / 4) ? total / 4 : 0;
    for (int n = 1; n <= total && nrb == 0; ++n)
      if (fits(n)) nrb = n;
    DF_CHECK(nrb > 0, where, ": ", total, " blocks body.K whose in_convs and widths split into no whole levels; ",
             expected);
    cfg.nums_rb = nrb;
    for (int i = 0; i < total / nrb; ++i) {
      blocks.emplace_back();
      for (int j = 0; j < nrb; ++j) blocks.back().push_back(cat("body.", i * nrb + j, "."));
      in_convs.push_back(cat("body.", i * nrb, ".in_conv."));
    }
  }
  DF_CHECK(!blocks.empty(), where, ": no adapter blocks; ", expected);
  const Binder root(w);
  int ch = int(ci[0]);
  m->conv_in.bind(be, Binder(w, pre + "conv_in."), 64 * cfg.in_channels, ch, 3);
  for (size_t i = 0; i < blocks.size(); ++i) {
    Impl::Level lv;
    DF_CHECK(int(blocks[i].size()) == cfg.nums_rb, where, ": level ", i, " has ", blocks[i].size(), " blocks, level 0 ",
             cfg.nums_rb);
    const int out = int(shape(blocks[i][0] + "block1.weight")[0]);
    lv.has_in_conv = w.has(in_convs[i] + "weight");
    DF_CHECK(lv.has_in_conv || out == ch, where, ": level ", i, " widens ", ch, " -> ", out, " without an in_conv");
    if (lv.has_in_conv) lv.in_conv.bind(be, Binder(w, in_convs[i]), ch, out, 1);
    ch = out;
    for (const std::string& b : blocks[i]) {
      Impl::Block bl;
      bl.block1.bind(be, Binder(w, b + "block1."), ch, ch, 3);
      bl.block2.bind(be, Binder(w, b + "block2."), ch, ch, 1);
      lv.blocks.push_back(std::move(bl));
    }
    cfg.channels.push_back(ch);
    m->levels.push_back(std::move(lv));
  }
  (void)root;
  w.finish();
  impl_ = std::move(m);
}

T2IAdapter T2IAdapter::load_file(const std::string& path, Backend& be) {
  TensorFile f = open_model_file(path);
  WeightStore w(path, "T2I-Adapter");
  for (const TensorEntry& e : f.tensors) w.add(e.name, e.tensor);
  T2IAdapter a;
  a.load(be, w);
  return a;
}

void T2IAdapter::check_compatible(const UNetConfig& u) const {
  const T2IAdapterConfig& c = config();
  const std::vector<int> want(u.block_out_channels.begin(), u.block_out_channels.end());
  std::string have, need;
  for (int ch : c.channels) have += cat(have.empty() ? "" : ",", ch);
  for (int ch : want) need += cat(need.empty() ? "" : ",", ch);
  DF_CHECK(c.channels == want, "T2I-Adapter (features [", have, "]) does not fit the model's UNet (levels [", need,
           "]): one feature per UNet level with its width is expected");
}

std::vector<Tensor> T2IAdapter::forward(Ctx& c, const Tensor& hint_in) const {
  DF_CHECK(impl_ != nullptr, "T2I-Adapter: forward before load");
  const Impl& m = *impl_;
  DF_CHECK(hint_in.rank() == 4 && hint_in.dim(3) == 3 && hint_in.dim(1) % 8 == 0 && hint_in.dim(2) % 8 == 0 &&
               hint_in.dim(1) > 0 && hint_in.dim(2) > 0,
           "T2I-Adapter: hint ", hint_in.str(), " should be [N, H, W, 3] with H, W multiples of 8");
  Tensor hint = hint_in.dtype() == DType::F32 ? hint_in : hint_in.to(DType::F32);
  if (m.cfg.in_channels == 1) {  // PIL's "L": (299 R + 587 G + 114 B) / 1000
    Tensor g = c.alloc({hint.dim(0), hint.dim(1), hint.dim(2), 1}, DType::F32);
    for (int64_t i = 0; i < g.numel(); ++i) {
      const float* p = hint.f32() + 3 * i;
      g.f32()[i] = (299.0f * p[0] + 587.0f * p[1] + 114.0f * p[2]) / 1000.0f;
    }
    hint = g;
  }
  Tensor u = c.alloc({hint.dim(0), hint.dim(1) / 8, hint.dim(2) / 8, hint.dim(3) * 64}, DType::F32);
  c.be.pixel_unshuffle(hint, 8, u);
  Tensor x = m.conv_in(c, u);
  std::vector<Tensor> features;
  for (size_t i = 0; i < m.levels.size(); ++i) {
    const Impl::Level& lv = m.levels[i];
    if (i > 0) x = avg_pool2(c, x);
    if (lv.has_in_conv) x = lv.in_conv(c, x);
    for (const Impl::Block& b : lv.blocks) {
      Tensor h = b.block1(c, x);
      Tensor a = c.alloc(h.shape());
      c.be.unary(Unary::ReLU, h, a);
      Tensor y = b.block2(c, a);
      c.be.binary(Binary::Add, y, x, y);
      x = y;
    }
    features.push_back(x);
  }
  return features;
}

}  // namespace diffuse
