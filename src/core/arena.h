// Arena for activations: bump allocation, reset between forward passes. After the first pass
// the arena coalesces its chunks into one block sized for the peak, so every later pass of the
// same shape does no heap allocation at all.
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

#include "core/tensor.h"

namespace diffuse {

class Arena {
 public:
  explicit Arena(size_t initial_bytes = 0);
  // A tensor backed by arena memory (64-byte aligned). Valid until reset().
  Tensor alloc(const Shape& shape, DType dtype = DType::F32);
  void* alloc_bytes(size_t bytes);
  // Release everything allocated since construction/the last reset (tensors from before become
  // dangling: callers must not keep them).
  void reset();
  size_t used() const { return used_total_; }
  size_t peak() const { return peak_; }
  size_t capacity() const;
  size_t heap_allocations() const { return heap_allocs_; }  // chunks ever allocated
 private:
  struct Chunk {
    std::shared_ptr<Storage> mem;
    size_t used = 0;
  };
  std::vector<Chunk> chunks_;
  size_t used_total_ = 0, peak_ = 0, heap_allocs_ = 0;
};

}  // namespace diffuse
