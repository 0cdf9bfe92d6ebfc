// The text encoder(s) in a training step (text-encoder LoRA): the captions' conditioning computed
// by the encoders with the Grads (their adapters apply), kept for the backward, and the UNet's
// gradients routed back into them. The conditioning is what inference's encode_chunks gives for
// a caption's first 77-token chunk (pipeline/conditioning.h):
//  - SD 1.x/2.x: context = the encoder's last hidden state (SD 2.x's encoder stops at the
//    checkpoint's penultimate layer);
//  - SDXL: context = concat(encoder 1's penultimate state, encoder 2's) by channels
//    ([B, 77, 768 + 1280]); pooled = encoder 2's text_embeds (final norm at the EOS token ×
//    text_projection), the UNet's added-embedding input. The backward splits dL/dcontext by
//    channels into the two penultimate states and sends dL/dpooled through encoder 2's text
//    projection and final norm.
#pragma once
#include <string>
#include <vector>

#include "models/sd_model.h"
#include "nn/grad.h"

namespace diffuse::train {

class TextEncoderTrainer {
 public:
  // Registers the encoders' plain f32 weights (read from model.path) in `grads`, the Grads the
  // step runs with (the UNet trainer's).
  TextEncoderTrainer(SDModel& model, Grads& grads);

  // Token ids of a batch's captions, per encoder (ids2 for SDXL only).
  struct Batch {
    std::vector<std::vector<int>> ids1, ids2;
  };
  // Appends a caption (plain text, first chunk of 77 tokens with each encoder's padding).
  void add_caption(Batch& b, const std::string& caption) const;

  struct Encoded {
    Tensor context;  // [B, 77, C] f32, owned
    Tensor pooled;   // SDXL: [B, P] f32, owned; undefined otherwise
  };
  // The batch's conditioning; keeps the encoders' traces for backward() (one batch at a time).
  // `c` must carry the Grads.
  Encoded forward(Ctx& c, const Batch& b);
  // dcontext: dL/dcontext [B, 77, C]; dpooled: dL/dpooled [B, P] (SDXL; undefined: none). Adds
  // the gradients the Grads asks for (the LoRA adapters').
  void backward(Ctx& c, const Tensor& dcontext, const Tensor& dpooled);

 private:
  SDModel& model_;
  bool xl_;
  ClipTextModel::Trace tr1_, tr2_;
};

}  // namespace diffuse::train
