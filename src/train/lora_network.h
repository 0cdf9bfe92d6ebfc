// A trainable LoRA on the UNet: f32 master tensors (down, up) per module with their gradients,
// attached to the UNet's layers as adapters (nn/grad.h) so that forward passes with the Grads
// compute y = W·x + b + scale·up·(down·x) (convolutions: scale·up·conv(x, down), LoCon). Files are
// kohya's format: "lora_unet_<module path with . -> _>.lora_down.weight" [r, in] (or
// [r, in, kh, kw] for convolutions), ".lora_up.weight" [out, r] (or [out, r, 1, 1]), ".alpha"
// (scale alpha/r). The module path is what kohya writes for the family: SD 1.x/2.x diffusers'
// ("down_blocks_1_attentions_0_proj_in"), SDXL ldm/SGM's ("input_blocks_4_1_proj_in", kohya's
// sdxl_original_unet); text encoders "lora_te_" (SDXL: "lora_te1_", "lora_te2_") + HF CLIP paths
// ("text_model_encoder_layers_0_self_attn_q_proj").
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/clip_text.h"
#include "models/lora.h"
#include "models/unet.h"
#include "nn/grad.h"
#include "train/optim.h"

namespace diffuse::train {

struct LoraModule {
  std::string key;          // "lora_unet_down_blocks_0_..._to_q"
  std::string weight_name;  // the layer's weight, diffusers name ("down_blocks.0. ... .to_q.weight")
  LoraTarget target = LoraTarget::UNet;  // the model the layer belongs to
  float alpha = 0;
  Param down, up;           // f32, shapes as stored in the file
  LoraAdapter adapter;      // views of down/up/grads, what the layer reads
  const PreparedWeight* layer = nullptr;
};

class LoraNetwork {
 public:
  // The modules of a kohya LoRA file, matched against `unet`'s linear layers and convolutions
  // (LoCon modules included; UNet paths in diffusers or ldm form) and, for lora_te/lora_te1 and
  // lora_te2 modules, `te`'s and `te2`'s linear layers (every module must match one: a key the
  // model lacks, a text-encoder module without its encoder given, or a shape that does not fit
  // is an error naming the file and key). Keys are kept as the file has them. Tensors are copied
  // to f32.
  static std::unique_ptr<LoraNetwork> from_file(const std::string& path, UNet& unet, ClipTextModel* te = nullptr,
                                                ClipTextModel* te2 = nullptr);

  // A fresh LoRA on kohya's default target set (networks/lora.py): every linear layer and 1×1
  // convolution inside the UNet's transformers (proj_in/out, attn1/attn2 q/k/v/out, ff.net.0.proj,
  // ff.net.2: 192 modules for SD 1.5, 722 for SDXL), rank r, alpha; down Kaiming-uniform
  // (a = √5: U(±1/√in)) from `seed`, up zero (the network starts as the identity).
  static std::unique_ptr<LoraNetwork> create_unet(UNet& unet, int rank, float alpha, uint64_t seed);
  // Adds kohya's LoCon targets (networks/lora.py with conv_dim/conv_alpha): every layer inside the
  // UNet's ResnetBlock2D, Downsample2D and Upsample2D modules — the 3×3 convolutions (conv1, conv2,
  // the resamplers' conv) at conv_rank, conv_alpha; the 1×1 conv_shortcut and the time_emb_proj
  // linear at rank, alpha, as kohya gives them network_dim (SD 1.x/2.x: 50 + 36 modules, 278 in
  // all; SDXL: 38 + 28, 788). Initialised as create_unet does (fan_in = in·kh·kw), from a stream
  // of its own so the default modules do not change. Returns how many modules were added.
  int add_unet_conv_targets(UNet& unet, int rank, float alpha, int conv_rank, float conv_alpha, uint64_t seed);
  // The first module on a k×k convolution (k > 1: LoCon; its rank and alpha are kohya's
  // conv_dim, conv_alpha), or null.
  const LoraModule* first_kxk_conv() const;
  // Adds kohya's text-encoder targets (every linear of the attention and MLP of each layer:
  // self_attn.{q,k,v,out}_proj, mlp.fc1/fc2 — 72 modules for CLIP-L, 192 for OpenCLIP bigG)
  // under `prefix` ("lora_te", SDXL: "lora_te1"/"lora_te2", the latter targeting text encoder
  // 2), initialised as create_unet does (a stream per prefix), with learning-rate scale
  // `lr_scale` (text_encoder_lr / unet_lr). Returns how many modules were added.
  int add_text_encoder(ClipTextModel& te, const std::string& prefix, int rank, float alpha, uint64_t seed,
                       float lr_scale = 1.0f);
  // The number of modules on `target`'s layers.
  int count(LoraTarget target) const;
  // Sets the learning-rate scale of `target`'s modules (text_encoder_lr / unet_lr).
  void set_lr_scale(LoraTarget target, float lr_scale);

  // Writes the LoRA as kohya's file (keys as tensors(), alpha as a 0-d tensor) in `dtype`
  // (F32, F16 or BF16) with `metadata`, through the safe writer.
  void save(const std::string& path, DType dtype, const std::map<std::string, std::string>& metadata) const;

  // Adds/removes the adapters in `g` (the layers run without LoRA after detach).
  void attach(Grads& g);
  void detach(Grads& g);
  std::vector<Param*> params();  // down and up of every module, file order
  void zero_grad();
  std::vector<LoraModule>& modules() { return modules_; }

  // The tensors as a kohya file holds them, each key with `prefix` ("" for a LoRA file,
  // "train.step1." for references): <key>.lora_down.weight, <key>.lora_up.weight and, when
  // with_alpha, <key>.alpha.
  std::vector<std::pair<std::string, Tensor>> tensors(const std::string& prefix, bool with_alpha) const;
  // The gradients under the tensors' keys with `prefix` ("grad.").
  std::vector<std::pair<std::string, Tensor>> gradients(const std::string& prefix) const;

 private:
  void bind_adapters();  // points every module's adapter at its tensors
  std::vector<LoraModule> modules_;
};

}  // namespace diffuse::train
