// CLIP byte-level BPE tokenizer, as used by every Stable Diffusion text encoder (SD 1.x, SD 2.x,
// both SDXL encoders). Semantics follow OpenAI CLIP's simple_tokenizer and Hugging Face's
// CLIPTokenizer as diffusers uses it:
//   text cleanup   HTML unescape (twice), Unicode NFC, whitespace runs -> one space, strip, lower-case
//   pre-tokenise   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+
//   BPE            each piece's UTF-8 bytes -> GPT-2 byte symbols, "</w>" on the last, merge by rank
// Ids of the built-in vocabulary (the original bpe_simple_vocab_16e6.txt.gz, embedded in the binary):
// 256 byte symbols, the same 256 with "</w>", 48894 merges in file order, then <|startoftext|> 49406
// and <|endoftext|> 49407.
//
// Invalid UTF-8 in a prompt is not an error: each maximal invalid subsequence becomes U+FFFD before
// cleanup (as Python's errors="replace").
//
// Pad modes: SD 1.x and SDXL encoder 1 pad with <|endoftext|>; SD 2.x and SDXL encoder 2 pad with
// "!" (id 0). diffusers registers the "!" pad token as a special token there, so in that mode every
// "!" in the raw text is split out first and becomes its own id 0 ("HAT!!" -> ..., 0, 0).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace diffuse {

class ClipTokenizer {
 public:
  static constexpr int kContextLength = 77;

  // The embedded CLIP vocabulary (decompressed and parsed on first use; thread-safe).
  static const ClipTokenizer& builtin();
  // A diffusers tokenizer folder: vocab.json + merges.txt, or tokenizer.json (model.vocab,
  // model.merges as "a b" strings or [a, b] pairs). If `dir` has neither but has a "tokenizer"
  // subfolder, that is used.
  static ClipTokenizer from_diffusers_dir(const std::string& dir);

  ClipTokenizer(ClipTokenizer&&) noexcept;
  ClipTokenizer& operator=(ClipTokenizer&&) noexcept;
  ~ClipTokenizer();

  // BOS + tokens + EOS, no truncation.
  std::vector<int> encode(const std::string& text, bool bang_is_pad = false) const;
  // Truncated to `length` keeping BOS first and EOS last (at most length-2 content tokens), then
  // padded with pad_id. pad_id == bang_id() selects the "!"-is-special mode described above.
  std::vector<int> encode_padded(const std::string& text, int pad_id,
                                 int length = kContextLength) const;
  // Content tokens only (no BOS/EOS), e.g. for prompt-weighting chunks.
  std::vector<int> tokenize(const std::string& text, bool bang_is_pad = false) const;
  // Ids back to text: BOS/EOS skipped, "</w>" -> space, ends stripped, bad UTF-8 -> U+FFFD.
  std::string decode(const std::vector<int>& ids) const;

  int bos_id() const;
  int eos_id() const;
  int bang_id() const;  // id of "!" (0 in the CLIP vocabulary)
  int vocab_size() const;
  const std::string& token(int id) const;         // token string (byte symbols), throws if out of range
  int token_id(const std::string& token) const;  // -1 when absent

  // BPE of one pre-tokenised piece (raw UTF-8 bytes; special tokens map to their ids). Cached.
  std::vector<int> bpe(const std::string& piece) const;

  // ---- pieces, exposed for tests ----
  // Replace invalid UTF-8 with U+FFFD (one per maximal invalid subsequence, as Python does).
  static std::string sanitize_utf8(std::string_view s);
  // html.unescape: numeric references and common named entities.
  static std::string html_unescape(std::string_view s);
  // The whole cleanup: sanitize, unescape x2, NFC, whitespace collapse + strip, lower-case.
  static std::string clean_text(std::string_view s);
  // The pre-tokenisation regex over cleaned text.
  static std::vector<std::string> pre_tokenize(std::string_view cleaned);
  // GPT-2 bytes_to_unicode: each byte -> one code point (UTF-8 encoded), and back.
  static std::string bytes_to_symbols(std::string_view bytes);
  static std::string symbols_to_bytes(std::string_view symbols);  // throws on a non-byte symbol

  struct Impl;

 private:
  explicit ClipTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

namespace detail {
// The embedded gzip file and its decompressed text (clip_vocab.cpp).
std::string_view clip_vocab_gz();
std::string clip_vocab_text();
}  // namespace detail

}  // namespace diffuse
