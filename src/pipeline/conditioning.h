// Prompt → text conditioning for each family, as A1111 and diffusers do it: A1111 prompt weighting
// (`(word:1.3)`, `(word)`, `[word]`, escapes), prompts longer than 75 tokens in chunks of 75
// encoded separately and concatenated, clip skip, and the unconditional side of guidance.
#pragma once
#include <string>
#include <vector>

#include "models/sd_model.h"
#include "nn/layers.h"

namespace diffuse {

struct Conditioning {
  Tensor context;  // [B, 77·chunks, C]: C = 768 (SD1), 1024 (SD2), 2048 (SDXL: both encoders' hidden_states[-2])
  Tensor pooled;   // SDXL: [B, 1280] encoder 2's projected pooled output (text_embeds); else undefined
};

struct PromptOptions {
  int clip_skip = 0;  // A1111 meaning: 0 or 1 = the family's default layer, 2 = penultimate + final norm, ...
};

// A1111 prompt weighting parsed into (text, weight) runs; BREAK keeps its A1111 meaning (pad to a
// new chunk). Exposed for tests.
struct WeightedText {
  std::string text;
  float weight = 1.0f;
};
std::vector<WeightedText> parse_prompt_weights(const std::string& prompt);

// The conditional and unconditional sides of guidance, padded to the same number of 77-token
// chunks. For SD 1.x/2.x an empty negative prompt encodes "" (diffusers); for SDXL an empty
// negative prompt gives zero context and zero pooled output (force_zeros_for_empty_prompt).
// Outputs are owned tensors (batch 1; callers repeat them for a batch).
struct PromptPair {
  Conditioning cond, uncond;
};
PromptPair encode_prompts(Ctx& ctx, const SDModel& model, const std::string& prompt, const std::string& negative,
                          const PromptOptions& opts);

}  // namespace diffuse
