// Test helper: writes a PyTorch (torch.save >= 1.6) zip checkpoint of f32 tensors, grouped in
// nested dicts as BasicSR saves {"params_ema": {name: tensor}, "params": {...}} (an empty group
// name puts its tensors at the top level). Stored (uncompressed) entries with CRC-32s, each
// storage 64-byte aligned as torch writes them; data.pkl uses protocol 2 opcodes.
#pragma once
#include <zlib.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace torch_pth {

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};
using Group = std::pair<std::string, std::vector<Tensor>>;  // (dict key or "", tensors)

namespace detail {

inline void le(std::string& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(char(uint8_t(v >> (8 * i))));
}

// Pickle opcodes (pickletools names in comments).
struct Pickle {
  std::string b;
  void op(char c) { b.push_back(c); }
  void text(const std::string& s) {  // BINUNICODE
    op('X');
    le(b, s.size(), 4);
    b += s;
  }
  void num(int64_t v) {  // BININT
    op('J');
    le(b, uint64_t(v), 4);
  }
  void global(const std::string& module, const std::string& name) { b += "c" + module + "\n" + name + "\n"; }
  // torch._utils._rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), 0, size, stride,
  // False, OrderedDict())
  void tensor(const Tensor& t, const std::string& key) {
    global("torch._utils", "_rebuild_tensor_v2");
    op('(');  // MARK
    op('(');
    text("storage");
    global("torch", "FloatStorage");
    text(key);
    text("cpu");
    num(int64_t(t.values.size()));
    op('t');  // TUPLE
    op('Q');  // BINPERSID
    num(0);
    op('(');
    for (int64_t d : t.shape) num(d);
    op('t');
    op('(');
    int64_t stride = 1;
    std::vector<int64_t> strides(t.shape.size());
    for (size_t i = t.shape.size(); i-- > 0;) {
      strides[i] = stride;
      stride *= t.shape[i];
    }
    for (int64_t s : strides) num(s);
    op('t');
    op('\x89');  // NEWFALSE
    global("collections", "OrderedDict");
    op(')');  // EMPTY_TUPLE
    op('R');  // REDUCE
    op('t');
    op('R');
  }
};

struct ZipOut {
  std::string out, central;
  int count = 0;
  void add(const std::string& name, const std::string& data) {
    const uint32_t crc = uint32_t(crc32(0, reinterpret_cast<const Bytef*>(data.data()), uInt(data.size())));
    const size_t header_end = out.size() + 30 + name.size();
    const size_t pad = (64 - (header_end + 4) % 64) % 64;  // extra field: 4-byte header + padding
    const uint64_t offset = out.size();
    le(out, 0x04034b50, 4);
    le(out, 20, 2);
    le(out, 0, 2);
    le(out, 0, 2);  // stored
    le(out, 0, 4);  // time, date
    le(out, crc, 4);
    le(out, data.size(), 4);
    le(out, data.size(), 4);
    le(out, name.size(), 2);
    le(out, 4 + pad, 2);
    out += name;
    le(out, 0xcafe, 2);
    le(out, pad, 2);
    out.append(pad, 'Z');
    out += data;
    le(central, 0x02014b50, 4);
    le(central, 20, 2);
    le(central, 20, 2);
    le(central, 0, 2);
    le(central, 0, 2);
    le(central, 0, 4);
    le(central, crc, 4);
    le(central, data.size(), 4);
    le(central, data.size(), 4);
    le(central, name.size(), 2);
    le(central, 0, 2);
    le(central, 0, 2);
    le(central, 0, 2);
    le(central, 0, 2);
    le(central, 0, 4);
    le(central, offset, 4);
    central += name;
    ++count;
  }
  std::string finish() {
    const uint64_t cd = out.size();
    std::string r = out + central;
    le(r, 0x06054b50, 4);
    le(r, 0, 2);
    le(r, 0, 2);
    le(r, uint64_t(count), 2);
    le(r, uint64_t(count), 2);
    le(r, central.size(), 4);
    le(r, cd, 4);
    le(r, 0, 2);
    return r;
  }
};

}  // namespace detail

inline std::string bytes(const std::vector<Group>& groups) {
  detail::Pickle p;
  p.b = "\x80\x02";  // PROTO 2
  p.op('}');         // EMPTY_DICT
  p.op('(');
  std::vector<std::pair<std::string, const Tensor*>> storages;
  auto put = [&](const Tensor& t) {
    const std::string key = std::to_string(storages.size());
    storages.emplace_back(key, &t);
    p.text(t.name);
    p.tensor(t, key);
  };
  for (const Group& g : groups) {
    if (g.first.empty()) {
      for (const Tensor& t : g.second) put(t);
      continue;
    }
    p.text(g.first);
    p.op('}');
    p.op('(');
    for (const Tensor& t : g.second) put(t);
    p.op('u');  // SETITEMS
  }
  p.op('u');
  p.op('.');  // STOP
  detail::ZipOut z;
  z.add("archive/data.pkl", p.b);
  for (const auto& [key, t] : storages)
    z.add("archive/data/" + key, std::string(reinterpret_cast<const char*>(t->values.data()), t->values.size() * 4));
  z.add("archive/version", "3\n");
  return z.finish();
}

inline void write(const std::string& path, const std::vector<Group>& groups) {
  const std::string b = bytes(groups);
  std::ofstream f(path, std::ios::binary);
  f.write(b.data(), std::streamsize(b.size()));
}

}  // namespace torch_pth
