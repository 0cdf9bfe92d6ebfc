#include "io/pickle.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "core/error.h"

namespace diffuse {
namespace pickle {

namespace {

// A printable, bounded rendering of untrusted text (keeps error messages to one line).
std::string printable(std::string_view s, size_t max = 120) {
  std::string out;
  for (char c : s.substr(0, max)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (s.size() > max) out += "...";
  return out;
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::Str: return "str";
    case Kind::Bytes: return "bytes";
    case Kind::Tuple: return "tuple";
    case Kind::List: return "list";
    case Kind::Dict: return "dict";
    case Kind::Set: return "set";
    case Kind::Global: return "global";
    case Kind::Storage: return "storage";
    case Kind::Tensor: return "tensor";
    case Kind::Dtype: return "numpy dtype";
    case Kind::Opaque: return "opaque object";
  }
  return "?";
}

struct AllowedGlobal {
  const char* name;
  GlobalId id;
  DType dtype;
};

const AllowedGlobal kAllowed[] = {
    {"torch._utils._rebuild_tensor_v2", GlobalId::RebuildTensorV2, DType::F32},
    {"torch._utils._rebuild_tensor", GlobalId::RebuildTensor, DType::F32},
    {"torch._utils._rebuild_parameter", GlobalId::RebuildParameter, DType::F32},
    {"torch._utils._rebuild_parameter_with_state", GlobalId::RebuildParameterWithState, DType::F32},
    {"torch.FloatStorage", GlobalId::StorageType, DType::F32},
    {"torch.HalfStorage", GlobalId::StorageType, DType::F16},
    {"torch.BFloat16Storage", GlobalId::StorageType, DType::BF16},
    {"torch.DoubleStorage", GlobalId::StorageType, DType::F64},
    {"torch.LongStorage", GlobalId::StorageType, DType::I64},
    {"torch.IntStorage", GlobalId::StorageType, DType::I32},
    {"torch.ShortStorage", GlobalId::StorageType, DType::I16},
    {"torch.CharStorage", GlobalId::StorageType, DType::I8},
    {"torch.ByteStorage", GlobalId::StorageType, DType::U8},
    {"torch.BoolStorage", GlobalId::StorageType, DType::Bool},
    {"torch.Size", GlobalId::TorchSize, DType::F32},
    {"collections.OrderedDict", GlobalId::OrderedDict, DType::F32},
    {"numpy.core.multiarray.scalar", GlobalId::NumpyScalar, DType::F32},
    {"numpy._core.multiarray.scalar", GlobalId::NumpyScalar, DType::F32},
    {"numpy.dtype", GlobalId::NumpyDtype, DType::F32},
    {"_codecs.encode", GlobalId::CodecsEncode, DType::F32},
};

bool opaque_module(const std::string& full) {
  for (const char* prefix : {"pytorch_lightning.", "lightning.", "lightning_fabric."})
    if (full.rfind(prefix, 0) == 0) return true;
  return false;
}

// Longer str keys are not indexed (nor de-duplicated): hashing them on every SETITEM would let a
// small pickle cost quadratic time. Real keys (parameter names) are far shorter.
constexpr size_t kMaxIndexedKey = 1024;
constexpr size_t kMaxGlobalName = 512;
constexpr size_t kMaxTensorRank = 64;

uint64_t le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

const Object* Object::get(std::string_view key) const {
  if (kind != Kind::Dict || !str_index || key.size() > kMaxIndexedKey) return nullptr;
  auto it = str_index->find(std::string(key));
  return it == str_index->end() ? nullptr : items[2 * it->second + 1];
}

std::string describe(const Object* o) {
  if (!o) return "nothing";
  switch (o->kind) {
    case Kind::Bool: return o->b ? "True" : "False";
    case Kind::Int: return cat("int ", o->i);
    case Kind::Float: return cat("float ", o->f);
    case Kind::Str: return cat("str '", printable(o->text, 60), "'");
    case Kind::Global: return cat("global ", printable(o->text));
    case Kind::Tuple:
    case Kind::List:
    case Kind::Set: return cat(kind_name(o->kind), " of ", o->items.size());
    case Kind::Dict: return cat("dict of ", o->dict_size());
    default: return kind_name(o->kind);
  }
}

Unpickler::Unpickler(std::string context, Limits limits) : context_(std::move(context)), limits_(limits) {}
Unpickler::~Unpickler() = default;

Object* Unpickler::make(Kind k) {
  DF_CHECK(objects_.size() < limits_.max_objects, context_, ": pickle creates more than ", limits_.max_objects,
           " objects");
  objects_.emplace_back();
  objects_.back().kind = k;
  return &objects_.back();
}

class Unpickler::Machine {
 public:
  Machine(Unpickler& u, const uint8_t* data, size_t size) : u_(u), begin_(data), p_(data), end_(data + size) {}

  const Object* run() {
    none_ = u_.make(Kind::None);
    true_ = u_.make(Kind::Bool);
    true_->b = true;
    false_ = u_.make(Kind::Bool);
    for (;;) {
      op_at_ = size_t(p_ - begin_);
      need(1, "an opcode");
      uint8_t op = *p_++;
      if (op == '.') {  // STOP
        Object* result = pop();
        if (!marks_.empty()) error("STOP with ", marks_.size(), " unclosed MARK(s)");
        return result;
      }
      step(op);
    }
  }

 private:
  template <typename... Args>
  [[noreturn]] void error(Args&&... args) {
    fail(u_.context_, ": bad pickle: ", std::forward<Args>(args)..., " (at byte ", op_at_, ")");
  }

  void need(size_t n, const char* what) {
    if (size_t(end_ - p_) < n)
      error("truncated: needs ", n, " bytes for ", what, " but only ", size_t(end_ - p_), " remain");
  }
  const uint8_t* take(size_t n, const char* what) {
    need(n, what);
    const uint8_t* q = p_;
    p_ += n;
    return q;
  }
  uint64_t take_le(int n, const char* what) { return le(take(size_t(n), what), n); }

  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(Object* o) {
    if (stack_.size() >= u_.limits_.max_stack) error("stack exceeds ", u_.limits_.max_stack, " entries");
    stack_.push_back(o);
  }
  Object* pop() {
    if (stack_.size() <= floor()) error("stack underflow");
    Object* o = stack_.back();
    stack_.pop_back();
    return o;
  }
  Object* top() {
    if (stack_.size() <= floor()) error("stack underflow");
    return stack_.back();
  }
  std::vector<Object*> pop_mark() {
    if (marks_.empty()) error("no MARK on the stack");
    size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Object*> items(stack_.begin() + ptrdiff_t(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  void count_items(size_t n) {
    items_ += n;
    if (items_ > u_.limits_.max_items) error("containers hold more than ", u_.limits_.max_items, " elements");
  }
  void charge_text(size_t n) {
    text_bytes_ += n;
    if (text_bytes_ > u_.limits_.max_text_bytes) error("strings exceed ", u_.limits_.max_text_bytes, " bytes");
  }
  Object* make_text(Kind k, const uint8_t* data, size_t n) {
    charge_text(n);
    Object* o = u_.make(k);
    o->text.assign(reinterpret_cast<const char*>(data), n);
    return o;
  }
  Object* make_int(int64_t v) {
    Object* o = u_.make(Kind::Int);
    o->i = v;
    return o;
  }
  Object* make_seq(Kind k, std::vector<Object*> items) {
    count_items(items.size());
    Object* o = u_.make(k);
    o->items = std::move(items);
    return o;
  }
  Object* make_dict() {
    Object* o = u_.make(Kind::Dict);
    u_.indexes_.emplace_back();
    o->str_index = &u_.indexes_.back();
    return o;
  }
  void dict_set(Object* d, Object* k, Object* v) {
    if (d->kind != Kind::Dict) error("SETITEM on ", describe(d), ", expected a dict");
    if (k->kind == Kind::Str && k->text.size() <= kMaxIndexedKey) {
      auto [it, fresh] = d->str_index->emplace(k->text, d->items.size() / 2);
      if (!fresh) {
        d->items[2 * it->second + 1] = v;
        return;
      }
    }
    count_items(2);
    d->items.push_back(k);
    d->items.push_back(v);
  }
  void memo_put(uint64_t idx) {
    if (memo_.size() >= u_.limits_.max_memo && !memo_.count(idx))
      error("memo exceeds ", u_.limits_.max_memo, " entries");
    memo_[idx] = top();
  }
  Object* memo_get(uint64_t idx) {
    auto it = memo_.find(idx);
    if (it == memo_.end()) error("memo index ", idx, " was never stored");
    return it->second;
  }
  std::string read_line(const char* what) {
    size_t avail = std::min<size_t>(size_t(end_ - p_), 512);
    const void* nl = std::memchr(p_, '\n', avail);
    if (!nl) error("truncated or overlong ", what, " line");
    std::string s(reinterpret_cast<const char*>(p_), static_cast<const uint8_t*>(nl) - p_);
    p_ = static_cast<const uint8_t*>(nl) + 1;
    return s;
  }

  Object* find_global(const std::string& module, const std::string& name) {
    if (module.size() + name.size() > kMaxGlobalName)
      fail(u_.context_, ": pickle references forbidden global ", printable(module + "." + name), " (at byte ", op_at_, ")");
    std::string full = module + "." + name;
    auto it = globals_.find(full);
    if (it != globals_.end()) return it->second;
    GlobalId id = GlobalId::None;
    DType dt = DType::F32;
    for (const AllowedGlobal& a : kAllowed)
      if (full == a.name) {
        id = a.id;
        dt = a.dtype;
      }
    if (id == GlobalId::None && opaque_module(full)) id = GlobalId::OpaqueClass;
    if (id == GlobalId::None)
      fail(u_.context_, ": pickle references forbidden global ", printable(full), " (at byte ", op_at_, ")");
    Object* g = u_.make(Kind::Global);
    g->global = id;
    g->dtype = dt;
    g->text = full;
    globals_.emplace(std::move(full), g);
    return g;
  }

  const std::vector<Object*>& args_of(Object* args, const char* fn, size_t min_count) {
    if (args->kind != Kind::Tuple) error(fn, " called with ", describe(args), " instead of an argument tuple");
    if (args->items.size() < min_count)
      error(fn, " called with ", args->items.size(), " arguments, expected at least ", min_count);
    return args->items;
  }
  static bool int_seq(const Object* o) {
    if (o->kind != Kind::Tuple && o->kind != Kind::List) return false;
    for (const Object* x : o->items)
      if (x->kind != Kind::Int) return false;
    return true;
  }

  Object* numpy_scalar(const std::vector<Object*>& a) {
    const Object* dt = a[0];
    const Object* raw = a[1];
    if (dt->kind != Kind::Dtype || raw->kind != Kind::Bytes) error("numpy scalar needs a dtype and bytes");
    const std::string& code = dt->text;
    if (code.size() < 2) error("unsupported numpy scalar type ", printable(code));
    char k = code[0];
    int n = code.size() == 2 && code[1] >= '1' && code[1] <= '8' ? code[1] - '0' : 0;
    if (n == 0 || size_t(n) != raw->text.size()) error("numpy scalar ", printable(code), " has ", raw->text.size(), " bytes");
    uint8_t b[8] = {};
    std::memcpy(b, raw->text.data(), size_t(n));
    if (dt->name == ">")
      for (int i = 0; i < n / 2; ++i) std::swap(b[i], b[n - 1 - i]);
    uint64_t bits = le(b, n);
    if (k == 'f') {
      Object* o = u_.make(Kind::Float);
      if (n == 8) std::memcpy(&o->f, &bits, 8);
      else if (n == 4) { float f; uint32_t w = uint32_t(bits); std::memcpy(&f, &w, 4); o->f = f; }
      else if (n == 2) o->f = f16_to_f32(uint16_t(bits));
      else error("unsupported numpy scalar type ", printable(code));
      return o;
    }
    if (k == 'i' || k == 'u' || k == 'b') {
      if (n != 1 && n != 2 && n != 4 && n != 8) error("unsupported numpy scalar type ", printable(code));
      int64_t v = int64_t(bits);
      if (k == 'i' && n < 8 && (bits >> (8 * n - 1)) & 1) v = int64_t(bits | (~uint64_t(0) << (8 * n)));
      if (k == 'b') {
        Object* o = u_.make(Kind::Bool);
        o->b = bits != 0;
        return o;
      }
      return make_int(v);
    }
    error("unsupported numpy scalar type ", printable(code));
  }

  Object* codecs_encode(const std::vector<Object*>& a) {
    if (a[0]->kind != Kind::Str || a[1]->kind != Kind::Str) error("_codecs.encode needs (str, encoding)");
    const std::string& s = a[0]->text;
    const std::string& enc = a[1]->text;
    if (enc == "utf-8" || enc == "utf8") return make_text(Kind::Bytes, reinterpret_cast<const uint8_t*>(s.data()), s.size());
    if (enc != "latin1" && enc != "latin-1" && enc != "iso-8859-1") error("_codecs.encode with unsupported encoding ", printable(enc));
    charge_text(s.size());
    // UTF-8 text whose code points are all < 256 -> one byte each.
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
      uint8_t c = uint8_t(s[i]);
      if (c < 0x80) out += char(c);
      else if ((c & 0xe0) == 0xc0 && i + 1 < s.size() && c <= 0xc3 && (uint8_t(s[i + 1]) & 0xc0) == 0x80) {
        out += char(((c & 0x1f) << 6) | (uint8_t(s[i + 1]) & 0x3f));
        ++i;
      } else {
        error("_codecs.encode: text is not latin-1");
      }
    }
    return make_text(Kind::Bytes, reinterpret_cast<const uint8_t*>(out.data()), out.size());
  }

  Object* new_dict_from(const std::vector<Object*>& a) {
    Object* d = make_dict();
    if (a.empty()) return d;
    const Object* src = a[0];
    if (src->kind == Kind::Dict) {
      for (size_t i = 0; i + 1 < src->items.size(); i += 2) dict_set(d, src->items[i], src->items[i + 1]);
    } else if (src->kind == Kind::List || src->kind == Kind::Tuple) {
      for (const Object* pair : src->items) {
        if ((pair->kind != Kind::Tuple && pair->kind != Kind::List) || pair->items.size() != 2)
          error("OrderedDict built from ", describe(pair), ", expected (key, value) pairs");
        dict_set(d, pair->items[0], pair->items[1]);
      }
    } else {
      error("OrderedDict built from ", describe(src));
    }
    return d;
  }

  // REDUCE: emulates the allow-listed callables; never executes anything.
  Object* call(Object* fn, Object* args) {
    if (fn->kind != Kind::Global) error("REDUCE calls ", describe(fn), ", which is not callable");
    const char* name = fn->text.c_str();
    switch (fn->global) {
      case GlobalId::RebuildTensorV2:
      case GlobalId::RebuildTensor: {
        const auto& a = args_of(args, name, 4);
        if (a[0]->kind != Kind::Storage) error(name, " argument 0 is ", describe(a[0]), ", expected a storage");
        if (a[1]->kind != Kind::Int) error(name, " storage offset is ", describe(a[1]));
        if (a[2]->items.size() > kMaxTensorRank || a[3]->items.size() > kMaxTensorRank)
          error(name, " tensor rank exceeds ", kMaxTensorRank);
        if (!int_seq(a[2]) || !int_seq(a[3])) error(name, " size/stride are not integer tuples");
        Object* t = u_.make(Kind::Tensor);
        t->i = a[1]->i;
        t->items = {a[0], a[2], a[3]};
        return t;
      }
      case GlobalId::RebuildParameter:
      case GlobalId::RebuildParameterWithState: {
        const auto& a = args_of(args, name, 1);
        if (a[0]->kind != Kind::Tensor) error(name, " argument 0 is ", describe(a[0]), ", expected a tensor");
        return a[0];
      }
      case GlobalId::TorchSize: {
        const auto& a = args_of(args, name, 1);
        count_items(a[0]->items.size());  // the scan below is work too
        if (!int_seq(a[0])) error(name, " argument is not a sequence of integers");
        return make_seq(Kind::Tuple, a[0]->items);
      }
      case GlobalId::OrderedDict: return new_dict_from(args_of(args, name, 0));
      case GlobalId::NumpyScalar: return numpy_scalar(args_of(args, name, 2));
      case GlobalId::NumpyDtype: {
        const auto& a = args_of(args, name, 1);
        if (a[0]->kind != Kind::Str) error(name, " argument is ", describe(a[0]));
        Object* d = u_.make(Kind::Dtype);
        d->text = printable(a[0]->text, 16);
        d->name = "=";
        return d;
      }
      case GlobalId::CodecsEncode: return codecs_encode(args_of(args, name, 2));
      case GlobalId::OpaqueClass: return u_.make(Kind::Opaque);
      default: error("REDUCE calls ", describe(fn), ", which is not callable here");
    }
  }

  Object* instantiate(Object* cls) {
    if (cls->kind == Kind::Global && cls->global == GlobalId::OrderedDict) return make_dict();
    if (cls->kind == Kind::Global && cls->global == GlobalId::OpaqueClass) return u_.make(Kind::Opaque);
    error("NEWOBJ cannot instantiate ", describe(cls));
  }

  void build(Object* obj, Object* state) {
    switch (obj->kind) {
      case Kind::Opaque:
      case Kind::Dict:    // OrderedDict._metadata and friends: not needed
      case Kind::Tensor:  // tensor attributes: not needed
        return;
      case Kind::Dtype:
        if (state->kind == Kind::Tuple && state->items.size() >= 2 && state->items[1]->kind == Kind::Str)
          obj->name = printable(state->items[1]->text, 4);
        return;
      default: error("BUILD on ", describe(obj), " is not supported");
    }
  }

  Object* persistent_load(Object* pid) {
    if (pid->kind != Kind::Tuple || pid->items.size() != 5)
      error("unsupported persistent id ", describe(pid), ", expected ('storage', type, key, location, numel)");
    const auto& a = pid->items;
    if (a[0]->kind != Kind::Str || a[0]->text != "storage") error("persistent id is not a storage reference");
    if (a[1]->kind != Kind::Global || a[1]->global != GlobalId::StorageType)
      error("persistent id storage type is ", describe(a[1]));
    if (a[2]->kind != Kind::Str || a[3]->kind != Kind::Str || a[4]->kind != Kind::Int || a[4]->i < 0)
      error("malformed storage persistent id");
    Object* s = u_.make(Kind::Storage);
    s->dtype = a[1]->dtype;
    s->i = a[4]->i;
    s->items = {a[2], a[3]};
    return s;
  }

  int64_t signed_le(const uint8_t* q, size_t n) {
    if (n == 0) return 0;
    if (n > 8) error("integer wider than 64 bits");
    uint64_t v = le(q, int(n));
    if (n < 8 && (q[n - 1] & 0x80)) v |= ~uint64_t(0) << (8 * n);
    return int64_t(v);
  }

  void step(uint8_t op) {
    switch (op) {
      case 0x80: {  // PROTO
        uint8_t v = *take(1, "PROTO");
        if (v > 5) error("unsupported pickle protocol ", int(v));
        return;
      }
      case 0x95: {  // FRAME
        uint64_t n = take_le(8, "FRAME");
        if (n > uint64_t(end_ - p_)) error("truncated: frame of ", n, " bytes exceeds the remaining input");
        return;
      }
      case '}': push(make_dict()); return;                      // EMPTY_DICT
      case ']': push(make_seq(Kind::List, {})); return;         // EMPTY_LIST
      case ')': push(make_seq(Kind::Tuple, {})); return;        // EMPTY_TUPLE
      case 0x8f: push(make_seq(Kind::Set, {})); return;         // EMPTY_SET
      case '(':                                                 // MARK
        if (marks_.size() >= u_.limits_.max_marks) error("nesting deeper than ", u_.limits_.max_marks, " MARKs");
        marks_.push_back(stack_.size());
        return;
      case 'N': push(none_); return;
      case 0x88: push(true_); return;
      case 0x89: push(false_); return;
      case 'J': push(make_int(int32_t(uint32_t(take_le(4, "BININT"))))); return;
      case 'K': push(make_int(int64_t(take_le(1, "BININT1")))); return;
      case 'M': push(make_int(int64_t(take_le(2, "BININT2")))); return;
      case 0x8a: {  // LONG1
        size_t n = *take(1, "LONG1");
        push(make_int(signed_le(take(n, "LONG1"), n)));
        return;
      }
      case 0x8b: {  // LONG4
        int64_t n = int32_t(uint32_t(take_le(4, "LONG4")));
        if (n < 0 || n > 8) error("LONG4 of ", n, " bytes is not supported");
        push(make_int(signed_le(take(size_t(n), "LONG4"), size_t(n))));
        return;
      }
      case 'G': {  // BINFLOAT, big-endian
        const uint8_t* q = take(8, "BINFLOAT");
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | q[i];
        Object* o = u_.make(Kind::Float);
        std::memcpy(&o->f, &bits, 8);
        push(o);
        return;
      }
      case 'X': case 0x8c: case 0x8d: case 'T': case 'U':    // str
      case 'B': case 'C': case 0x8e: case 0x96: {            // bytes
        int width = (op == 0x8c || op == 'C' || op == 'U') ? 1 : (op == 0x8d || op == 0x8e || op == 0x96) ? 8 : 4;
        uint64_t n = take_le(width, "a string length");
        if (n > uint64_t(end_ - p_))
          error("truncated: string of ", n, " bytes claimed but only ", size_t(end_ - p_), " remain");
        bool is_str = op == 'X' || op == 0x8c || op == 0x8d || op == 'T' || op == 'U';
        push(make_text(is_str ? Kind::Str : Kind::Bytes, take(size_t(n), "a string"), size_t(n)));
        return;
      }
      case 'q': memo_put(take_le(1, "BINPUT")); return;
      case 'r': memo_put(take_le(4, "LONG_BINPUT")); return;
      case 0x94: memo_put(memo_.size()); return;  // MEMOIZE
      case 'h': push(memo_get(take_le(1, "BINGET"))); return;
      case 'j': push(memo_get(take_le(4, "LONG_BINGET"))); return;
      case 't': push(make_seq(Kind::Tuple, pop_mark())); return;
      case 'l': push(make_seq(Kind::List, pop_mark())); return;
      case 0x91: push(make_seq(Kind::Set, pop_mark())); return;  // FROZENSET
      case 0x85: case 0x86: case 0x87: {                          // TUPLE1/2/3
        size_t n = size_t(op - 0x84);
        std::vector<Object*> items(n);
        for (size_t i = n; i-- > 0;) items[i] = pop();
        push(make_seq(Kind::Tuple, std::move(items)));
        return;
      }
      case 'd': {  // DICT
        auto items = pop_mark();
        if (items.size() % 2) error("DICT with an odd number of items");
        Object* d = make_dict();
        for (size_t i = 0; i < items.size(); i += 2) dict_set(d, items[i], items[i + 1]);
        push(d);
        return;
      }
      case 's': {  // SETITEM
        Object* v = pop();
        Object* k = pop();
        dict_set(top(), k, v);
        return;
      }
      case 'u': {  // SETITEMS
        auto items = pop_mark();
        if (items.size() % 2) error("SETITEMS with an odd number of items");
        Object* d = top();
        for (size_t i = 0; i < items.size(); i += 2) dict_set(d, items[i], items[i + 1]);
        return;
      }
      case 'a': case 'e': case 0x90: {  // APPEND, APPENDS, ADDITEMS
        std::vector<Object*> items;
        if (op == 'a') items.push_back(pop());
        else items = pop_mark();
        Object* seq = top();
        Kind want = op == 0x90 ? Kind::Set : Kind::List;
        if (seq->kind != want) error(op == 0x90 ? "ADDITEMS" : "APPEND", " on ", describe(seq));
        count_items(items.size());
        seq->items.insert(seq->items.end(), items.begin(), items.end());
        return;
      }
      case 'c': {  // GLOBAL
        std::string module = read_line("GLOBAL module");
        std::string name = read_line("GLOBAL name");
        push(find_global(module, name));
        return;
      }
      case 0x93: {  // STACK_GLOBAL
        Object* name = pop();
        Object* module = pop();
        if (module->kind != Kind::Str || name->kind != Kind::Str) error("STACK_GLOBAL needs two strings");
        push(find_global(module->text, name->text));
        return;
      }
      case 'R': {  // REDUCE
        Object* args = pop();
        Object* fn = pop();
        push(call(fn, args));
        return;
      }
      case 0x81: {  // NEWOBJ
        Object* args = pop();
        if (args->kind != Kind::Tuple) error("NEWOBJ arguments are ", describe(args));
        push(instantiate(pop()));
        return;
      }
      case 0x92: {  // NEWOBJ_EX
        pop();
        pop();
        push(instantiate(pop()));
        return;
      }
      case 'b': {  // BUILD
        Object* state = pop();
        build(top(), state);
        return;
      }
      case 'Q': push(persistent_load(pop())); return;  // BINPERSID
      case '0':                                        // POP
        if (stack_.size() > floor()) stack_.pop_back();
        else pop_mark();
        return;
      case '1': pop_mark(); return;  // POP_MARK
      case '2': push(top()); return;  // DUP
      default:
        error("unsupported or unknown opcode 0x", "0123456789abcdef"[op >> 4], "0123456789abcdef"[op & 15]);
    }
  }

  Unpickler& u_;
  const uint8_t* begin_;
  const uint8_t* p_;
  const uint8_t* end_;
  size_t op_at_ = 0;
  size_t items_ = 0;
  size_t text_bytes_ = 0;
  std::vector<Object*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Object*> memo_;
  std::unordered_map<std::string, Object*> globals_;
  Object* none_ = nullptr;
  Object* true_ = nullptr;
  Object* false_ = nullptr;
};

const Object* Unpickler::load(const uint8_t* data, size_t size) {
  DF_CHECK(size > 0, context_, ": pickle is empty");
  Machine m(*this, data, size);
  return m.run();
}

}  // namespace pickle

void fuzz_unpickle(const uint8_t* data, size_t size) {
  try {
    pickle::Unpickler u("<fuzz>");
    const pickle::Object* root = u.load(data, size);
    (void)pickle::describe(root);
  } catch (const Error&) {
  }
}

}  // namespace diffuse
