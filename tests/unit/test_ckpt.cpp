// PyTorch checkpoint reader: zip archive, restricted unpickler, tensor reconstruction, and the
// hostile-input defences of all three. Test archives and pickles are built here in C++.
#include <gtest/gtest.h>

#include "../common/expect_error.h"
#include <stdlib.h>
#include <zlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/pickle.h"
#include "io/tensor_file.h"
#include "io/zip.h"

namespace fs = std::filesystem;
using namespace diffuse;
using Bytes = std::vector<uint8_t>;

namespace {

// ---------------------------------------------------------------------------------------------
// Builders

void put16(Bytes& b, uint32_t v) { for (int i = 0; i < 2; ++i) b.push_back(uint8_t(v >> (8 * i))); }
void put32(Bytes& b, uint32_t v) { for (int i = 0; i < 4; ++i) b.push_back(uint8_t(v >> (8 * i))); }
void put64(Bytes& b, uint64_t v) { for (int i = 0; i < 8; ++i) b.push_back(uint8_t(v >> (8 * i))); }
void set32(Bytes& b, size_t at, uint32_t v) { for (int i = 0; i < 4; ++i) b[at + size_t(i)] = uint8_t(v >> (8 * i)); }
Bytes bytes_of(const std::string& s) { return Bytes(s.begin(), s.end()); }

// Pickle byte builder (opcodes as in Python's pickletools).
struct PB {
  Bytes b;
  PB& op(uint8_t c) { b.push_back(c); return *this; }
  PB& raw(const std::string& s) { b.insert(b.end(), s.begin(), s.end()); return *this; }
  PB& proto(int v) { return op(0x80).op(uint8_t(v)); }
  PB& str(const std::string& s) { op('X'); put32(b, uint32_t(s.size())); return raw(s); }
  PB& sstr(const std::string& s) { op(0x8c).op(uint8_t(s.size())); return raw(s); }
  PB& integer(int64_t v) {
    if (v >= 0 && v < 256) return op('K').op(uint8_t(v));
    if (v >= 0 && v < 65536) { op('M'); put16(b, uint32_t(v)); return *this; }
    if (v >= INT32_MIN && v <= INT32_MAX) { op('J'); put32(b, uint32_t(v)); return *this; }
    op(0x8a).op(8);
    put64(b, uint64_t(v));
    return *this;
  }
  PB& global(const std::string& mod, const std::string& name) { return op('c').raw(mod + "\n" + name + "\n"); }
  PB& mark() { return op('('); }
  PB& tuple() { return op('t'); }
  PB& put(uint8_t i) { return op('q').op(i); }
  PB& get(uint8_t i) { return op('h').op(i); }
  PB& stop() { return op('.'); }
};

struct ZEntry {
  std::string name;
  Bytes data;
  bool deflate = false;
  uint64_t fake_size = UINT64_MAX;  // declared uncompressed size, if not the real one
  bool align = true;                // pad the local header so data starts 64-byte aligned
};

Bytes deflate_raw(const Bytes& in) {
  z_stream zs{};
  EXPECT_EQ(deflateInit2(&zs, 9, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY), Z_OK);
  Bytes out(deflateBound(&zs, uLong(in.size())) + 16);
  zs.next_in = const_cast<Bytef*>(in.data());
  zs.avail_in = uInt(in.size());
  zs.next_out = out.data();
  zs.avail_out = uInt(out.size());
  EXPECT_EQ(deflate(&zs, Z_FINISH), Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

// Minimal zip writer: STORED or DEFLATE entries, optional ZIP64 records for every entry.
Bytes write_zip(const std::vector<ZEntry>& entries, bool zip64 = false) {
  Bytes out, cd;
  for (const ZEntry& e : entries) {
    Bytes payload = e.deflate ? deflate_raw(e.data) : e.data;
    uint64_t usize = e.fake_size != UINT64_MAX ? e.fake_size : e.data.size();
    uint32_t crc = uint32_t(crc32(0, e.data.data(), uInt(e.data.size())));
    uint64_t offset = out.size();
    size_t pad = 0;
    if (e.align) {
      size_t start = out.size() + 30 + e.name.size() + 4;
      pad = (64 - start % 64) % 64;
    }
    put32(out, 0x04034b50);
    put16(out, 20);
    put16(out, 0);
    put16(out, e.deflate ? 8 : 0);
    put32(out, 0);
    put32(out, crc);
    put32(out, uint32_t(payload.size()));
    put32(out, uint32_t(usize));
    put16(out, uint32_t(e.name.size()));
    put16(out, e.align ? uint32_t(4 + pad) : 0);
    out.insert(out.end(), e.name.begin(), e.name.end());
    if (e.align) {
      put16(out, 0xcafe);
      put16(out, uint32_t(pad));
      out.insert(out.end(), pad, 0);
    }
    out.insert(out.end(), payload.begin(), payload.end());
    put32(cd, 0x02014b50);
    put16(cd, 45);
    put16(cd, 45);
    put16(cd, 0);
    put16(cd, e.deflate ? 8 : 0);
    put32(cd, 0);
    put32(cd, crc);
    put32(cd, zip64 ? 0xffffffffu : uint32_t(payload.size()));
    put32(cd, zip64 ? 0xffffffffu : uint32_t(usize));
    put16(cd, uint32_t(e.name.size()));
    put16(cd, zip64 ? 28 : 0);
    put16(cd, 0);
    put16(cd, 0);
    put16(cd, 0);
    put32(cd, 0);
    put32(cd, zip64 ? 0xffffffffu : uint32_t(offset));
    cd.insert(cd.end(), e.name.begin(), e.name.end());
    if (zip64) {
      put16(cd, 1);
      put16(cd, 24);
      put64(cd, usize);
      put64(cd, payload.size());
      put64(cd, offset);
    }
  }
  uint64_t cd_off = out.size();
  out.insert(out.end(), cd.begin(), cd.end());
  if (zip64) {
    uint64_t z64 = out.size();
    put32(out, 0x06064b50);
    put64(out, 44);
    put16(out, 45);
    put16(out, 45);
    put32(out, 0);
    put32(out, 0);
    put64(out, entries.size());
    put64(out, entries.size());
    put64(out, cd.size());
    put64(out, cd_off);
    put32(out, 0x07064b50);
    put32(out, 0);
    put64(out, z64);
    put32(out, 1);
  }
  put32(out, 0x06054b50);
  put16(out, 0);
  put16(out, 0);
  put16(out, zip64 ? 0xffff : uint32_t(entries.size()));
  put16(out, zip64 ? 0xffff : uint32_t(entries.size()));
  put32(out, zip64 ? 0xffffffffu : uint32_t(cd.size()));
  put32(out, zip64 ? 0xffffffffu : uint32_t(cd_off));
  put16(out, 0);
  return out;
}

// Offset of the central directory record of `name`.
size_t central_of(const Bytes& z, const std::string& name) {
  for (size_t i = 0; i + 46 + name.size() <= z.size(); ++i)
    if (z[i] == 0x50 && z[i + 1] == 0x4b && z[i + 2] == 1 && z[i + 3] == 2 &&
        std::memcmp(&z[i + 46], name.data(), name.size()) == 0)
      return i;
  ADD_FAILURE() << "no central record for " << name;
  return 0;
}

struct TSpec {
  std::string name;
  std::string storage = "FloatStorage";
  std::string key;
  int64_t numel = 0;  // storage elements
  int64_t offset = 0;
  std::vector<int64_t> size, stride;
  bool parameter = false;
};

// A torch-style data.pkl for {"state_dict": {name: tensor, ...}, extra...}.
void tensor_rebuild(PB& p, const TSpec& t) {
  if (t.parameter) p.global("torch._utils", "_rebuild_parameter").mark();
  p.global("torch._utils", "_rebuild_tensor_v2").mark();
  p.mark().str("storage").global("torch", t.storage).str(t.key).str("cpu").integer(t.numel).tuple().op('Q');
  p.integer(t.offset).mark();
  for (int64_t s : t.size) p.integer(s);
  p.tuple().mark();
  for (int64_t s : t.stride) p.integer(s);
  p.tuple().op(0x89).global("collections", "OrderedDict").op(')').op('R').tuple().op('R');
  if (t.parameter) p.op(0x88).op('}').tuple().op('R');
}

Bytes torch_pickle(const std::vector<TSpec>& ts, bool wrap = true, const std::function<void(PB&)>& extra = {}) {
  PB p;
  p.proto(2).op('}').put(0).mark();
  if (wrap) p.str("state_dict").op('}').mark();
  for (const TSpec& t : ts) {
    p.str(t.name);
    tensor_rebuild(p, t);
  }
  if (wrap) p.op('u');
  if (extra) extra(p);
  p.op('u').stop();
  return p.b;
}

std::vector<int64_t> row_major(const std::vector<int64_t>& size) {
  std::vector<int64_t> st(size.size(), 1);
  for (size_t i = size.size(); i-- > 1;) st[i - 1] = st[i] * size[i];
  return st;
}

// Shared small checkpoint: three tensors over two storages (one shared by a view).
struct Sample {
  std::vector<TSpec> specs;
  Bytes s0, s1;
  Sample() {
    specs.push_back({"a.weight", "FloatStorage", "0", 12, 0, {3, 4}, row_major({3, 4})});
    specs.push_back({"a.bias", "FloatStorage", "0", 12, 8, {4}, {1}});
    specs.push_back({"b.half", "HalfStorage", "1", 6, 0, {2, 3}, row_major({2, 3}), true});
    for (int i = 0; i < 12; ++i) {
      float f = float(i) * 0.5f - 1.f;
      s0.insert(s0.end(), reinterpret_cast<uint8_t*>(&f), reinterpret_cast<uint8_t*>(&f) + 4);
    }
    for (int i = 0; i < 6; ++i) put16(s1, f32_to_f16(float(i)));
  }
  std::vector<ZEntry> entries(const Bytes& pkl) const {
    return {{"archive/data.pkl", pkl}, {"archive/data/0", s0}, {"archive/data/1", s1},
            {"archive/version", bytes_of("3\n")}};
  }
  Bytes zip(bool zip64 = false) const { return write_zip(entries(torch_pickle(specs)), zip64); }
};

const std::string kPath = "/tmp/evil.ckpt";

void expect_ckpt_error(const Bytes& zip, const std::string& keyword) {
  expect_error([&] { parse_ckpt(zip.data(), zip.size(), kPath, nullptr); }, kPath, keyword);
}
// A checkpoint whose data.pkl is `pkl`, with the sample storages beside it.
void expect_pickle_error(const Bytes& pkl, const std::string& keyword) {
  expect_ckpt_error(write_zip(Sample().entries(pkl)), keyword);
}

std::string sd1_model(const std::string& name) {
  std::string local = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/" + name;
  if (fs::exists(local)) return local;
  return std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1/model/" + name;
}

bool inside(const void* p, const Bytes& buf) {
  auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(buf.data());
  return a >= b && a < b + buf.size();
}

// ---------------------------------------------------------------------------------------------
// Real fixture

TEST(Ckpt, FixtureMatchesSafetensors) {
  std::string ckpt = sd1_model("tiny-sd1.ckpt"), st = sd1_model("tiny-sd1.safetensors");
  if (!fs::exists(ckpt) || !fs::exists(st)) GTEST_SKIP() << "fixture absent: " << ckpt << " / " << st;
  TensorFile a = load_ckpt(ckpt);
  TensorFile b = load_safetensors(st);
  EXPECT_EQ(a.format, "ckpt");
  ASSERT_GT(a.size(), 100u);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_TRUE(a.warnings.empty()) << a.warnings.front();
  size_t borrowed_aligned = 0;
  for (const TensorEntry& e : a.tensors) {
    const Tensor* t = b.find(e.name);
    ASSERT_NE(t, nullptr) << e.name << " missing from safetensors";
    ASSERT_EQ(e.tensor.shape(), t->shape()) << e.name;
    ASSERT_EQ(e.tensor.dtype(), t->dtype()) << e.name;
    ASSERT_EQ(std::memcmp(e.tensor.data(), t->data(), e.tensor.bytes()), 0) << e.name << " bytes differ";
    if (reinterpret_cast<uintptr_t>(e.tensor.data()) % 64 == 0) ++borrowed_aligned;
  }
  // torch aligns storage records to 64 bytes and these tensors start their storages.
  EXPECT_EQ(borrowed_aligned, a.size());
  TensorFile c = open_model_file(ckpt);
  EXPECT_EQ(c.format, "ckpt");
  EXPECT_EQ(c.size(), a.size());
}

// ---------------------------------------------------------------------------------------------
// Valid synthetic checkpoints

void check_sample(const TensorFile& tf, const Bytes& zip, bool borrowed) {
  ASSERT_EQ(tf.size(), 3u);
  EXPECT_EQ(tf.tensors[0].name, "a.weight");
  const Tensor* w = tf.find("a.weight");
  const Tensor* bias = tf.find("a.bias");
  const Tensor* h = tf.find("b.half");
  ASSERT_TRUE(w && bias && h);
  EXPECT_EQ(w->shape(), Shape({3, 4}));
  EXPECT_EQ(w->dtype(), DType::F32);
  EXPECT_FLOAT_EQ(w->f32()[5], 1.5f);
  EXPECT_EQ(bias->shape(), Shape({4}));
  EXPECT_FLOAT_EQ(bias->f32()[0], 3.0f);  // element 8
  EXPECT_EQ(h->dtype(), DType::F16);
  EXPECT_EQ(f16_to_f32(h->data<uint16_t>()[5]), 5.0f);
  EXPECT_EQ(inside(w->data(), zip), borrowed);
  EXPECT_EQ(w->storage(), bias->storage()) << "views of one storage share it";
}

TEST(Ckpt, StoredTensorsAreBorrowed) {
  Sample s;
  Bytes zip = s.zip();
  TensorFile tf = parse_ckpt(zip.data(), zip.size(), kPath, nullptr);
  EXPECT_EQ(tf.format, "ckpt");
  EXPECT_TRUE(tf.warnings.empty());
  check_sample(tf, zip, true);
}

TEST(Ckpt, Zip64Records) {
  Sample s;
  Bytes zip = s.zip(true);
  check_sample(parse_ckpt(zip.data(), zip.size(), kPath, nullptr), zip, true);
}

TEST(Ckpt, DeflatedEntriesAndUnalignedStorageAreCopied) {
  Sample s;
  auto es = s.entries(torch_pickle(s.specs));
  for (auto& e : es) {
    e.deflate = e.name != "archive/data/1";
    e.align = false;
  }
  Bytes zip = write_zip(es);
  check_sample(parse_ckpt(zip.data(), zip.size(), kPath, nullptr), zip, false);
}

TEST(Ckpt, LoadFromFileAndPrefixFolder) {
  Sample s;
  auto es = s.entries(torch_pickle(s.specs));
  for (auto& e : es) e.name.replace(0, 7, "my-model");
  Bytes zip = write_zip(es);
  std::string path = ::testing::TempDir() + "diffuse_ck_prefix.ckpt";
  { std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(zip.data()), std::streamsize(zip.size())); }
  TensorFile tf = load_ckpt(path);
  fs::remove(path);  // the mapping keeps the data alive
  ASSERT_EQ(tf.size(), 3u);
  EXPECT_FLOAT_EQ(tf.find("a.weight")->f32()[11], 4.5f);
  EXPECT_EQ(tf.path, path);
}

TEST(Ckpt, StridedViewIsGathered) {
  Sample s;
  auto specs = s.specs;
  specs.resize(1);
  specs[0].size = {4, 3};  // transpose of the 3x4 storage
  specs[0].stride = {1, 4};
  Bytes zip = write_zip(s.entries(torch_pickle(specs)));
  TensorFile tf = parse_ckpt(zip.data(), zip.size(), kPath, nullptr);
  const Tensor* t = tf.find("a.weight");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->shape(), Shape({4, 3}));
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_FLOAT_EQ(t->f32()[i * 3 + j], float(j * 4 + i) * 0.5f - 1.f);
  EXPECT_FALSE(inside(t->data(), zip));
}

TEST(Ckpt, TopLevelDictLightningCallbacksAndNumpy) {
  Sample s;
  // Unwrapped dict plus the odds and ends a Lightning SD checkpoint carries.
  Bytes pkl = torch_pickle(s.specs, false, [](PB& p) {
    p.str("global_step").integer(470000).str("epoch").integer(6);
    p.str("callbacks").op('}').global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint");
    p.mark().str("monitor").op('N').str("score");
    p.global("numpy.core.multiarray", "scalar").global("numpy", "dtype").str("f8").op(0x89).op(0x88).op(0x87).op('R');
    p.mark().integer(3).str("<").op('N').op('N').op('N').integer(-1).integer(-1).integer(0).tuple().op('b');
    p.global("_codecs", "encode").str("\xc3\xbf\x01\x02\x03\x04\x05\x06\x07").str("latin1").op(0x86).op('R');
    p.op(0x86).op('R');  // scalar(dtype, bytes)
    p.op('d').op('s');   // {ModelCheckpoint: {...}}
    p.str("opaque").global("lightning.fabric", "Thing").op(')').op(0x81).op('}').op('b');
    p.str("lr").op('G').raw(std::string("\x3f\xb9\x99\x99\x99\x99\x99\x9a", 8));
  });
  Bytes zip = write_zip(s.entries(pkl));
  TensorFile tf = parse_ckpt(zip.data(), zip.size(), kPath, nullptr);
  EXPECT_EQ(tf.size(), 3u);
  ASSERT_EQ(tf.warnings.size(), 1u);
  EXPECT_NE(tf.warnings[0].find("5 non-tensor values"), std::string::npos) << tf.warnings[0];
}

// BasicSR's {"params_ema": {...}} and A1111 embeddings' {"string_to_param": {"*": t}}: with no tensor
// at the top, nested dicts' tensors are named "outer.inner"; other values are skipped with a warning.
TEST(Ckpt, NestedDictsWithoutTopLevelTensors) {
  Sample s;
  PB p;
  p.proto(2).op('}').put(0).mark();
  p.str("params_ema").op('}').mark();
  for (const TSpec& t : s.specs) {
    p.str(t.name);
    tensor_rebuild(p, t);
  }
  p.op('u');
  p.str("string_to_token").op('}').str("*").integer(265).op('s');
  p.str("step").integer(3000);
  p.op('u').stop();
  Bytes zip = write_zip(s.entries(p.b));
  TensorFile tf = parse_ckpt(zip.data(), zip.size(), kPath, nullptr);
  ASSERT_EQ(tf.size(), 3u);
  ASSERT_TRUE(tf.find("params_ema.a.weight"));
  EXPECT_FLOAT_EQ(tf.find("params_ema.a.weight")->f32()[5], 1.5f);
  EXPECT_TRUE(tf.find("params_ema.b.half"));
  EXPECT_FALSE(tf.find("a.weight"));
  ASSERT_EQ(tf.warnings.size(), 1u);
  EXPECT_NE(tf.warnings[0].find("2 non-tensor values"), std::string::npos) << tf.warnings[0];
  // Top-level tensors win: nested dicts beside them are not searched (a Lightning checkpoint's
  // callbacks and optimizer states).
  Bytes flat = write_zip(s.entries(torch_pickle(s.specs, false)));
  EXPECT_TRUE(parse_ckpt(flat.data(), flat.size(), kPath, nullptr).find("a.weight"));
}

TEST(Pickle, ValuesAndProtocol4) {
  PB p;
  p.proto(4).op(0x95);
  put64(p.b, 0);  // frame length is advisory
  p.op(']').op(0x94).mark().sstr("h\xc3\xa9").op(0x94).integer(-5).integer(70000).integer(1ll << 40);
  p.op(0x8a).op(0);                                         // LONG1 0
  p.op(0x8a).op(2).op(0x00).op(0x80);                       // LONG1 -32768
  p.op('h').op(1).op('C').op(2).raw("ab").op('N').op(0x88).op('e').stop();
  pickle::Unpickler u("ctx");
  const pickle::Object* o = u.load(p.b.data(), p.b.size());
  ASSERT_EQ(o->kind, pickle::Kind::List);
  ASSERT_EQ(o->items.size(), 10u);
  EXPECT_EQ(o->items[0]->text, "h\xc3\xa9");
  EXPECT_EQ(o->items[1]->i, -5);
  EXPECT_EQ(o->items[2]->i, 70000);
  EXPECT_EQ(o->items[3]->i, 1ll << 40);
  EXPECT_EQ(o->items[4]->i, 0);
  EXPECT_EQ(o->items[5]->i, -32768);
  EXPECT_EQ(o->items[6], o->items[0]) << "memo returns the same object";
  EXPECT_EQ(o->items[7]->kind, pickle::Kind::Bytes);
  EXPECT_TRUE(o->items[9]->b);
}

TEST(Pickle, SelfReferenceIsHarmless) {
  PB p;
  p.proto(2).op(']').put(0).get(0).op('a').get(0).op('a').stop();
  pickle::Unpickler u("ctx");
  const pickle::Object* o = u.load(p.b.data(), p.b.size());
  ASSERT_EQ(o->items.size(), 2u);
  EXPECT_EQ(o->items[0], o);
}

// ---------------------------------------------------------------------------------------------
// Hostile pickles (each inside an otherwise valid checkpoint)

TEST(PickleBad, ForbiddenGlobals) {
  for (auto [mod, name] : std::vector<std::pair<std::string, std::string>>{
           {"os", "system"}, {"builtins", "eval"}, {"posix", "system"}, {"builtins", "getattr"},
           {"subprocess", "Popen"}, {"torch", "load"}, {"torch._utils", "_rebuild_tensor_v3"}}) {
    PB p;
    p.proto(2).global(mod, name).str("echo pwned").op(0x85).op('R').stop();
    expect_pickle_error(p.b, "forbidden global " + mod + "." + name);
  }
}

TEST(PickleBad, StackGlobalForbiddenModule) {
  PB p;
  p.proto(4).sstr("subprocess").sstr("check_output").op(0x93).mark().str("id").op('l').op(0x85).op('R').stop();
  expect_pickle_error(p.b, "forbidden global subprocess.check_output");
  PB q;  // dotted name through STACK_GLOBAL
  q.proto(4).sstr("builtins").sstr("__import__.os").op(0x93).stop();
  expect_pickle_error(q.b, "forbidden global builtins.__import__.os");
}

TEST(PickleBad, ForbiddenNameIsSanitised) {
  PB p;
  p.proto(4).sstr("os\r").sstr("sys\x01tem").op(0x93).stop();
  expect_pickle_error(p.b, "forbidden global os?.sys?tem");
}

TEST(PickleBad, Truncated) {
  Sample s;
  Bytes pkl = torch_pickle(s.specs);
  for (size_t cut : {size_t(1), size_t(2), size_t(7), pkl.size() / 2, pkl.size() - 1}) {
    Bytes t(pkl.begin(), pkl.begin() + ptrdiff_t(cut));
    expect_pickle_error(t, "truncated");
  }
}

TEST(PickleBad, UnknownOpcode) {
  expect_pickle_error({0x80, 0x02, 0xff}, "unknown opcode 0xff");
  expect_pickle_error({0x80, 0x02, 'i'}, "opcode 0x69");  // INST: protocol-0 class instantiation
}

TEST(PickleBad, StackUnderflowAndMarks) {
  expect_pickle_error({0x80, 0x02, 0x85, '.'}, "stack underflow");
  expect_pickle_error({0x80, 0x02, 'N', '(', 'R', '.'}, "stack underflow");  // cannot pop below a MARK
  expect_pickle_error({0x80, 0x02, 't', '.'}, "no MARK");
  expect_pickle_error({0x80, 0x02, '.'}, "stack underflow");
  expect_pickle_error({0x80, 0x02, '(', 'N', '.'}, "unclosed MARK");
}

TEST(PickleBad, MemoIndexOutOfRange) {
  expect_pickle_error({0x80, 0x02, 'N', 'q', 0, 'h', 5, '.'}, "memo index 5");
  expect_pickle_error({0x80, 0x02, 'j', 0xff, 0xff, 0xff, 0xff, '.'}, "memo index 4294967295");
}

TEST(PickleBad, NestingAndSizeBombs) {
  Bytes deep = {0x80, 0x02};
  deep.insert(deep.end(), 100000, '(');
  expect_pickle_error(deep, "nesting deeper");
  Bytes wide = {0x80, 0x02};
  wide.insert(wide.end(), 3u << 20, 'N');  // pushes without creating objects
  expect_pickle_error(wide, "stack exceeds");
  // Object and element budgets, with small limits so the test stays light.
  pickle::Limits lim;
  lim.max_objects = 10000;
  lim.max_items = 50000;
  Bytes many = {0x80, 0x02, ']'};
  for (int i = 0; i < 20000; ++i) { many.push_back(']'); many.push_back('a'); }
  expect_error([&] { pickle::Unpickler("ctx.pkl", lim).load(many.data(), many.size()); }, "ctx.pkl", "more than 10000 objects");
  Bytes dup = {0x80, 0x02, ']', 'q', 0};
  for (int i = 0; i < 2000; ++i) {
    dup.push_back('(');
    dup.push_back('h');
    dup.push_back(0);
    dup.insert(dup.end(), 99, '2');  // DUP: 100 references per byte-cheap op
    dup.push_back('e');
  }
  expect_error([&] { pickle::Unpickler("ctx.pkl", lim).load(dup.data(), dup.size()); }, "ctx.pkl", "more than 50000 elements");
}

TEST(PickleBad, RepeatedWorkOnLargeObjectsStaysLinear) {
  // A 1 MiB key set 200k times would hash 200 GB if long keys were indexed.
  PB p;
  p.proto(2).op('}').str(std::string(1u << 20, 'k')).put(0).op('N').op('s');
  for (int i = 0; i < 200000; ++i) p.get(0).op('N').op('s');
  p.stop();
  pickle::Unpickler u("ctx");
  const pickle::Object* d = u.load(p.b.data(), p.b.size());
  EXPECT_EQ(d->dict_size(), 200001u);
  // STACK_GLOBAL over a huge memoised name is refused before any concatenation.
  PB g;
  g.proto(4).str(std::string(1u << 20, 'm')).put(0).get(0).get(0).op(0x93).stop();
  expect_pickle_error(g.b, "forbidden global mmmm");
}

TEST(PickleBad, HugeLengthClaims) {
  expect_pickle_error({0x80, 0x02, 'X', 0xff, 0xff, 0xff, 0xff, 'a', 'b'}, "4294967295 bytes claimed");
  expect_pickle_error({0x80, 0x04, 0x8d, 0, 0, 0, 0, 0, 0, 0, 0x80, 'a'}, "claimed");
  expect_pickle_error({0x80, 0x04, 0x95, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 'N', '.'}, "frame");
  expect_pickle_error({0x80, 0x02, 0x8b, 0xff, 0xff, 0xff, 0x7f, '.'}, "LONG4");
  expect_pickle_error({0x80, 0x02, 0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, '.'}, "wider than 64 bits");
}

TEST(PickleBad, NonCallablesAndBadArguments) {
  PB a;  // REDUCE on a str
  a.proto(2).str("x").op(')').op('R').stop();
  expect_pickle_error(a.b, "not callable");
  PB b;  // calling a storage type
  b.proto(2).global("torch", "FloatStorage").op(')').op('R').stop();
  expect_pickle_error(b.b, "not callable");
  PB c;  // _rebuild_tensor_v2 with a str where the storage goes
  c.proto(2).global("torch._utils", "_rebuild_tensor_v2").mark().str("s").integer(0).op(')').op(')').tuple().op('R').stop();
  expect_pickle_error(c.b, "expected a storage");
  PB d;  // persistent id that is not a storage
  d.proto(2).mark().str("module").str("x").tuple().op('Q').stop();
  expect_pickle_error(d.b, "persistent id");
  PB e;  // BUILD on a list
  e.proto(2).op(']').op('}').op('b').stop();
  expect_pickle_error(e.b, "BUILD on list");
}

// ---------------------------------------------------------------------------------------------
// Hostile archives and tensor records

TEST(ZipBad, TruncatedAndNotZip) {
  Bytes zip = Sample().zip();
  expect_ckpt_error(Bytes(zip.begin(), zip.begin() + ptrdiff_t(zip.size() / 2)), "end-of-central-directory");
  expect_ckpt_error(Bytes(zip.begin(), zip.end() - 1), "");
  expect_ckpt_error(Bytes(), "not a zip");
  expect_ckpt_error(bytes_of("hello, world, this is not a zip archive at all"), "not a zip");
}

TEST(ZipBad, BadEocdAndCentralDirectory) {
  Bytes zip = Sample().zip();
  size_t eocd = zip.size() - 22;
  Bytes a = zip;
  set32(a, eocd + 16, uint32_t(zip.size() + 100));  // central directory offset past the end
  expect_ckpt_error(a, "central directory");
  Bytes b = zip;
  set32(b, eocd + 12, 0x7fffffff);  // central directory size past the end
  expect_ckpt_error(b, "past the end");
  Bytes c = zip;
  c[eocd + 10] = 200;  // more entries than the directory holds
  c[eocd + 8] = 200;
  expect_ckpt_error(c, "central directory");
  Bytes d = zip;
  set32(d, central_of(d, "archive/data/0") + 42, uint32_t(zip.size() - 10));  // local header offset
  expect_ckpt_error(d, "local header");
  Bytes e = zip;
  e[eocd + 4] = 1;  // multi-disk
  expect_ckpt_error(e, "multi-disk");
}

TEST(ZipBad, EntryDataPastEnd) {
  Bytes zip = Sample().zip();
  size_t c = central_of(zip, "archive/data/1");
  set32(zip, c + 20, 0x10000000);
  set32(zip, c + 24, 0x10000000);
  expect_ckpt_error(zip, "extends past the end");
  Bytes z64 = Sample().zip(true);  // the same through a ZIP64 extra field
  size_t x = central_of(z64, "archive/data/1") + 46 + std::string("archive/data/1").size() + 4;
  for (int i = 0; i < 16; ++i) z64[x + size_t(i)] = i % 8 == 7 ? 0x0f : 0xff;
  expect_ckpt_error(z64, "extends past the end");
}

TEST(ZipBad, DeflateBombs) {
  Sample s;
  Bytes pkl = torch_pickle(s.specs);
  // Claims its real small size but the stream inflates to much more.
  Bytes big = pkl;
  big.resize(8u << 20, '.');
  auto es = s.entries(big);
  es[0].deflate = true;
  es[0].fake_size = pkl.size();
  expect_ckpt_error(write_zip(es), "inflates beyond its declared size");
  // Claims a huge size: refused before anything is allocated.
  es = s.entries(pkl);
  es[0].deflate = true;
  es[0].fake_size = 3ull << 30;
  expect_ckpt_error(write_zip(es, true), "more than the limit");
  // A storage entry claiming 1 GiB from a few bytes: beyond deflate's ratio.
  es = s.entries(pkl);
  es[1].deflate = true;
  es[1].fake_size = 1ull << 30;
  expect_ckpt_error(write_zip(es), "beyond what deflate can produce");
  // Declares more than the stream holds.
  es = s.entries(pkl);
  es[0].deflate = true;
  es[0].fake_size = pkl.size() + 10;
  expect_ckpt_error(write_zip(es), "fewer bytes");
  // Corrupt deflate data.
  es = s.entries(pkl);
  es[0].deflate = true;
  Bytes z = write_zip(es);
  size_t data = 30 + size_t(z[26] | (z[27] << 8)) + size_t(z[28] | (z[29] << 8));  // first entry's data
  for (size_t i = data + 3; i < data + 40; ++i) z[i] ^= 0x5a;
  expect_ckpt_error(z, "archive/data.pkl");
}

TEST(ZipBad, CrcMismatch) {
  Bytes zip = Sample().zip();
  set32(zip, central_of(zip, "archive/data.pkl") + 16, 0x12345678);
  expect_ckpt_error(zip, "CRC-32");
}

TEST(CkptBad, MissingPickleAndLegacyFormats) {
  Sample s;
  auto es = s.entries({});
  es.erase(es.begin());
  expect_ckpt_error(write_zip(es), "no <folder>/data.pkl");
  PB legacy;
  legacy.proto(2).integer(0x1950a86a).stop();
  expect_ckpt_error(legacy.b, "legacy PyTorch format not supported; re-save with torch>=1.6 or convert to safetensors");
  Bytes tar(1024, 0);
  std::memcpy(&tar[257], "ustar", 5);
  expect_ckpt_error(tar, "legacy PyTorch format");
}

TEST(CkptBad, ByteOrderAndTopLevel) {
  Sample s;
  auto es = s.entries(torch_pickle(s.specs));
  es.push_back({"archive/byteorder", bytes_of("big")});
  expect_ckpt_error(write_zip(es), "byte order is 'big'");
  es.back().data = bytes_of("little");
  Bytes ok = write_zip(es);
  EXPECT_EQ(parse_ckpt(ok.data(), ok.size(), kPath, nullptr).size(), 3u);
  PB p;
  p.proto(2).op(']').stop();
  expect_pickle_error(p.b, "expected a dict of tensors");
}

TEST(CkptBad, MissingStorageAndExtents) {
  Sample s;
  auto specs = s.specs;
  specs[2].key = "7";
  expect_pickle_error(torch_pickle(specs), "no entry archive/data/7");
  specs = s.specs;
  specs[0].size = {4, 4};  // 16 elements over a 12-element storage
  specs[0].stride = row_major({4, 4});
  expect_pickle_error(torch_pickle(specs), "beyond its storage");
  specs = s.specs;
  specs[1].offset = 10;  // 4 elements from 10 over 12
  expect_pickle_error(torch_pickle(specs), "beyond its storage");
  specs = s.specs;
  specs[0].numel = 1000;  // storage claims more than its entry holds
  expect_pickle_error(torch_pickle(specs), "holds only");
  specs = s.specs;
  specs[0].size = {-3, 4};
  expect_pickle_error(torch_pickle(specs), "negative size");
  specs = s.specs;
  specs[0].stride = {1ll << 62, 1ll << 62};
  expect_pickle_error(torch_pickle(specs), "a.weight");
  specs = s.specs;
  specs[0].size = {1, 1, 1, 1, 1, 1, 1, 1, 1, 12};
  specs[0].stride = row_major(specs[0].size);
  expect_pickle_error(torch_pickle(specs), "rank 10");
  specs = s.specs;
  specs[0].offset = -1;
  expect_pickle_error(torch_pickle(specs), "negative storage offset");
  specs = s.specs;
  specs[1].name = "a.weight";  // the same name twice in one dict: later wins, as in Python
  Bytes zip = write_zip(s.entries(torch_pickle(specs)));
  TensorFile tf = parse_ckpt(zip.data(), zip.size(), kPath, nullptr);
  EXPECT_EQ(tf.size(), 2u);
  EXPECT_EQ(tf.find("a.weight")->shape(), Shape({4}));
}

TEST(CkptBad, ManyCopiesOfOneStorageAreBounded) {
  // The same pickled tensor under many names is built once.
  Sample s;
  auto specs = s.specs;
  specs.resize(1);
  specs[0].size = {4, 3};
  specs[0].stride = {1, 4};
  PB p;
  p.proto(2).op('}').mark().str("state_dict").op('}').mark().str("t").put(1);
  tensor_rebuild(p, specs[0]);
  p.put(2);
  for (int i = 0; i < 1000; ++i) p.str(cat("t", i)).get(2);
  p.op('u').op('u').stop();
  Bytes zip = write_zip(s.entries(p.b));
  TensorFile tf = parse_ckpt(zip.data(), zip.size(), kPath, nullptr);
  ASSERT_EQ(tf.size(), 1001u);
  EXPECT_EQ(tf.find("t999")->data(), tf.find("t")->data());
  EXPECT_FALSE(inside(tf.find("t")->data(), zip));
  // Distinct strided views of one 4 MiB storage: copies stop at the file size plus 64 MiB.
  TSpec big{"v", "FloatStorage", "0", 1 << 20, 0, {1024, 1024}, {1, 1024}};
  PB q;
  q.proto(2).op('}').mark();
  for (int i = 0; i < 40; ++i) {
    q.str(cat("v", i));
    tensor_rebuild(q, big);
  }
  q.op('u').stop();
  auto es = s.entries(q.b);
  es[1].data.assign(4u << 20, 0);
  expect_ckpt_error(write_zip(es), "copies of strided or misaligned tensors exceed");
}

// ---------------------------------------------------------------------------------------------
// No-crash loops over randomly mutated inputs (run clean under ASan/UBSan).

Bytes mutate(const Bytes& in, std::mt19937& rng) {
  Bytes b = in;
  int kind = int(rng() % 4);
  if (kind == 0 && !b.empty()) {
    b.resize(rng() % b.size());
  } else if (kind == 1) {
    for (int n = 1 + int(rng() % 8); n > 0 && !b.empty(); --n) b[rng() % b.size()] = uint8_t(rng());
  } else if (kind == 2 && !b.empty()) {
    size_t at = rng() % b.size();
    static const uint8_t interesting[] = {0x00, 0xff, 0x7f, 0x80, '(', 't', 'R', 'Q', 'h', 'q', '.', 0x93};
    for (int n = 1 + int(rng() % 4); n > 0; --n) b.insert(b.begin() + ptrdiff_t(at), interesting[rng() % 12]);
  } else if (!b.empty()) {
    size_t at = rng() % b.size();
    b.erase(b.begin() + ptrdiff_t(at), b.begin() + ptrdiff_t(std::min(b.size(), at + 1 + rng() % 16)));
  }
  return b;
}

TEST(Fuzz, MutatedPicklesInsideValidZips) {
  Sample s;
  Bytes pkl = torch_pickle(s.specs, true, [](PB& p) {
    p.str("cb").global("pytorch_lightning.callbacks", "X").op(')').op('R').op('}').op('b');
  });
  std::mt19937 rng(1234);
  int loaded = 0;
  for (int i = 0; i < 3000; ++i) {
    Bytes m = mutate(pkl, rng);
    fuzz_unpickle(m.data(), m.size());
    Bytes zip = write_zip(s.entries(m));
    try {
      TensorFile tf = parse_ckpt(zip.data(), zip.size(), kPath, nullptr);
      for (const TensorEntry& e : tf.tensors) {
        volatile uint8_t sink = static_cast<const uint8_t*>(e.tensor.data())[e.tensor.bytes() ? e.tensor.bytes() - 1 : 0];
        (void)sink;
      }
      ++loaded;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind(kPath, 0), 0u) << e.what();
    }
  }
  EXPECT_GT(loaded, 10) << "mutations are not all fatal";
  EXPECT_LT(loaded, 3000);
}

TEST(Fuzz, MutatedZips) {
  Sample s;
  std::mt19937 rng(99);
  for (bool z64 : {false, true}) {
    auto es = s.entries(torch_pickle(s.specs));
    es[1].deflate = true;
    Bytes zip = write_zip(es, z64);
    int loaded = 0;
    for (int i = 0; i < 2000; ++i) {
      Bytes m = mutate(zip, rng);
      fuzz_zip(m.data(), m.size());
      try {
        TensorFile tf = parse_ckpt(m.data(), m.size(), kPath, nullptr);
        ++loaded;
      } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()).rfind(kPath, 0), 0u) << e.what();
      }
    }
    EXPECT_LT(loaded, 2000);
  }
}

}  // namespace
