#include "models/memory_estimate.h"

#include <algorithm>
#include <vector>

namespace diffuse {

namespace {
int64_t half_up(int64_t v) { return (v + 1) / 2; }  // a stride-2, pad-1, 3×3 convolution's output side
// Allocations are 64-byte aligned, and small tensors (timesteps, norms' statistics) are not
// counted above: 2% plus 8 KiB per arena (128 aligned allocations).
size_t with_slack(size_t bytes, int arenas) { return bytes + bytes / 50 + size_t(arenas) * (size_t(8) << 10); }
}  // namespace

size_t unet_pass_bytes(const UNetConfig& u, int64_t rows, int64_t h, int64_t w, size_t act_bytes,
                       int64_t context_tokens) {
  const int L = u.levels();
  std::vector<int64_t> px(static_cast<size_t>(L));  // latent pixels per level
  for (int l = 0, hh = int(h), ww = int(w); l < L; ++l, hh = int(half_up(hh)), ww = int(half_up(ww)))
    px[size_t(l)] = int64_t(hh) * ww;
  // Values per row, by arena: skips (caller's arena), the largest block output (each ping-pong
  // arena), the largest block's temporaries (temp) and the largest transformer block's (inner).
  int64_t skips = px[0] * u.block_out_channels[0], out_max = skips, temp = 0, inner = 0;
  auto resnet = [&](int64_t p, int64_t in, int64_t out, bool concat) {
    // [concat input], norm1 (in), conv1, norm2, conv2 (out each), shortcut (out) when in ≠ out
    temp = std::max(temp, p * ((concat ? in : 0) + in + 3 * out + (in != out ? out : 0)));
    out_max = std::max(out_max, p * out);
  };
  auto transformer = [&](int64_t p, int64_t c) {
    // block level: norm, proj_in, proj_out (and the residual) in temp; per transformer block in
    // inner: norm1, q, k, v, attention out, to_out; norm2, q, out, to_out; norm3, ff proj (8c),
    // GEGLU (4c), ff out — 24c per token; cross-attention k and v per context token.
    temp = std::max(temp, p * 4 * c);
    inner = std::max(inner, p * 24 * c + 2 * context_tokens * c);
    out_max = std::max(out_max, p * c);
  };
  int64_t ch = u.block_out_channels[0];
  std::vector<int64_t> skip_ch = {ch};
  for (int l = 0; l < L; ++l) {
    const int64_t c = u.block_out_channels[size_t(l)], p = px[size_t(l)];
    for (int j = 0; j < u.layers_per_block; ++j) {
      resnet(p, ch, c, false);
      if (u.cross_attn[size_t(l)]) transformer(p, c);
      ch = c;
      skips += p * c;
      skip_ch.push_back(c);
    }
    if (l + 1 < L) {
      temp = std::max(temp, px[size_t(l + 1)] * c);
      skips += px[size_t(l + 1)] * c;
      skip_ch.push_back(c);
    }
  }
  resnet(px[size_t(L - 1)], ch, ch, false);
  transformer(px[size_t(L - 1)], ch);
  for (int i = 0; i < L; ++i) {
    const int l = L - 1 - i;
    const int64_t c = u.block_out_channels[size_t(l)], p = px[size_t(l)];
    for (int j = 0; j <= u.layers_per_block; ++j) {
      const int64_t skip = skip_ch.back();
      skip_ch.pop_back();
      resnet(p, ch + skip, c, true);
      if (u.cross_attn[size_t(l)]) transformer(p, c);
      ch = c;
    }
    if (l > 0) temp = std::max(temp, 2 * px[size_t(l - 1)] * c);  // upsampled input + conv output
  }
  temp = std::max(temp, px[0] * (ch + u.out_channels));  // norm_out + conv_out
  // The caller's arena also holds the prediction and the time embedding (sinusoids, MLP, SiLU).
  const int64_t caller = skips + px[0] * u.out_channels + 10 * int64_t(u.block_out_channels[0]);
  const int64_t values = caller + 2 * out_max + temp + inner;
  return with_slack(size_t(values) * size_t(rows) * act_bytes, 5);
}

int64_t unet_largest_activation(const UNetConfig& u, int64_t rows, int64_t h, int64_t w) {
  // The GEGLU projection (8c per token) at the first attention level, or a concatenated resnet
  // input (at most 3c) at level 0.
  int64_t best = h * w * 3 * int64_t(u.block_out_channels[0]);
  int64_t hh = h, ww = w;
  for (int l = 0; l < u.levels(); ++l, hh = half_up(hh), ww = half_up(ww))
    if (u.cross_attn[size_t(l)]) best = std::max(best, hh * ww * 8 * int64_t(u.block_out_channels[size_t(l)]));
  return best * rows;
}

size_t vae_decode_bytes(const VAEConfig& v, int64_t H, int64_t W, size_t act_bytes) {
  const int n = int(v.block_out_channels.size());
  const int64_t f = v.downscale();
  int64_t hh = (H + f - 1) / f, ww = (W + f - 1) / f;
  int64_t out_max = 0, temp = 0;
  auto resnet = [&](int64_t p, int64_t in, int64_t out) {
    temp = std::max(temp, p * (in + 2 * out + (in != out ? out : 0)));  // norm1, conv1, norm2, shortcut
    out_max = std::max(out_max, p * std::max(in, out));
  };
  int64_t prev = v.block_out_channels[size_t(n - 1)];
  int64_t p = hh * ww;
  resnet(p, prev, prev);               // mid block resnets and attention (q, k, v, out: 4c)
  temp = std::max(temp, p * 5 * prev);
  for (int i = 0; i < n; ++i) {
    const int64_t c = v.block_out_channels[size_t(n - 1 - i)];
    for (int j = 0; j <= v.layers_per_block; ++j) resnet(p, j == 0 ? prev : c, c);
    prev = c;
    if (i < n - 1) {  // nearest 2× (temp) then a 3×3 conv (output)
      hh *= 2, ww *= 2, p = hh * ww;
      temp = std::max(temp, p * c);
      out_max = std::max(out_max, p * c);
    }
  }
  temp = std::max(temp, p * prev);  // norm_out
  const int64_t values = 2 * out_max + temp;
  // + the f32 image the decode returns (and its conversion from the activation dtype)
  return with_slack(size_t(values) * act_bytes + size_t(p) * size_t(v.out_channels) * (4 + act_bytes), 4);
}

}  // namespace diffuse
