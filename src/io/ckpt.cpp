// PyTorch checkpoints (torch.save >= 1.6): a zip archive "<prefix>/data.pkl" + "<prefix>/data/<key>"
// storages (+ "version", "byteorder"). The pickle is interpreted by the restricted unpickler;
// contiguous tensors borrow their bytes straight from the STORED storage entries in the mapping.
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include "core/error.h"
#include "core/mapped_file.h"
#include "io/pickle.h"
#include "io/tensor_file.h"
#include "io/zip.h"

namespace diffuse {

namespace {

using pickle::Kind;
using pickle::Object;

constexpr uint64_t kMaxPickleBytes = 64ull << 20;           // data.pkl
constexpr uint64_t kMaxDeflatedStorageBytes = 2ull << 30;   // in total; storages are normally STORED
// Strided or misaligned tensors are copied. Many views of one storage could multiply a small
// file into huge copies, so copies may total at most the storage bytes available plus this.
constexpr uint64_t kCopySlack = 64ull << 20;

std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 200)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (s.size() > 200) out += "...";
  return out;
}

bool checked_mul(int64_t a, int64_t b, int64_t* r) { return !__builtin_mul_overflow(a, b, r); }
bool checked_add(int64_t a, int64_t b, int64_t* r) { return !__builtin_add_overflow(a, b, r); }

struct StorageBlock {
  std::shared_ptr<Storage> storage;
  const ZipEntry* entry = nullptr;
};

class CkptBuilder {
 public:
  CkptBuilder(const ZipReader& zip, std::string prefix, const std::string& path, std::shared_ptr<const void> keepalive,
              uint64_t archive_bytes, bool file_mapped)
      : zip_(zip), prefix_(std::move(prefix)), path_(path), keepalive_(std::move(keepalive)),
        copy_budget_(archive_bytes + kCopySlack), file_mapped_(file_mapped) {}

  // The same pickled tensor under several names is built once and shared.
  Tensor build(const std::string& name, const Object* t) {
    auto it = built_.find(t);
    if (it != built_.end()) return it->second;
    Tensor out = build_new(name, t);
    built_.emplace(t, out);
    return out;
  }

 private:
  void charge_copy(const std::string& tn, int64_t nbytes) {
    DF_CHECK(uint64_t(nbytes) <= copy_budget_, path_, ": tensor ", tn,
             ": copies of strided or misaligned tensors exceed the data in the file (one storage viewed too often)");
    copy_budget_ -= uint64_t(nbytes);
  }

  Tensor build_new(const std::string& name, const Object* t) {
    const std::string tn = printable(name);
    const Object* st = t->items[0];
    const Object* size = t->items[1];
    const Object* stride = t->items[2];
    const DType dt = st->dtype;
    const int64_t es = int64_t(dtype_size(dt));
    const int rank = int(size->items.size());
    DF_CHECK(rank <= Shape::kMaxDims, path_, ": tensor ", tn, " has rank ", rank, ", more than ", Shape::kMaxDims);
    DF_CHECK(int(stride->items.size()) == rank, path_, ": tensor ", tn, " has ", rank, " sizes but ",
             stride->items.size(), " strides");
    const int64_t offset = t->i;
    DF_CHECK(offset >= 0, path_, ": tensor ", tn, " has negative storage offset ", offset);
    std::vector<int64_t> dims(static_cast<size_t>(rank)), strides(static_cast<size_t>(rank));
    int64_t numel = 1;
    for (int d = 0; d < rank; ++d) {
      dims[size_t(d)] = size->items[size_t(d)]->i;
      strides[size_t(d)] = stride->items[size_t(d)]->i;
      DF_CHECK(dims[size_t(d)] >= 0, path_, ": tensor ", tn, " has negative size ", dims[size_t(d)]);
      DF_CHECK(strides[size_t(d)] >= 0, path_, ": tensor ", tn, " has negative stride ", strides[size_t(d)]);
      DF_CHECK(checked_mul(numel, dims[size_t(d)], &numel), path_, ": tensor ", tn, " element count overflows");
    }
    int64_t nbytes = 0;
    DF_CHECK(checked_mul(numel, es, &nbytes), path_, ": tensor ", tn, " byte size overflows");
    Shape shape(dims);
    StorageBlock& blk = storage_for(tn, st);
    if (numel == 0) return Tensor::empty(shape, dt);

    // Highest element index touched must lie inside the storage the pickle declared.
    int64_t last = offset;
    for (int d = 0; d < rank; ++d) {
      int64_t span = 0;
      DF_CHECK(checked_mul(dims[size_t(d)] - 1, strides[size_t(d)], &span) && checked_add(last, span, &last), path_,
               ": tensor ", tn, " extent overflows");
    }
    DF_CHECK(last < st->i, path_, ": tensor ", tn, " ", shape.str(), " at offset ", offset,
             " reaches element ", last, " beyond its storage of ", st->i, " elements");

    bool contiguous = true;
    int64_t expect = 1;
    for (int d = rank - 1; d >= 0; --d) {
      if (dims[size_t(d)] != 1 && strides[size_t(d)] != expect) contiguous = false;
      expect *= dims[size_t(d)];
    }
    const uint8_t* base = blk.storage->data();
    if (contiguous) {
      size_t off_bytes = size_t(offset) * size_t(es);
      if (reinterpret_cast<uintptr_t>(base + off_bytes) % uintptr_t(es) == 0)
        return Tensor(blk.storage, off_bytes, shape, dt);
      charge_copy(tn, nbytes);
      Tensor out = Tensor::empty(shape, dt);  // misaligned in the file: copy
      std::memcpy(out.data(), base + off_bytes, size_t(nbytes));
      return out;
    }
    // Strided view: gather into a dense row-major copy.
    charge_copy(tn, nbytes);
    Tensor out = Tensor::empty(shape, dt);
    uint8_t* dst = static_cast<uint8_t*>(out.data());
    std::vector<int64_t> idx(static_cast<size_t>(rank), 0);
    int64_t src = offset;
    for (int64_t n = 0; n < numel; ++n) {
      std::memcpy(dst + n * es, base + src * es, size_t(es));
      for (int d = rank - 1; d >= 0; --d) {
        if (++idx[size_t(d)] < dims[size_t(d)]) {
          src += strides[size_t(d)];
          break;
        }
        src -= (dims[size_t(d)] - 1) * strides[size_t(d)];
        idx[size_t(d)] = 0;
      }
    }
    return out;
  }

  StorageBlock& storage_for(const std::string& tn, const Object* st) {
    const std::string& key = st->items[0]->text;
    auto it = blocks_.find(key);
    StorageBlock* blk;
    if (it != blocks_.end()) {
      blk = &it->second;
    } else {
      std::string entry_name = prefix_ + "data/" + key;
      const ZipEntry* e = zip_.find(entry_name);
      DF_CHECK(e, path_, ": tensor ", tn, " refers to storage '", printable(key), "' but the archive has no entry ",
               printable(entry_name));
      StorageBlock b;
      b.entry = e;
      if (e->method == 0) {
        const uint8_t* p = zip_.stored_data(*e);
        b.storage = file_mapped_ ? Storage::borrow_file_mapping(p, size_t(e->uncompressed_size), keepalive_)
                                 : Storage::borrow(const_cast<uint8_t*>(p), size_t(e->uncompressed_size), keepalive_);
      } else {
        zip_.check_declared_size(*e, kMaxDeflatedStorageBytes - inflated_);
        inflated_ += e->uncompressed_size;
        copy_budget_ += e->uncompressed_size;
        b.storage = Storage::allocate(size_t(e->uncompressed_size));
        zip_.inflate_into(*e, b.storage->data(), true);
      }
      blk = &blocks_.emplace(key, std::move(b)).first->second;
    }
    int64_t need = 0;
    DF_CHECK(checked_mul(st->i, int64_t(dtype_size(st->dtype)), &need) && uint64_t(need) <= blk->entry->uncompressed_size,
             path_, ": tensor ", tn, " storage '", printable(key), "' declares ", st->i, " ", dtype_name(st->dtype),
             " elements but its entry holds only ", blk->entry->uncompressed_size, " bytes");
    return *blk;
  }

  const ZipReader& zip_;
  std::string prefix_;
  const std::string& path_;
  std::shared_ptr<const void> keepalive_;
  std::unordered_map<std::string, StorageBlock> blocks_;
  std::unordered_map<const Object*, Tensor> built_;
  uint64_t copy_budget_;
  uint64_t inflated_ = 0;
  bool file_mapped_ = false;
};

}  // namespace

TensorFile parse_ckpt(const uint8_t* data, size_t size, const std::string& path, std::shared_ptr<const void> keepalive,
                      bool file_mapped) {
  bool legacy_pickle = size >= 2 && data[0] == 0x80 && data[1] >= 2 && data[1] <= 5;
  bool tar = size >= 262 && std::memcmp(data + 257, "ustar", 5) == 0;
  DF_CHECK(!legacy_pickle && !tar, path,
           ": legacy PyTorch format not supported; re-save with torch>=1.6 or convert to safetensors");
  ZipReader zip(data, size, path);

  // data.pkl sits in the archive's single top folder (its name varies: "archive", the file stem).
  const ZipEntry* pkl = nullptr;
  std::string prefix;
  for (const ZipEntry& e : zip.entries()) {
    const std::string& n = e.name;
    constexpr std::string_view kPkl = "data.pkl";
    if (n.size() < kPkl.size() || n.compare(n.size() - kPkl.size(), kPkl.size(), kPkl) != 0) continue;
    std::string pre = n.substr(0, n.size() - kPkl.size());
    if (!pre.empty() && (pre.back() != '/' || pre.find('/') != pre.size() - 1)) continue;
    pkl = &e;
    prefix = std::move(pre);
    break;
  }
  DF_CHECK(pkl, path, ": not a PyTorch checkpoint: the zip archive has no <folder>/data.pkl");

  if (const ZipEntry* bo = zip.find(prefix + "byteorder")) {
    std::vector<uint8_t> b = zip.read(*bo, 64);
    std::string order(b.begin(), b.end());
    while (!order.empty() && (order.back() == '\n' || order.back() == '\r' || order.back() == ' ')) order.pop_back();
    DF_CHECK(order == "little", path, ": checkpoint byte order is '", printable(order),
             "'; only little-endian checkpoints are supported");
  }

  std::vector<uint8_t> pkl_bytes = zip.read(*pkl, kMaxPickleBytes);
  pickle::Unpickler unpickler(cat(path, ": ", printable(pkl->name)));
  const Object* root = unpickler.load(pkl_bytes.data(), pkl_bytes.size());
  DF_CHECK(root->is(Kind::Dict), path, ": checkpoint holds ", pickle::describe(root),
           ", expected a dict of tensors");
  const Object* dict = root;
  if (const Object* sd = root->get("state_dict"); sd && sd->is(Kind::Dict)) dict = sd;

  TensorFile tf;
  tf.path = path;
  tf.format = "ckpt";
  CkptBuilder builder(zip, prefix, path, std::move(keepalive), size, file_mapped);
  size_t skipped = 0;
  for (size_t i = 0; i + 1 < dict->items.size(); i += 2) {
    const Object* k = dict->items[i];
    const Object* v = dict->items[i + 1];
    if (!k->is(Kind::Str) || !v->is(Kind::Tensor)) {
      ++skipped;
      continue;
    }
    tf.tensors.push_back({k->text, builder.build(k->text, v)});
  }
  if (tf.tensors.empty()) {
    // No tensor at the top: files that nest their state dict under another key (BasicSR's
    // {"params_ema": {...}}, A1111 embeddings' {"string_to_param": {"*": tensor}}) get the nested
    // dicts' tensors named "outer.inner" (a few levels deep; the object graph may have cycles).
    skipped = 0;
    std::function<void(const Object*, const std::string&, int)> walk = [&](const Object* d, const std::string& pre,
                                                                           int depth) {
      for (size_t i = 0; i + 1 < d->items.size(); i += 2) {
        const Object* k = d->items[i];
        const Object* v = d->items[i + 1];
        if (k->is(Kind::Str) && v->is(Kind::Tensor)) {
          const std::string name = pre + k->text;
          tf.tensors.push_back({name, builder.build(name, v)});
        } else if (k->is(Kind::Str) && v->is(Kind::Dict) && depth < 3) {
          walk(v, pre + k->text + ".", depth + 1);
        } else {
          ++skipped;
        }
      }
    };
    walk(dict, "", 0);
  }
  if (skipped)
    tf.warnings.push_back(cat(skipped, " non-tensor value", skipped == 1 ? "" : "s", " in the ",
                              dict == root ? "checkpoint" : "state_dict", " skipped"));
  tf.build_index();
  return tf;
}

TensorFile load_ckpt(const std::string& path) {
  std::shared_ptr<MappedFile> f = MappedFile::open(path);
  return parse_ckpt(f->data(), f->size(), path, f, /*file_mapped=*/true);
}

}  // namespace diffuse
