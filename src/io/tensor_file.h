// Model files: a flat, ordered set of named tensors plus string metadata, from any layout users
// have: safetensors, PyTorch .ckpt/.pt (zip + pickle), or a diffusers folder (whose tensors are
// named "<component>/<name>", e.g. "unet/conv_in.weight").
//
// All readers validate everything before touching tensor data and throw diffuse::Error with a
// one-line message that starts with the file path and names the problem (and tensor if any).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace diffuse {

struct TensorEntry {
  std::string name;
  Tensor tensor;  // borrowed from the mmapped file where the layout allows, else owned
};

struct TensorFile {
  std::string path;
  std::string format;  // "safetensors", "ckpt", "diffusers"
  std::vector<TensorEntry> tensors;                 // file order (diffusers: component order)
  std::map<std::string, std::string> metadata;      // safetensors __metadata__, diffusers configs
  std::vector<std::string> warnings;                // non-fatal oddities worth reporting

  const Tensor* find(const std::string& name) const;  // nullptr if absent
  size_t size() const { return tensors.size(); }
  void build_index();  // called by readers; throws on duplicate names
 private:
  std::map<std::string, size_t> index_;
};

// safetensors (src/io/safetensors.cpp)
TensorFile load_safetensors(const std::string& path);
// Validates a safetensors buffer (header + offsets) without a file; used by load_safetensors and
// the fuzzer. `keepalive` owns `data` (may be null if the caller outlives the result).
// file_mapped: `data` is a read-only file mapping, so tensors may drop their pages (Tensor::drop_pages).
TensorFile parse_safetensors(const uint8_t* data, size_t size, const std::string& path,
                             std::shared_ptr<const void> keepalive, bool file_mapped = false);
// Writes atomically (path + ".tmp", then rename), streaming tensor data. Tensors are stored in the
// given order, stably regrouped by element size (8-byte types first) so every tensor is aligned;
// read back, file order is that data order.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// PyTorch checkpoints (src/io/ckpt.cpp, zip.cpp, pickle.cpp)
TensorFile load_ckpt(const std::string& path);
// Parses a checkpoint held in memory (zip + data.pkl); contiguous tensors borrow from `data`
// and keep `keepalive` alive (may be null if the caller outlives the result). Used by
// load_ckpt and the fuzzer.
TensorFile parse_ckpt(const uint8_t* data, size_t size, const std::string& path,
                      std::shared_ptr<const void> keepalive, bool file_mapped = false);

// diffusers folders (src/io/diffusers.cpp): model_index.json + per-component folders with
// *.safetensors (or sharded *.safetensors.index.json); configs land in metadata as
// "<component>/config.json" -> JSON text.
TensorFile load_diffusers(const std::string& dir);
bool is_diffusers_dir(const std::string& path);

// Any of the above, chosen from what the path is (directory, zip magic, safetensors header).
TensorFile open_model_file(const std::string& path);

}  // namespace diffuse
