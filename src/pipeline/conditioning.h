// Prompt → text conditioning for each family, as A1111 and diffusers do it: A1111 prompt weighting
// (`(word:1.3)`, `(word)`, `[word]`, escapes), prompts longer than 75 tokens in chunks of 75
// encoded separately and concatenated, clip skip, and the unconditional side of guidance.
//
// Pipeline of one prompt (A1111's FrozenCLIPEmbedderWithCustomWords, "Original" emphasis):
//   parse_prompt_weights  -> (text, weight) runs, BREAK marked as the run ("BREAK", -1)
//   chunk_weighted        -> each run tokenised alone (no BOS/EOS), every token carrying its run's
//                            weight; chunks of 75 tokens (a full chunk moves the text after a comma
//                            among its last 20 tokens to the next chunk; BREAK starts a new chunk);
//                            each chunk wrapped BOS + tokens + EOS and padded to 77 with the model's
//                            pad token (EOS for SD 1.x / SDXL encoder 1, "!" = id 0 for SD 2.x /
//                            SDXL encoder 2, as diffusers pads), weight 1 on BOS/EOS/pad
//   encode_chunks         -> each chunk through the encoder(s) on its own; apply_emphasis; chunks
//                            concatenated along the token axis
// With all weights 1 and ≤ 75 tokens this is exactly the plain diffusers encoding of the prompt.
//
// Layers per family (clip_skip k, A1111 meaning; 0 and 1 = default):
//   SD 1.x / 2.x   last_hidden of the first (layers - k + 1) layers (k = 2: penultimate + final norm).
//                  SD 2.x's "layers" is the 23 the model keeps (diffusers' convention), so its
//                  default is already OpenCLIP's penultimate block.
//   SDXL           context = concat(te1, te2 penultimate of the first (layers - k + 1) layers, no
//                  final norm) on channels; k = 1: hidden_states[-2] (diffusers' clip_skip = k - 1);
//                  pooled = te2 text_embeds of a full run on the first chunk (A1111/ComfyUI).
//   SDXL refiner   (te2 only) context = te2's as above, alone (1280 wide); pooled the same.
#pragma once
#include <string>
#include <vector>

#include "models/embedding.h"
#include "models/sd_model.h"
#include "models/tokenizer.h"
#include "nn/layers.h"

namespace diffuse {

struct Conditioning {
  Tensor context;  // [B, 77·chunks, C]: C = 768 (SD1), 1024 (SD2), 2048 (SDXL: both encoders' hidden_states[-2]), 1280 (refiner)
  Tensor pooled;   // SDXL: [B, 1280] encoder 2's projected pooled output (text_embeds); else undefined
};

struct PromptOptions {
  int clip_skip = 0;  // A1111 meaning: 0 or 1 = the family's default layer, 2 = penultimate + final norm, ...
  // Textual-inversion embeddings the prompts may use by name (models/embedding.h); null: none.
  const EmbeddingSet* embeddings = nullptr;
};

// A1111 prompt weighting parsed into (text, weight) runs (modules/prompt_parser.py
// parse_prompt_attention): `(t)` ×1.1, `[t]` ÷1.1, `(t:1.3)` explicit, nesting multiplies, `\(` `\)`
// `\[` `\]` `\\` escape (a lone `\` is dropped), unclosed brackets multiply to the end, a `)` or `]`
// with nothing open is text, adjacent runs of equal weight merged, an empty prompt gives ("", 1).
// BREAK (as a whole word, outside brackets) becomes the run ("BREAK", -1): pad to a new chunk.
// Throws diffuse::Error for an explicit weight that is not a number ("(t:1.2.3)").
struct WeightedText {
  std::string text;
  float weight = 1.0f;
  bool is_break() const { return weight == -1.0f && text == "BREAK"; }
};
std::vector<WeightedText> parse_prompt_weights(const std::string& prompt);

// A textual-inversion embedding placed in a chunk: its vectors replace the token embeddings at
// positions pos .. pos + vectors - 1 (placeholder ids 0 there, as A1111's PromptChunkFix).
struct EmbeddingFix {
  int pos = 0;
  const Embedding* emb = nullptr;
  bool operator<(const EmbeddingFix& o) const { return pos != o.pos ? pos < o.pos : emb < o.emb; }
  bool operator==(const EmbeddingFix& o) const { return pos == o.pos && emb == o.emb; }
};

// One 77-token chunk: BOS + up to 75 tokens + EOS + pad; weights per position (1 on BOS/EOS/pad).
struct TokenChunk {
  std::vector<int> ids;
  std::vector<float> weights;
  std::vector<EmbeddingFix> fixes;
};
constexpr int kChunkTokens = 75;          // content tokens per chunk
constexpr int kCommaBacktrack = 20;       // A1111's comma_padding_backtrack default

// pad_id == tok.bang_id() selects diffusers' "!"-is-special tokenisation (SD 2.x, SDXL encoder 2).
// With `embeddings`, a run's tokens that spell an embedding's name become that embedding's vectors
// (A1111's tokenize_line: a chunk that cannot hold all of them is closed first; they carry the
// run's weight).
std::vector<TokenChunk> chunk_weighted(const std::vector<WeightedText>& runs, int pad_id,
                                       const ClipTokenizer& tok = ClipTokenizer::builtin(),
                                       const EmbeddingSet* embeddings = nullptr);
std::vector<TokenChunk> chunk_prompt(const std::string& prompt, int pad_id,
                                     const ClipTokenizer& tok = ClipTokenizer::builtin(),
                                     const EmbeddingSet* embeddings = nullptr);
TokenChunk empty_chunk(int pad_id, const ClipTokenizer& tok = ClipTokenizer::builtin());

// The pad token of a family's encoder (0 = first, 1 = SDXL's second).
int pad_token(Family family, int encoder, const ClipTokenizer& tok = ClipTokenizer::builtin());

// A1111 "Original" emphasis on one chunk's output, in place: z [.., T, C] (f32, T = weights.size())
// *= weight per token, then *= mean(z before) / mean(z after) over the whole tensor. A no-op when
// every weight is 1.
void apply_emphasis(Tensor& z, const std::vector<float>& weights);

// One side from token chunks (ids-level entry point): chunks for encoder 1, chunks2 for SDXL's
// encoder 2 (ignored otherwise). SDXL pads the encoder with fewer chunks with empty chunks (the
// two can differ where "!" tokenises differently). Returns context [1, 77·n, C] and, for SDXL,
// pooled [1, P] from the first chunk.
Conditioning encode_chunks(Ctx& ctx, const SDModel& model, const std::vector<TokenChunk>& chunks,
                           const std::vector<TokenChunk>& chunks2, const PromptOptions& opts);
// One side from a prompt (no negative handling, no padding to another side).
Conditioning encode_prompt(Ctx& ctx, const SDModel& model, const std::string& prompt, const PromptOptions& opts);

// The conditional and unconditional sides of guidance, padded to the same number of 77-token
// chunks (the shorter side with encodings of empty chunks, as A1111 does; SDXL's zero negative with
// zeros). For SD 1.x/2.x an empty negative prompt encodes "" (diffusers); for SDXL an empty
// negative prompt gives zero context and zero pooled output (force_zeros_for_empty_prompt).
// Outputs are owned tensors (batch 1; callers repeat them for a batch).
struct PromptPair {
  Conditioning cond, uncond;
};
PromptPair encode_prompts(Ctx& ctx, const SDModel& model, const std::string& prompt, const std::string& negative,
                          const PromptOptions& opts);

}  // namespace diffuse
