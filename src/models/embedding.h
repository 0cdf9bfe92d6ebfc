// Textual-inversion embeddings: files of learned token vectors that a prompt uses by name, in the
// formats A1111 (modules/textual_inversion) and diffusers read:
//  - A1111 / original textual inversion `.pt` / `.bin`: {"string_to_param": {"*": [n, W]}, "name", "step", ...}
//  - `.safetensors` with one tensor (A1111's `emb_params` [n, W], any name), or a diffusers
//    `learned_embeds.safetensors` / `.bin` {"<token>": [W] or [n, W]}
//  - SDXL pairs: {"clip_l": [n, 768], "clip_g": [n, 1280]} (safetensors or .pt)
// The name used in prompts is the file's stem (A1111), matched on tokens: wherever the prompt's
// tokens contain the tokenised name, those tokens are replaced by the embedding's n vectors (each
// with the weight of the text it stood in), taking n positions of the 75-token chunk (a chunk that
// cannot hold them all is closed first). ComfyUI's `embedding:NAME` (NAME with or without an
// extension) is accepted too.
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "models/family.h"
#include "models/tokenizer.h"

namespace diffuse {

struct Embedding {
  std::string name;  // the file's stem
  std::string path;
  // vec[0]: f32 [n, W] for the first (or only) text encoder; vec[1]: SDXL's clip_g [n, 1280]
  // (undefined for single-encoder files).
  Tensor vec[2];
  int vectors() const { return int(vec[0].dim(0)); }
  bool sdxl() const { return vec[1].defined(); }
  // The vectors for `family`'s encoder e (0, or 1 for SDXL's second) of width `width`; throws
  // diffuse::Error naming the file and what was expected when the file is for another architecture.
  const Tensor& for_encoder(Family family, int e, int64_t width) const;
  // "SD 1.x (768)", "SDXL (clip_l 768 + clip_g 1280)": what `diffuse info` shows.
  std::string describe() const;
};

// Reads one embedding file; throws diffuse::Error naming the file when it is unreadable or not an
// embedding in one of the formats above (more than one tensor that is not a clip_l/clip_g pair, a
// vector that is not 1-D or 2-D, more than 75 vectors, non-finite values).
Embedding load_embedding(const std::string& path);

// The embeddings a run can use: the files in a folder (and its subfolders, as A1111), listed by
// name; each is read the first time a prompt uses it. Thread-safe.
class EmbeddingSet {
 public:
  EmbeddingSet() = default;
  // Files *.pt, *.bin, *.safetensors under `dir` (up to 64 MB each: larger ones are models, not
  // embeddings). A missing folder gives an empty set. Names are the stems; of two files with one
  // stem the first in path order is used.
  static std::shared_ptr<EmbeddingSet> from_dir(const std::string& dir);
  // An already-loaded embedding (tests, the C API).
  void add(Embedding e);

  bool empty() const { return files_.empty(); }
  std::vector<std::string> names() const;
  const std::string& dir() const { return dir_; }

  // The embedding whose tokenised name starts at tokens[pos] (the longest such name), with the
  // number of tokens it covers; {nullptr, 0} if none. Loads it on first use; a file that is not an
  // embedding (a LoRA beside the model, a corrupt file) is skipped from then on, its name left as
  // text, and reported once through take_warnings(). bang_is_pad: the tokenisation mode of the
  // encoder (tokenizer.h).
  // Names are tokenised with the built-in CLIP vocabulary (the one prompts are encoded with).
  std::pair<const Embedding*, int> match(const std::vector<int>& tokens, size_t pos, bool bang_is_pad) const;

  // Rewrites ComfyUI's "embedding:NAME" (NAME possibly with .pt/.safetensors/.bin) to NAME when NAME
  // is in the set; an unknown NAME is left as text and reported through `unknown`.
  std::string rewrite_prefixed(const std::string& prompt, std::vector<std::string>* unknown) const;

  // Every embedding a prompt uses, in order of first use (names matched on the tokens of the whole
  // text: weighting brackets and colons tokenise apart from the words they enclose). Loads them
  // (throws as load_embedding()).
  std::vector<const Embedding*> used_in(const std::string& prompt) const;

  // The embedding called `name` (loaded now if needed); null when there is none or the file is not
  // an embedding (reported through take_warnings()).
  const Embedding* find(const std::string& name) const;

  // Files that failed to load since the last call: "<file>: <problem> (its name is left as text)".
  std::vector<std::string> take_warnings() const;

 private:
  struct File {
    std::string name, path;
    std::vector<int> ids[2];  // tokenised name: [0] normal, [1] "!"-is-pad mode
    mutable std::unique_ptr<Embedding> loaded;
    mutable bool failed = false;
  };
  void add_file(const std::string& name, const std::string& path, std::unique_ptr<Embedding> e);
  const Embedding* get(const File& f) const;  // null when the file is not an embedding

  std::string dir_;
  std::vector<std::unique_ptr<File>> files_;
  std::map<std::string, size_t> by_name_;
  mutable std::vector<std::string> warnings_;
  mutable std::mutex mu_;
};

}  // namespace diffuse
