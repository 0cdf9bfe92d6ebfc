#include "core/tensor.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>

#include "core/error.h"

namespace diffuse {

Shape::Shape(std::initializer_list<int64_t> dims) {
  DF_CHECK(dims.size() <= kMaxDims, "tensor rank ", dims.size(), " exceeds ", kMaxDims);
  for (int64_t d : dims) d_[rank_++] = d;
}

Shape::Shape(const std::vector<int64_t>& dims) {
  DF_CHECK(dims.size() <= kMaxDims, "tensor rank ", dims.size(), " exceeds ", kMaxDims);
  for (int64_t d : dims) d_[rank_++] = d;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank_; ++i) n *= d_[i];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (rank_ != o.rank_) return false;
  for (int i = 0; i < rank_; ++i)
    if (d_[i] != o.d_[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < rank_; ++i) os << (i ? ", " : "") << d_[i];
  os << ']';
  return os.str();
}

namespace {
class HeapStorage : public Storage {
 public:
  explicit HeapStorage(size_t bytes) {
    size_t padded = (bytes + 63) / 64 * 64;
    if (padded == 0) padded = 64;
    data_ = static_cast<uint8_t*>(std::aligned_alloc(64, padded));
    if (!data_) throw Error(cat("out of memory allocating ", bytes, " bytes"));
    bytes_ = bytes;
  }
  ~HeapStorage() override { std::free(data_); }
};

class BorrowedStorage : public Storage {
 public:
  BorrowedStorage(void* data, size_t bytes, std::shared_ptr<const void> owner) : owner_(std::move(owner)) {
    data_ = static_cast<uint8_t*>(data);
    bytes_ = bytes;
  }
  void mark_file_mapping() { file_mapping_ = true; }
 private:
  std::shared_ptr<const void> owner_;
};
}  // namespace

std::shared_ptr<Storage> Storage::allocate(size_t bytes) { return std::make_shared<HeapStorage>(bytes); }

std::shared_ptr<Storage> Storage::borrow(void* data, size_t bytes, std::shared_ptr<const void> owner) {
  return std::make_shared<BorrowedStorage>(data, bytes, std::move(owner));
}

std::shared_ptr<Storage> Storage::borrow_file_mapping(const void* data, size_t bytes, std::shared_ptr<const void> owner) {
  auto s = std::make_shared<BorrowedStorage>(const_cast<void*>(data), bytes, std::move(owner));
  s->mark_file_mapping();
  return s;
}

void Storage::drop_pages(size_t offset, size_t bytes) const {
  if (!file_mapping_ || bytes == 0 || offset >= bytes_) return;
  bytes = std::min(bytes, bytes_ - offset);
  // Whole pages covering the range: neighbours sharing an edge page lose it too, which only means
  // re-reading it from the file (the mapping is read-only and private, never written).
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  uintptr_t begin = uintptr_t(data_ + offset) & ~(page - 1);
  uintptr_t end = uintptr_t(data_ + offset + bytes);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

Tensor::Tensor(std::shared_ptr<Storage> storage, size_t offset_bytes, Shape shape, DType dtype)
    : storage_(std::move(storage)), offset_(offset_bytes), shape_(shape), dtype_(dtype) {
  DF_ASSERT(offset_ + bytes() <= storage_->bytes());
}

Tensor Tensor::empty(const Shape& shape, DType dtype) {
  for (int i = 0; i < shape.rank(); ++i) DF_CHECK(shape[i] >= 0, "negative dimension in shape ", shape.str());
  return Tensor(Storage::allocate(size_t(shape.numel()) * dtype_size(dtype)), 0, shape, dtype);
}

Tensor Tensor::zeros(const Shape& shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  std::memset(t.data(), 0, t.bytes());
  return t;
}

Tensor Tensor::full(const Shape& shape, float value) {
  Tensor t = empty(shape, DType::F32);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = value;
  return t;
}

Tensor Tensor::borrow(void* data, const Shape& shape, DType dtype, std::shared_ptr<const void> owner) {
  size_t n = size_t(shape.numel()) * dtype_size(dtype);
  return Tensor(Storage::borrow(data, n, std::move(owner)), 0, shape, dtype);
}

float* Tensor::f32() const {
  DF_CHECK(dtype_ == DType::F32, "expected an f32 tensor, got ", str());
  return data<float>();
}

Tensor Tensor::reshape(const Shape& s) const {
  DF_CHECK(s.numel() == numel(), "cannot reshape ", str(), " to ", s.str());
  return Tensor(storage_, offset_, s, dtype_);
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  DF_CHECK(rank() >= 1 && begin >= 0 && begin <= end && end <= dim(0), "bad slice [", begin, ", ", end,
           ") of ", str());
  Shape s = shape_;
  s[0] = end - begin;
  size_t row = size_t(numel() / (dim(0) ? dim(0) : 1)) * dtype_size(dtype_);
  return Tensor(storage_, offset_ + size_t(begin) * row, s, dtype_);
}

Tensor Tensor::to(DType t) const {
  Tensor out = empty(shape_, t);
  convert(data(), dtype_, out.data(), t, size_t(numel()));
  return out;
}

void Tensor::copy_from(const Tensor& src) {
  DF_CHECK(src.numel() == numel(), "copy from ", src.str(), " into ", str(), ": element counts differ");
  convert(src.data(), src.dtype(), data(), dtype_, size_t(numel()));
}

std::string Tensor::str() const { return cat(dtype_name(dtype_), shape_.str()); }

}  // namespace diffuse
