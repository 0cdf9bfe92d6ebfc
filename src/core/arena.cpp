#include "core/arena.h"

#include <algorithm>

#include "core/error.h"

namespace diffuse {

Arena::Arena(size_t initial_bytes) {
  if (initial_bytes) {
    chunks_.push_back({Storage::allocate(initial_bytes), 0});
    ++heap_allocs_;
  }
}

void* Arena::alloc_bytes(size_t bytes) {
  size_t need = (bytes + 63) / 64 * 64;
  if (need == 0) need = 64;
  if (chunks_.empty() || chunks_.back().used + need > chunks_.back().mem->bytes()) {
    size_t last = chunks_.empty() ? 0 : chunks_.back().mem->bytes();
    size_t size = std::max({need, last * 2, size_t(1) << 20});
    chunks_.push_back({Storage::allocate(size), 0});
    ++heap_allocs_;
  }
  Chunk& c = chunks_.back();
  void* p = c.mem->data() + c.used;
  c.used += need;
  used_total_ += need;
  peak_ = std::max(peak_, used_total_);
  return p;
}

Tensor Arena::alloc(const Shape& shape, DType dtype) {
  size_t bytes = size_t(shape.numel()) * dtype_size(dtype);
  void* p = alloc_bytes(bytes);
  // The view keeps no reference to the arena: arena memory lives until reset().
  return Tensor::borrow(p, shape, dtype);
}

void Arena::reset() {
  if (chunks_.size() > 1) {
    // Coalesce into one block big enough for the peak so the next pass never allocates.
    size_t total = peak_;
    chunks_.clear();
    chunks_.push_back({Storage::allocate(total), 0});
    ++heap_allocs_;
  }
  for (Chunk& c : chunks_) c.used = 0;
  used_total_ = 0;
}

size_t Arena::capacity() const {
  size_t n = 0;
  for (const Chunk& c : chunks_) n += c.mem->bytes();
  return n;
}

}  // namespace diffuse
