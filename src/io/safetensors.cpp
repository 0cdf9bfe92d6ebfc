// safetensors: an 8-byte little-endian header length, a JSON header mapping tensor names to
// {dtype, shape, data_offsets} (plus an optional "__metadata__" string map), then the data area.
// Everything in the header is validated before any tensor is created; tensors borrow the mapped
// file (no copy) unless their address is not aligned to their element size.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/text.h"
#include "core/mapped_file.h"
#include "io/output_file.h"
#include "io/tensor_file.h"

namespace diffuse {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // 100 MB: real headers are well under 1 MB

using json = nlohmann::json;

bool dtype_from_safetensors(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> kNames[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16}, {"F64", DType::F64},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16},   {"I8", DType::I8},
      {"U8", DType::U8},   {"BOOL", DType::Bool},
  };
  for (const auto& [name, t] : kNames) {
    if (s == name) {
      *out = t;
      return true;
    }
  }
  return false;
}

const char* safetensors_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::Bool: return "BOOL";
  }
  return "?";
}

// nlohmann messages start with "[json.exception.parse_error.101] "; drop that part.
std::string json_reason(const json::exception& e) {
  std::string s = e.what();
  size_t p = s.find("] ");
  if (s.rfind("[json.exception", 0) == 0 && p != std::string::npos) s = s.substr(p + 2);
  return printable(s);
}

struct Entry {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  uint64_t begin = 0, end = 0;
};

// Reads one JSON integer that must be >= 0 and fit in int64.
// Returns false with *why set if it is not.
bool nonneg_int(const json& v, uint64_t* out, const char** why) {
  if (!v.is_number_integer()) {
    *why = "is not an integer";
    return false;
  }
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > uint64_t(std::numeric_limits<int64_t>::max())) {
      *why = "is too large";
      return false;
    }
    *out = u;
    return true;
  }
  int64_t i = v.get<int64_t>();
  if (i < 0) {
    *why = "is negative";
    return false;
  }
  *out = uint64_t(i);
  return true;
}

Entry parse_entry(const std::string& path, const std::string& name, const json& v, uint64_t data_size) {
  const std::string where = cat(path, ": tensor '", printable(name), "': ");
  DF_CHECK(v.is_object(), where, "header entry is not a JSON object");
  Entry e;
  e.name = name;

  auto dt = v.find("dtype");
  DF_CHECK(dt != v.end(), where, "header entry is missing \"dtype\"");
  DF_CHECK(dt->is_string(), where, "\"dtype\" is not a string");
  const std::string& dts = dt->get_ref<const std::string&>();
  DF_CHECK(dtype_from_safetensors(dts, &e.dtype), where, "unsupported dtype ", printable(dts),
           " (supported: F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL)");

  auto sh = v.find("shape");
  DF_CHECK(sh != v.end(), where, "header entry is missing \"shape\"");
  DF_CHECK(sh->is_array(), where, "\"shape\" is not an array");
  DF_CHECK(sh->size() <= size_t(Shape::kMaxDims), where, "shape has ", sh->size(), " dimensions, more than the ",
           Shape::kMaxDims, " supported");
  std::vector<int64_t> dims;
  // The product of the non-zero dimensions must fit in int64 (code multiplies dims in any order),
  // even when a zero dimension makes the tensor empty.
  uint64_t product = 1;
  bool overflow = false, has_zero = false;
  for (size_t i = 0; i < sh->size(); ++i) {
    uint64_t d = 0;
    const char* why = "";
    DF_CHECK(nonneg_int((*sh)[i], &d, &why), where, "shape dimension ", i, " (",
             printable((*sh)[i].dump().substr(0, 40)), ") ", why);
    dims.push_back(int64_t(d));
    if (d == 0) has_zero = true;
    else if (__builtin_mul_overflow(product, d, &product)) overflow = true;
  }
  uint64_t numel = has_zero ? 0 : product;
  uint64_t bytes = 0;
  DF_CHECK(!overflow && product <= uint64_t(std::numeric_limits<int64_t>::max()) &&
               !__builtin_mul_overflow(numel, uint64_t(dtype_size(e.dtype)), &bytes),
           where, "shape ", Shape(dims).str(), " overflows (element count too large)");
  e.shape = Shape(dims);

  auto off = v.find("data_offsets");
  DF_CHECK(off != v.end(), where, "header entry is missing \"data_offsets\"");
  DF_CHECK(off->is_array() && off->size() == 2, where, "\"data_offsets\" is not an array of two integers");
  const char* why = "";
  DF_CHECK(nonneg_int((*off)[0], &e.begin, &why), where, "data_offsets begin ", why);
  DF_CHECK(nonneg_int((*off)[1], &e.end, &why), where, "data_offsets end ", why);
  DF_CHECK(e.begin <= e.end, where, "data_offsets begin ", e.begin, " > end ", e.end);
  DF_CHECK(e.end <= data_size, where, "data_offsets [", e.begin, ", ", e.end, ") run past the end of the data area (",
           data_size, " bytes; file truncated?)");
  DF_CHECK(e.end - e.begin == bytes, where, "shape ", e.shape.str(), " x ", dts, " is ", bytes,
           " bytes but data_offsets [", e.begin, ", ", e.end, ") span ", e.end - e.begin, " bytes (size mismatch)");
  return e;
}

}  // namespace

TensorFile parse_safetensors(const uint8_t* data, size_t size, const std::string& path,
                             std::shared_ptr<const void> keepalive, bool file_mapped) {
  DF_CHECK(size >= 8, path, ": not a safetensors file: ", size,
           " bytes is shorter than the 8-byte header length (truncated?)");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(data[i]) << (8 * i);
  DF_CHECK(n <= kMaxHeaderBytes, path, ": safetensors header length ", n,
           " is absurd (limit 100 MB): not a safetensors file, or corrupt");
  DF_CHECK(n <= size - 8, path, ": safetensors header length ", n, " exceeds the file size ", size,
           " (truncated?)");
  const char* hbegin = reinterpret_cast<const char*>(data + 8);
  const uint64_t data_size = size - 8 - n;
  const uint8_t* base = data + 8 + n;

  // Parse, noting duplicate top-level keys (nlohmann would silently keep the last one).
  json header;
  std::string duplicate;
  bool has_duplicate = false;
  {
    std::set<std::string> keys;
    json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
      // A valid header nests 3 deep; refuse deep nesting before it costs memory.
      if (depth > 16) fail(path, ": safetensors header is not valid: JSON nested more than 16 levels deep");
      if (ev == json::parse_event_t::key && depth == 1 && !has_duplicate && parsed.is_string()) {
        if (!keys.insert(parsed.get_ref<const std::string&>()).second) {
          has_duplicate = true;
          duplicate = parsed.get<std::string>();
        }
      }
      return true;
    };
    try {
      header = json::parse(hbegin, hbegin + n, cb);
    } catch (const json::exception& e) {
      fail(path, ": safetensors header is not valid JSON: ", json_reason(e));
    }
  }
  DF_CHECK(header.is_object(), path, ": safetensors header is not a JSON object");
  DF_CHECK(!has_duplicate, path, ": tensor '", printable(duplicate), "' appears twice in the safetensors header");

  TensorFile tf;
  tf.path = path;
  tf.format = "safetensors";

  std::vector<Entry> entries;
  entries.reserve(header.size());
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      DF_CHECK(it->is_object(), path, ": safetensors __metadata__ is not a JSON object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        DF_CHECK(m->is_string(), path, ": safetensors __metadata__ value for '", printable(m.key()),
                 "' is not a string (metadata must map strings to strings)");
        tf.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(path, it.key(), *it, data_size));
  }

  // File order is data order; neighbours must not overlap.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end != b.end ? a.end < b.end : a.name < b.name;
  });
  uint64_t unused = 0, pos = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    if (i > 0) {
      const Entry& p = entries[i - 1];
      DF_CHECK(p.end <= e.begin, path, ": tensors '", printable(p.name), "' [", p.begin, ", ", p.end, ") and '",
               printable(e.name), "' [", e.begin, ", ", e.end, ") overlap in the data area");
    }
    if (e.begin > pos) unused += e.begin - pos;
    pos = std::max(pos, e.end);
  }
  unused += data_size - pos;
  if (unused > 0)
    tf.warnings.push_back(cat(path, ": ", unused, " bytes of the data area are not used by any tensor"));

  // All checks passed: create the tensors.
  auto storage = file_mapped ? Storage::borrow_file_mapping(base, size_t(data_size), std::move(keepalive))
                             : Storage::borrow(const_cast<uint8_t*>(base), size_t(data_size), std::move(keepalive));
  size_t copied = 0;
  tf.tensors.reserve(entries.size());
  for (Entry& e : entries) {
    const uint8_t* p = base + e.begin;
    size_t align = dtype_size(e.dtype);
    Tensor t;
    if (reinterpret_cast<uintptr_t>(p) % align == 0) {
      t = Tensor(storage, size_t(e.begin), e.shape, e.dtype);
    } else {
      // Misaligned data cannot be read through typed pointers: copy it out.
      t = Tensor::empty(e.shape, e.dtype);
      if (t.bytes()) std::memcpy(t.data(), p, t.bytes());
      ++copied;
    }
    tf.tensors.push_back({std::move(e.name), std::move(t)});
  }
  if (copied > 0)
    tf.warnings.push_back(cat(path, ": ", copied,
                              " tensors are not aligned to their element size in the file and were copied"));
  tf.build_index();
  return tf;
}

TensorFile load_safetensors(const std::string& path) {
  std::shared_ptr<MappedFile> file = MappedFile::open(path);
  const uint8_t* data = file->data();
  size_t size = file->size();
  return parse_safetensors(data, size, path, std::move(file), /*file_mapped=*/true);
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  // Header, built as text (linear in the tensor count; names escaped by nlohmann).
  auto quoted = [&](const std::string& s) {
    try {
      return json(s).dump(-1, ' ', false, json::error_handler_t::strict);
    } catch (const json::exception& e) {
      fail(path, ": cannot write name '", printable(s), "': not valid UTF-8");
    }
  };
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      if (!first) header += ',';
      first = false;
      header += quoted(k) + ':' + quoted(v);
    }
    header += '}';
  }
  // Data order: wider element types first (stable otherwise), so that with no padding between
  // tensors (other readers require none) every tensor starts aligned to its element size.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    auto size_of = [&](size_t i) { return tensors[i].second.defined() ? dtype_size(tensors[i].second.dtype()) : 0; };
    return size_of(a) > size_of(b);
  });
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (size_t i : order) {
    const auto& [name, t] = tensors[i];
    DF_CHECK(name != "__metadata__", path, ": cannot write a tensor named __metadata__");
    DF_CHECK(seen.insert(name).second, path, ": tensor '", printable(name), "' given twice");
    DF_CHECK(t.defined(), path, ": tensor '", printable(name), "' is undefined (no data)");
    if (header.size() > 1) header += ',';
    header += quoted(name);
    header += cat(":{\"dtype\":\"", safetensors_dtype_name(t.dtype()), "\",\"shape\":[");
    for (int i = 0; i < t.rank(); ++i) header += cat(i ? "," : "", t.dim(i));
    header += cat("],\"data_offsets\":[", offset, ",", offset + t.bytes(), "]}");
    offset += t.bytes();
  }
  header += '}';
  while (header.size() % 8 != 0) header += ' ';

  // Streamed through write_file_safely: a temporary file renamed over a regular target, or the
  // device/FIFO written in place. The writer stops at the first failed write; write_file_safely
  // reports it ("<path>: cannot write: <reason>").
  write_file_safely(path, [&](FILE* f) {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
    if (std::fwrite(len, 1, 8, f) != 8 || std::fwrite(header.data(), 1, header.size(), f) != header.size())
      return;
    for (size_t i : order) {
      const Tensor& t = tensors[i].second;
      size_t b = t.bytes();
      if (b && std::fwrite(t.data(), 1, b, f) != b) return;
    }
  });
}

}  // namespace diffuse
