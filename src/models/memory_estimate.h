// Activation memory of the UNet and the VAE decode, from their configs alone (no weights loaded):
// what their scratch arenas grow to for a given size, so a run whose memory cannot fit is refused
// with the estimate before anything loads. They follow the forward passes' allocation pattern
// (src/models/unet.cpp: skips in the caller's arena, one block's temporaries, the transformer
// blocks' inner arena, two ping-pong activations; src/models/vae.cpp: per stage an input, an
// output and the stage's temporaries) with each arena at its largest use, so they bound the
// arenas' peak use from above; tests/unit/test_memory_estimate.cpp checks them against the
// arenas of real passes (estimate ≥ measured, and within 1.5× of it). (An arena's pages count
// once touched: the peak, not the capacity of its chunks, is what the process holds.)
#pragma once
#include <cstddef>
#include <cstdint>

#include "models/unet.h"
#include "models/vae.h"

namespace diffuse {

// One UNet pass over `rows` latents of h × w (rows = batch × 2 with guidance), activations of
// `act_bytes` each (2: bf16, 4: f32), with a text context of `context_tokens` (77 per prompt chunk).
size_t unet_pass_bytes(const UNetConfig& u, int64_t rows, int64_t h, int64_t w, size_t act_bytes,
                       int64_t context_tokens = 77);
// The largest single activation of that pass, in values (a backend converting activations to
// another compute type holds copies of up to two such inputs).
int64_t unet_largest_activation(const UNetConfig& u, int64_t rows, int64_t h, int64_t w);
// One untiled VAE decode to an H × W image (batch 1), including the f32 image it returns.
size_t vae_decode_bytes(const VAEConfig& v, int64_t H, int64_t W, size_t act_bytes);

}  // namespace diffuse
