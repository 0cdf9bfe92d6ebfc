// TAESD (models/taesd.h): binding madebyollin's and diffusers' layouts, and the two forward passes.
// Every layer's output goes through vae_blocks::Stages (ping-pong scratch arenas), so a decode
// holds a stage's input, its output and the block's temporaries, not every intermediate: at
// 512² (64 channels f32 = 64 MiB per full-size activation) about 256 MiB.
#include "models/taesd.h"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "models/vae_blocks.h"

namespace diffuse {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kC = 64;      // channels of every hidden layer
constexpr int64_t kLatent = 4;  // SD / SDXL latent channels
constexpr int64_t kRgb = 3;

// A 3×3 convolution as published: "<b>weight" [out, in, 3, 3] and, with `bias`, "<b>bias" [out];
// padding 1.
Conv2d bind_conv(Backend& be, const Binder& b, int64_t in, int64_t out, int stride, bool bias) {
  Conv2d c;
  c.in = in;
  c.out = out;
  c.k = 3;
  c.p = Conv2dParams::same(3, stride);
  c.w = be.prepare_conv2d(b.take("weight", {out, in, 3, 3}), bias ? b.take("bias", {out}) : Tensor(), c.p);
  return c;
}

// Block(64, 64): "<b>conv.0", "<b>conv.2", "<b>conv.4" (nn.Sequential with ReLUs at 1 and 3);
// the skip is nn.Identity (no tensors) since in == out.
struct Block {
  Conv2d c0, c2, c4;
  void bind(Backend& be, const Binder& b) {
    const Binder s = b.sub("conv");
    c0 = bind_conv(be, s.sub(0), kC, kC, 1, true);
    c2 = bind_conv(be, s.sub(2), kC, kC, 1, true);
    c4 = bind_conv(be, s.sub(4), kC, kC, 1, true);
  }
  // x: [N, H, W, 64] -> ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x), in o; temporaries in t.
  Tensor operator()(Ctx& t, Ctx& o, const Tensor& x) const {
    Tensor h = c0(t, x);
    t.be.unary(Unary::ReLU, h, h);
    h = c2(t, h);
    t.be.unary(Unary::ReLU, h, h);
    Tensor y = c4(o, h);
    o.be.binary(Binary::Add, y, x, y);
    o.be.unary(Unary::ReLU, y, y);
    return y;
  }
};

// nn.Sequential indices of the decoder's modules, from `first` (the conv after the clamp: 1 in
// madebyollin's files, 0 in diffusers' DecoderTiny, which applies the clamp in forward()):
// conv, ReLU, then per level 3 Blocks, Upsample, conv; then a Block and the output conv.
struct Decoder {
  Conv2d in;
  Block blocks[3][3];
  Conv2d up[3];
  Block last;
  Conv2d out;
  void bind(Backend& be, const Binder& b, int first) {
    int i = first;
    in = bind_conv(be, b.sub(i), kLatent, kC, 1, true);
    i += 2;  // conv, ReLU
    for (int lv = 0; lv < 3; ++lv) {
      for (Block& blk : blocks[lv]) blk.bind(be, b.sub(i++));
      ++i;  // nn.Upsample
      up[lv] = bind_conv(be, b.sub(i++), kC, kC, 1, false);
    }
    last.bind(be, b.sub(i++));
    out = bind_conv(be, b.sub(i), kC, kRgb, 1, true);
  }
};

// The encoder's indices are the same in both layouts: conv, Block, then per level a stride-2
// conv and 3 Blocks, then the output conv (14).
struct Encoder {
  Conv2d in;
  Block first;
  Conv2d down[3];
  Block blocks[3][3];
  Conv2d out;
  void bind(Backend& be, const Binder& b) {
    int i = 0;
    in = bind_conv(be, b.sub(i++), kRgb, kC, 1, true);
    first.bind(be, b.sub(i++));
    for (int lv = 0; lv < 3; ++lv) {
      down[lv] = bind_conv(be, b.sub(i++), kC, kC, 2, false);
      for (Block& blk : blocks[lv]) blk.bind(be, b.sub(i++));
    }
    out = bind_conv(be, b.sub(i), kC, kLatent, 1, true);
  }
};

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// What a file that is not a TAESD looks like, for the error message.
std::string what_it_looks_like(const TensorFile& f) {
  if (f.tensors.empty()) return "it holds no tensors";
  bool vae = false, unet = false, ckpt = false;
  for (const TensorEntry& e : f.tensors) {
    const std::string& n = e.name;
    ckpt |= starts_with(n, "model.diffusion_model.");
    unet |= starts_with(n, "down_blocks.") || starts_with(n, "unet/") || starts_with(n, "input_blocks.");
    vae |= starts_with(n, "first_stage_model.") || starts_with(n, "decoder.conv_in.") || starts_with(n, "decoder.up") ||
           starts_with(n, "encoder.down") || starts_with(n, "post_quant_conv.") || starts_with(n, "vae/");
  }
  std::string examples;
  for (size_t i = 0; i < f.tensors.size() && i < 3; ++i) examples += cat(i ? ", " : "", "'", f.tensors[i].name, "'");
  const std::string kind = ckpt   ? "a Stable Diffusion checkpoint, "
                           : unet ? "a UNet, "
                           : vae  ? "a full VAE (AutoencoderKL; --vae takes those), "
                                  : "";
  return cat("it looks like ", kind, f.tensors.size(), " tensor(s) such as ", examples);
}

[[noreturn]] void not_taesd(const TensorFile& f) {
  throw FileError(cat(f.path, ": not a TAESD (tiny autoencoder) file: expected madebyollin's taesd_decoder / "
                      "taesdxl_decoder tensors (\"1.weight\" [64, 4, 3, 3], \"3.conv.0.weight\", …, \"19.weight\" "
                      "[3, 64, 3, 3]), a taesd_encoder's (\"0.weight\" [64, 3, 3, 3], …) or diffusers "
                      "AutoencoderTiny's (\"decoder.layers.0.weight\", …, \"encoder.layers.0.weight\", …); ",
                      what_it_looks_like(f)));
}

// The first conv of a decoder reads the latent: [64, C, 3, 3]. A TAESD for another latent space
// (SD3's and FLUX's taesd3_ / taef1_ files: 16 channels) is refused by name rather than as a
// shape mismatch.
void check_latent_channels(const TensorFile& f, const std::string& name, int dim) {
  const Tensor* t = f.find(name);
  if (!t || t->rank() != 4) return;  // binding reports it
  const int64_t c = t->dim(dim);
  DF_CHECK(c == kLatent, f.path, ": a TAESD for ", c, "-channel latents (", name, " is ", t->str(),
           "; SD3's and FLUX's taesd3_/taef1_ files have 16); SD 1.x/2.x and SDXL latents have 4 channels");
}

// diffusers' config.json of an AutoencoderTiny folder: the architecture must be the published one
// (the names and shapes alone cannot tell, e.g., a GELU or bilinear variant). Returns its
// scaling_factor (1.0 in the published configs).
float check_config(const TensorFile& f) {
  auto it = f.metadata.find("config.json");
  if (it == f.metadata.end()) return 1.0f;
  const std::string where = (fs::path(f.path) / "config.json").string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception&) {
    throw FileError(cat(where, ": not valid JSON"));
  }
  DF_CHECK(j.is_object(), where, ": not a JSON object");
  auto expect = [&](const char* key, const nlohmann::json& want) {
    auto v = j.find(key);
    if (v == j.end()) return;  // diffusers' default applies, which is the published value
    if (*v != want) throw FileError(cat(where, ": ", key, " is ", v->dump(), ", expected ", want.dump(),
                                        " (madebyollin's TAESD architecture)"));
  };
  expect("_class_name", "AutoencoderTiny");
  expect("in_channels", 3);
  expect("out_channels", 3);
  expect("latent_channels", 4);
  expect("act_fn", "relu");
  expect("upsample_fn", "nearest");
  expect("upsampling_scaling_factor", 2);
  expect("encoder_block_out_channels", nlohmann::json::array({64, 64, 64, 64}));
  expect("decoder_block_out_channels", nlohmann::json::array({64, 64, 64, 64}));
  expect("num_encoder_blocks", nlohmann::json::array({1, 3, 3, 3}));
  expect("num_decoder_blocks", nlohmann::json::array({3, 3, 3, 1}));
  float sf = 1.0f;
  if (auto v = j.find("scaling_factor"); v != j.end()) {
    DF_CHECK(v->is_number() && v->get<double>() > 0 && std::isfinite(v->get<double>()), where,
             ": scaling_factor ", v->dump(), " is not a positive number");
    sf = v->get<float>();
  }
  return sf;
}

// The latent read as f32 (a bf16 one converted).
Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

}  // namespace

struct TAESD::Impl {
  bool has_dec = false, has_enc = false;
  Decoder dec;
  Encoder enc;
  // diffusers divides the UNet's latent by the config's scaling_factor before decoding (and
  // multiplies the encoder's output by it); 1 in the published files.
  float scaling_factor = 1.0f;
  // Scratch (arenas 0, 1: stage outputs ping-pong; 2: a stage's temporaries), one pass at a time.
  mutable std::mutex mu;
  mutable ModelScratch own;

  // One forward pass: `body(stages)` with the scratch locked and the activations in bf16 when the
  // backend computes in bf16 (else c's type).
  template <class Body>
  Tensor pass(Ctx& c, const Body& body) const {
    std::lock_guard<std::mutex> lock(mu);
    Ctx cc{c.be, c.arena, c.be.effective_precision() == Precision::BF16 ? DType::BF16 : c.act, c.ws};
    vae_blocks::Stages s(cc, own.arenas, own.peaks);
    return body(s);
  }
  // The last stage: `conv` into the caller's arena, in f32 whatever the activations' type (its 3
  // or 4 channels are small), times `scale` unless 1.
  static Tensor final_conv(vae_blocks::Stages& s, const Conv2d& conv, const Tensor& x, float scale = 1.0f) {
    return s.run(
        [&](Ctx&, Ctx& o) {
          Ctx f{o.be, o.arena, DType::F32, o.ws};
          Tensor y = conv(f, x);
          if (scale != 1.0f) f.be.scale(y, scale, y);
          return y;
        },
        true);
  }
};

TAESD::TAESD() : impl_(std::make_unique<Impl>()) {}
TAESD::~TAESD() = default;
TAESD::TAESD(TAESD&&) noexcept = default;
TAESD& TAESD::operator=(TAESD&&) noexcept = default;

bool TAESD::has_decoder() const { return impl_->has_dec; }
bool TAESD::has_encoder() const { return impl_->has_enc; }

void TAESD::load(Backend& be, const TensorFile& f) {
  bool diffusers_dec = false, diffusers_enc = false, indexed = !f.tensors.empty();
  for (const TensorEntry& e : f.tensors) {
    diffusers_dec |= starts_with(e.name, "decoder.layers.");
    diffusers_enc |= starts_with(e.name, "encoder.layers.");
    indexed &= !e.name.empty() && e.name[0] >= '0' && e.name[0] <= '9';
  }
  Impl m;
  std::string layout, part;
  if (diffusers_dec || diffusers_enc) {
    layout = "diffusers AutoencoderTiny";
    part = diffusers_dec && diffusers_enc ? "decoder and encoder" : diffusers_dec ? "decoder" : "encoder";
    m.scaling_factor = check_config(f);
    if (diffusers_dec) check_latent_channels(f, "decoder.layers.0.weight", 1);
    if (diffusers_enc) check_latent_channels(f, "encoder.layers.14.weight", 0);
  } else if (indexed && (f.find("0.weight") || f.find("1.weight"))) {
    layout = "taesd";
    // madebyollin's encoder starts with its conv at index 0; the decoder's index 0 is the clamp.
    part = f.find("0.weight") ? "encoder" : "decoder";
    check_latent_channels(f, part == "decoder" ? "1.weight" : "14.weight", part == "decoder" ? 1 : 0);
  } else {
    not_taesd(f);
  }
  WeightStore w(f.path, cat("TAESD ", part, " (", layout == "taesd" ? "madebyollin's taesd_" + part : layout,
                            " layout)"));
  for (const TensorEntry& e : f.tensors) w.add(e.name, e.tensor);
  const Binder root(w);
  if (layout == "taesd") {
    if (part == "decoder") m.dec.bind(be, root, 1), m.has_dec = true;
    else m.enc.bind(be, root), m.has_enc = true;
  } else {
    if (diffusers_dec) m.dec.bind(be, root.sub("decoder").sub("layers"), 0), m.has_dec = true;
    if (diffusers_enc) m.enc.bind(be, root.sub("encoder").sub("layers")), m.has_enc = true;
  }
  w.finish();  // missing, mis-shaped and unused tensors, all named, with the file
  impl_->has_dec = m.has_dec;
  impl_->has_enc = m.has_enc;
  impl_->dec = std::move(m.dec);
  impl_->enc = std::move(m.enc);
  impl_->scaling_factor = m.scaling_factor;
  origin_ = f.path;
  layout_ = layout;
}

Tensor TAESD::decode(Ctx& c, const Tensor& z) const {
  DF_CHECK(has_decoder(), "TAESD::decode: ", origin_.empty() ? std::string("nothing") : origin_,
           " holds no TAESD decoder");
  DF_CHECK(z.rank() == 4 && z.dim(3) == kLatent && z.dim(0) > 0 && z.dim(1) > 0 && z.dim(2) > 0 &&
               (z.dtype() == DType::F32 || z.dtype() == DType::BF16),
           "TAESD::decode: latent ", z.str(), " should be f32 or bf16 [B, h, w, 4] (NHWC)");
  const Impl& m = *impl_;
  const Decoder& d = m.dec;
  return m.pass(c, [&](vae_blocks::Stages& s) {
    // 3·tanh(z / 3): the "Clamp" soft-limits the latent to (-3, 3).
    Tensor x = s.run([&](Ctx& t, Ctx& o) {
      const Tensor zf = as_f32(z);
      Tensor zc = t.alloc(z.shape(), DType::F32);
      const float k = 1.0f / m.scaling_factor;
      for (int64_t i = 0; i < z.numel(); ++i) zc.f32()[i] = float(3.0 * std::tanh(double(zf.f32()[i] * k) / 3.0));
      Tensor h = d.in(o, zc);
      o.be.unary(Unary::ReLU, h, h);
      return h;
    });
    for (int lv = 0; lv < 3; ++lv) {
      for (const Block& blk : d.blocks[lv]) x = s.run([&](Ctx& t, Ctx& o) { return blk(t, o, x); });
      x = s.run([&](Ctx& t, Ctx& o) {
        Tensor u = t.alloc({x.dim(0), x.dim(1) * 2, x.dim(2) * 2, kC});
        t.be.upsample_nearest(x, u);
        return d.up[lv](o, u);
      });
    }
    x = s.run([&](Ctx& t, Ctx& o) { return d.last(t, o, x); });
    return Impl::final_conv(s, d.out, x);
  });
}

Tensor TAESD::encode(Ctx& c, const Tensor& image) const {
  DF_CHECK(has_encoder(), "TAESD::encode: ", origin_.empty() ? std::string("nothing") : origin_,
           " holds no TAESD encoder");
  DF_CHECK(image.rank() == 4 && image.dim(3) == kRgb && image.dim(0) > 0 && image.dim(1) > 0 && image.dim(2) > 0 &&
               image.dim(1) % 8 == 0 && image.dim(2) % 8 == 0 &&
               (image.dtype() == DType::F32 || image.dtype() == DType::BF16),
           "TAESD::encode: image ", image.str(), " should be f32 or bf16 [B, H, W, 3] with H and W multiples of 8");
  const Impl& m = *impl_;
  const Encoder& e = m.enc;
  return m.pass(c, [&](vae_blocks::Stages& s) {
    Tensor x = s.run([&](Ctx&, Ctx& o) { return e.in(o, image); });  // no activation before the first Block
    x = s.run([&](Ctx& t, Ctx& o) { return e.first(t, o, x); });
    for (int lv = 0; lv < 3; ++lv) {
      x = s.run([&](Ctx&, Ctx& o) { return e.down[lv](o, x); });
      for (const Block& blk : e.blocks[lv]) x = s.run([&](Ctx& t, Ctx& o) { return blk(t, o, x); });
    }
    return Impl::final_conv(s, e.out, x, m.scaling_factor);
  });
}

std::string resolve_taesd_path(const std::string& path, Family family) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw FileError(cat(path, ": no such file or folder"));
  if (!fs::is_directory(path, ec)) return path;
  const bool xl = family == Family::SDXL;
  auto find = [&](const std::string& stem) -> std::string {
    for (const char* ext : {".safetensors", ".pth", ".pt"}) {
      const fs::path p = fs::path(path) / (stem + ext);
      if (fs::is_regular_file(p, ec)) return p.string();
    }
    return "";
  };
  const std::string stem = xl ? "taesdxl_decoder" : "taesd_decoder";
  if (std::string p = find(stem); !p.empty()) return p;
  const fs::path dir(path);
  if (fs::is_regular_file(dir / "config.json", ec) &&
      (fs::is_regular_file(dir / "diffusion_pytorch_model.safetensors", ec) ||
       fs::is_regular_file(dir / "diffusion_pytorch_model.fp16.safetensors", ec)))
    return path;
  const std::string other = find(xl ? "taesd_decoder" : "taesdxl_decoder");
  throw FileError(cat(path, ": no TAESD decoder for ", xl ? "SDXL" : "SD 1.x/2.x", " in this folder: looked for ",
                      stem, ".safetensors, ", stem, ".pth, ", stem,
                      ".pt and a diffusers AutoencoderTiny folder (config.json + diffusion_pytorch_model.safetensors)",
                      other.empty() ? "" : cat("; ", fs::path(other).filename().string(), " is for ",
                                               xl ? "SD 1.x/2.x" : "SDXL", ", whose latent space differs")));
}

std::string taesd_family_warning(const std::string& path, Family family) {
  std::string name = fs::path(path).filename().string();
  if (name.empty()) name = fs::path(path).parent_path().filename().string();  // "dir/"
  for (char& ch : name) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  const size_t at = name.find("taesd");
  if (at == std::string::npos || family == Family::Unknown) return "";
  const char next = at + 5 < name.size() ? name[at + 5] : '\0';
  const bool for_xl = name.compare(at, 7, "taesdxl") == 0;
  const bool for_sd = next == '_' || next == '.' || next == '-' || next == '\0';
  if (for_xl && family != Family::SDXL)
    return cat(path, ": its name says TAESD for SDXL, but the model is ", family_name(family),
               ": SDXL's latent space differs, so the previews will be wrong (use taesd_decoder)");
  if (for_sd && family == Family::SDXL)
    return cat(path, ": its name says TAESD for SD 1.x/2.x, but the model is SDXL: the latent spaces differ, "
                     "so the previews will be wrong (use taesdxl_decoder)");
  return "";
}

TAESD load_taesd_decoder(Backend& be, const std::string& path, Family family) {
  const std::string p = resolve_taesd_path(path, family);
  TAESD t;
  t.load(be, open_model_file(p));
  DF_CHECK(t.has_decoder(), p, ": holds only a TAESD encoder (", t.layout(),
           " layout); previews need the decoder (taesd_decoder.* for SD 1.x/2.x, taesdxl_decoder.* for SDXL)");
  return t;
}

}  // namespace diffuse
