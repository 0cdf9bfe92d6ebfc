// TensorFile lookups and the format dispatcher.
#include "io/tensor_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace diffuse {

const Tensor* TensorFile::find(const std::string& name) const {
  auto it = index_.find(name);
  if (it != index_.end()) return &tensors[it->second].tensor;
  // Readers call build_index(); a TensorFile assembled by hand may not have.
  if (index_.size() != tensors.size())
    for (const auto& e : tensors)
      if (e.name == name) return &e.tensor;
  return nullptr;
}

void TensorFile::build_index() {
  index_.clear();
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!index_.emplace(tensors[i].name, i).second) {
      index_.clear();
      fail(path, ": duplicate tensor name '", tensors[i].name, "'");
    }
  }
}

TensorFile open_model_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) fail(path, ": no such file or directory");
    fail(path, ": cannot access: ", std::strerror(errno));
  }
  if (S_ISDIR(st.st_mode)) return load_diffusers(path);

  unsigned char magic[9] = {};
  ssize_t got = 0;
  {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
    while (got < ssize_t(sizeof magic)) {
      ssize_t r = ::read(fd, magic + got, sizeof magic - size_t(got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      got += r;
    }
    ::close(fd);
  }
  // PyTorch >= 1.6 saves a zip archive ("PK\x03\x04"; "PK\x05\x06" for an empty one).
  if (got >= 4 && magic[0] == 'P' && magic[1] == 'K' &&
      ((magic[2] == 3 && magic[3] == 4) || (magic[2] == 5 && magic[3] == 6)))
    return load_ckpt(path);
  // A safetensors header starts with '{' right after the 8-byte length.
  if (got >= 9 && magic[8] == '{') return load_safetensors(path);
  // Legacy (pre-1.6) torch.save output starts with a pickle protocol opcode; let the ckpt reader
  // explain what it does and does not support.
  if (got >= 2 && magic[0] == 0x80 && magic[1] >= 2 && magic[1] <= 5) return load_ckpt(path);
  return load_safetensors(path);  // its checks name the problem
}

}  // namespace diffuse
