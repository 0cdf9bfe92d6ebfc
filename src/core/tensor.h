// Tensor: a shape, an element type and a view into storage that is owned (aligned heap),
// borrowed (a memory-mapped file region kept alive by the view) or arena-backed (activations).
// Tensors are always dense and row-major; the engine keeps image activations as NHWC so that
// the transformer blocks' [N, H*W, C] view is free. Storage is shared and reference-counted, so
// a training pass can keep the activations its backward pass needs simply by holding tensors.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace diffuse {

// Up to 8 dimensions, stored inline.
class Shape {
 public:
  static constexpr int kMaxDims = 8;
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  explicit Shape(const std::vector<int64_t>& dims);
  int rank() const { return rank_; }
  int64_t operator[](int i) const { return d_[i < 0 ? i + rank_ : i]; }
  int64_t& operator[](int i) { return d_[i < 0 ? i + rank_ : i]; }
  int64_t numel() const;
  std::vector<int64_t> vec() const { return {d_.begin(), d_.begin() + rank_}; }
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string str() const;  // "[2, 320, 64, 64]"
 private:
  std::array<int64_t, kMaxDims> d_{};
  int rank_ = 0;
};

// A block of bytes. Subclasses own or borrow; `keepalive` lets a borrowed block keep its
// source (an mmapped file) alive.
class Storage {
 public:
  virtual ~Storage() = default;
  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  // Aligned heap storage (64 bytes), uninitialised.
  static std::shared_ptr<Storage> allocate(size_t bytes);
  // Non-owning view of memory kept alive by `owner` (may be null for memory the caller manages).
  static std::shared_ptr<Storage> borrow(void* data, size_t bytes, std::shared_ptr<const void> owner);
  // Like borrow(), for a read-only file mapping (MAP_PRIVATE, PROT_READ): its pages may be dropped
  // from the process (drop_pages) and are read back from the file on the next access.
  static std::shared_ptr<Storage> borrow_file_mapping(const void* data, size_t bytes, std::shared_ptr<const void> owner);
  // For file-mapped storage: hands the pages of [offset, offset + bytes) back to the kernel (they
  // stop counting as this process's memory; reading them again re-reads the file). No-op otherwise.
  void drop_pages(size_t offset, size_t bytes) const;
 protected:
  uint8_t* data_ = nullptr;
  size_t bytes_ = 0;
  bool file_mapping_ = false;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, size_t offset_bytes, Shape shape, DType dtype);

  static Tensor empty(const Shape& shape, DType dtype = DType::F32);
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32);
  static Tensor full(const Shape& shape, float value);  // f32
  // Borrow caller memory (no copy); `owner` keeps it alive.
  static Tensor borrow(void* data, const Shape& shape, DType dtype, std::shared_ptr<const void> owner = nullptr);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  int64_t dim(int i) const { return shape_[i]; }
  int64_t numel() const { return shape_.numel(); }
  DType dtype() const { return dtype_; }
  size_t bytes() const { return size_t(numel()) * dtype_size(dtype_); }

  void* data() const { return storage_->data() + offset_; }
  template <typename T> T* data() const { return reinterpret_cast<T*>(data()); }
  float* f32() const;  // checked: throws if dtype is not f32

  // Same data, new shape (numel must match).
  Tensor reshape(const Shape& s) const;
  // Rows [begin, end) along dim 0, sharing storage.
  Tensor slice0(int64_t begin, int64_t end) const;
  // A new tensor of dtype `t` (a copy, even when t == dtype()).
  Tensor to(DType t) const;
  Tensor clone() const { return to(dtype_); }
  // Drops this tensor's pages from memory if it borrows a read-only file mapping (Storage::drop_pages).
  void drop_pages() const {
    if (storage_) storage_->drop_pages(offset_, bytes());
  }
  void copy_from(const Tensor& src);  // same numel; converts dtype
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  std::string str() const;  // "f32[2, 4, 8, 8]"

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  Shape shape_;
  DType dtype_ = DType::F32;
};

}  // namespace diffuse
