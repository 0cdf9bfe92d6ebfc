// Restricted unpickler for PyTorch checkpoints (data.pkl inside a torch zip).
//
// It interprets the pickle opcodes (protocols 2-5, plus the few protocol-0/1 ones that old
// writers still emit) into an inert object graph. It NEVER executes anything: GLOBAL /
// STACK_GLOBAL may only name an allow-listed set of torch / collections / numpy / _codecs
// callables, each emulated here; classes under pytorch_lightning.* / lightning.* become opaque
// inert objects (their REDUCE / NEWOBJ / BUILD are swallowed); any other global is an error
// naming it. Persistent ids ('storage', storage_type, key, location, numel) become Storage
// objects that refer to "<prefix>/data/<key>" archive entries; the caller resolves them.
//
// The machine is iterative (no recursion) and bounded: stack size, mark depth, memo size and
// total object count are limited, and every length is checked against the remaining input, so
// a hostile pickle can neither exhaust memory nor hang.
#pragma once
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"

namespace diffuse {
namespace pickle {

enum class Kind : uint8_t {
  None, Bool, Int, Float, Str, Bytes,
  Tuple, List, Dict, Set,
  Global,   // an allow-listed callable or class (see GlobalId)
  Storage,  // persistent id: items = {key Str, location Str}; dtype, numel
  Tensor,   // items = {storage, size Tuple, stride Tuple}; offset = storage offset (elements)
  Dtype,    // numpy.dtype: text = type code ("f8"), name = byte order ("<", ">", "|", "=")
  Opaque,   // an instance of an opaque class (lightning callbacks), inert
};

enum class GlobalId : uint8_t {
  None, RebuildTensorV2, RebuildTensor, RebuildParameter, RebuildParameterWithState, StorageType,
  TorchSize, OrderedDict, NumpyScalar, NumpyDtype, CodecsEncode, OpaqueClass,
};

struct Object {
  Kind kind = Kind::None;
  GlobalId global = GlobalId::None;  // Kind::Global
  DType dtype = DType::F32;          // Kind::Storage, Kind::Global with StorageType
  bool b = false;                    // Kind::Bool
  int64_t i = 0;                     // Kind::Int; Kind::Storage: numel; Kind::Tensor: offset
  double f = 0;                      // Kind::Float
  std::string text;                  // Str/Bytes contents; Global: "module.name"; Dtype: type code
  std::string name;                  // Dtype: byte order
  std::vector<Object*> items;        // Tuple/List/Set elements; Dict: key0, value0, key1, ...
  std::unordered_map<std::string, size_t>* str_index = nullptr;  // Dict: Str key -> slot (owned by Unpickler)

  bool is(Kind k) const { return kind == k; }
  size_t dict_size() const { return items.size() / 2; }
  // Dict lookup by string key; nullptr if absent or not a dict.
  const Object* get(std::string_view key) const;
};

struct Limits {
  size_t max_stack = 1u << 20;     // values on the stack at once
  size_t max_marks = 256;          // nested MARKs (nesting depth)
  size_t max_memo = 1u << 22;      // memo entries
  size_t max_objects = 1u << 21;   // objects created in total
  size_t max_items = 1u << 24;     // container slots (tuple/list/dict/set elements) in total
  size_t max_text_bytes = 1u << 28;  // bytes held by str/bytes objects in total
};

class Unpickler {
 public:
  // `context` starts every error message (normally "<file>: data.pkl").
  explicit Unpickler(std::string context, Limits limits = {});
  ~Unpickler();
  Unpickler(const Unpickler&) = delete;
  Unpickler& operator=(const Unpickler&) = delete;

  // Runs the pickle to its STOP opcode and returns the result. Objects are owned by the
  // Unpickler and live as long as it does (cycles are allowed and harmless).
  const Object* load(const uint8_t* data, size_t size);

  size_t objects_created() const { return objects_.size(); }

 private:
  class Machine;
  Object* make(Kind k);
  std::string context_;
  Limits limits_;
  std::deque<Object> objects_;
  std::deque<std::unordered_map<std::string, size_t>> indexes_;
  friend class Machine;
};

// Renders a value briefly for messages ("dict", "str 'abc'", "int 3", "global os.system").
std::string describe(const Object* o);

}  // namespace pickle

// For libFuzzer harnesses: runs the restricted unpickler over a buffer, swallowing
// diffuse::Error; anything else (a crash, a sanitizer report, another exception) is a bug.
void fuzz_unpickle(const uint8_t* data, size_t size);

}  // namespace diffuse
