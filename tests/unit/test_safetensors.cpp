// safetensors reader/writer, diffusers folders and open_model_file.
#include <gtest/gtest.h>

#include "../common/expect_error.h"
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/tensor_file.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

std::string shared_path(const std::string& rel) { return std::string(DIFFUSE_SHARED_DIR) + "/" + rel; }

// The tiny SD1 fixtures: a copy under tests/data wins over ../shared.
std::string sd1_model(const std::string& name) {
  std::string local = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/" + name;
  if (fs::exists(local)) return local;
  return shared_path("fixtures/sd1/model/" + name);
}

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "diffuse_st_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }
  std::string dir_;
};

void write_file(const std::string& path, const std::string& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A safetensors file from a header text and a data area.
std::string make_st(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = char(uint8_t(n >> (8 * i)));
  return out + header + data;
}


Tensor iota(const Shape& s, DType t) {
  Tensor x = Tensor::empty(s, t);
  auto* p = static_cast<uint8_t*>(x.data());
  for (size_t i = 0; i < x.bytes(); ++i) p[i] = uint8_t(i * 7 + 3);
  return x;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.bytes() == b.bytes() && (a.bytes() == 0 || std::memcmp(a.data(), b.data(), a.bytes()) == 0);
}

// True if p lies in a mapping of `file` in this process.
bool in_mapping_of(const void* p, const std::string& file) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  auto target = fs::canonical(file).string();
  auto a = reinterpret_cast<uintptr_t>(p);
  while (std::getline(maps, line)) {
    if (line.size() < target.size() || line.compare(line.size() - target.size(), target.size(), target) != 0)
      continue;
    uintptr_t lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) == 2 && a >= lo && a < hi) return true;
  }
  return false;
}

}  // namespace

using Safetensors = TempDir;

TEST_F(Safetensors, RoundTripAllDtypesAndShapes) {
  std::vector<std::pair<std::string, Tensor>> in = {
      {"f32", iota({2, 3}, DType::F32)},       {"f16", iota({4}, DType::F16)},
      {"bf16", iota({1, 2, 3}, DType::BF16)},  {"f64.scalar", iota({}, DType::F64)},
      {"i64", iota({3}, DType::I64)},          {"i32", iota({2, 2}, DType::I32)},
      {"i16", iota({5}, DType::I16)},          {"i8", iota({7}, DType::I8)},
      {"u8", iota({3, 1}, DType::U8)},         {"bool", iota({2}, DType::Bool)},
      {"empty", iota({0, 5}, DType::F32)},     {"a.last", iota({2, 1, 1, 1, 1, 1, 1, 2}, DType::F16)},
  };
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "quote \" and \xc3\xa9"}};
  std::string p = path("rt.safetensors");
  save_safetensors(p, in, meta);
  EXPECT_FALSE(fs::exists(p + ".tmp"));

  std::string raw = read_file(p);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(raw[i])) << (8 * i);
  EXPECT_EQ((8 + n) % 8, 0u) << "data area must start 8-byte aligned";

  TensorFile tf = load_safetensors(p);
  EXPECT_EQ(tf.format, "safetensors");
  EXPECT_EQ(tf.path, p);
  EXPECT_EQ(tf.metadata, meta);
  EXPECT_TRUE(tf.warnings.empty());
  ASSERT_EQ(tf.size(), in.size());
  // Data order is the given order, stably grouped by element size (widest first): all aligned.
  std::vector<std::string> expected_order;
  for (size_t w : {8, 4, 2, 1})
    for (const auto& [name, t] : in)
      if (dtype_size(t.dtype()) == w) expected_order.push_back(name);
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_EQ(tf.tensors[i].name, expected_order[i]);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(tf.tensors[i].tensor.data()) % dtype_size(tf.tensors[i].tensor.dtype()), 0u);
    const Tensor* t = tf.find(in[i].first);
    ASSERT_NE(t, nullptr) << in[i].first;
    EXPECT_EQ(t->shape(), in[i].second.shape()) << in[i].first;
    EXPECT_EQ(t->dtype(), in[i].second.dtype()) << in[i].first;
    EXPECT_TRUE(same_bytes(*t, in[i].second)) << in[i].first;
  }
  EXPECT_EQ(tf.find("f64.scalar")->rank(), 0);
  EXPECT_EQ(tf.find("f64.scalar")->numel(), 1);
  EXPECT_EQ(tf.find("empty")->numel(), 0);
  EXPECT_EQ(tf.find("missing"), nullptr);

  // Saving over an existing file replaces it (and the old mapping stays valid).
  save_safetensors(p, {{"only", iota({3}, DType::U8)}});
  EXPECT_TRUE(same_bytes(*tf.find("f32"), in[0].second));
  TensorFile again = load_safetensors(p);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_TRUE(again.metadata.empty());
}

TEST_F(Safetensors, EmptyFileOfTensorsRoundTrips) {
  std::string p = path("none.safetensors");
  save_safetensors(p, {});
  TensorFile tf = load_safetensors(p);
  EXPECT_EQ(tf.size(), 0u);
}

TEST_F(Safetensors, TensorsBorrowTheMapping) {
  std::string p = path("b.safetensors");
  save_safetensors(p, {{"x", iota({16, 16}, DType::F32)}, {"y", iota({33}, DType::F16)}});
  Tensor kept;
  {
    TensorFile tf = load_safetensors(p);
    for (const auto& e : tf.tensors) EXPECT_TRUE(in_mapping_of(e.tensor.data(), p)) << e.name;
    EXPECT_EQ(tf.tensors[0].tensor.storage(), tf.tensors[1].tensor.storage()) << "one storage per file";
    kept = tf.tensors[1].tensor;
  }
  // The tensor keeps the mapping alive after the TensorFile is gone.
  EXPECT_TRUE(in_mapping_of(kept.data(), p));
  EXPECT_TRUE(same_bytes(kept, iota({33}, DType::F16)));

  // parse_safetensors on a caller buffer points into that buffer.
  std::string raw = read_file(p);
  std::vector<uint64_t> buf((raw.size() + 7) / 8);
  std::memcpy(buf.data(), raw.data(), raw.size());
  auto* bytes = reinterpret_cast<const uint8_t*>(buf.data());
  TensorFile tf = parse_safetensors(bytes, raw.size(), "mem", nullptr);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(bytes[i]) << (8 * i);
  EXPECT_EQ(tf.find("x")->data(), bytes + 8 + n);
  EXPECT_EQ(tf.find("y")->data(), bytes + 8 + n + 16 * 16 * 4);
}

// Dropping the pages of a file-mapped tensor frees memory but never loses data: the next read
// comes back from the file. On heap or caller memory it must do nothing (MADV_DONTNEED would zero
// anonymous memory).
TEST_F(Safetensors, DropPagesKeepsData) {
  std::string p = path("d.safetensors");
  Tensor big = iota({1 << 20}, DType::F32);  // 4 MiB: whole pages inside
  save_safetensors(p, {{"big", big}, {"small", iota({7}, DType::F16)}});
  TensorFile tf = load_safetensors(p);
  for (const auto& e : tf.tensors) {
    ASSERT_TRUE(same_bytes(e.tensor, e.name == "big" ? big : iota({7}, DType::F16))) << e.name;
    e.tensor.drop_pages();
  }
  EXPECT_TRUE(same_bytes(*tf.find("big"), big));
  EXPECT_TRUE(same_bytes(*tf.find("small"), iota({7}, DType::F16)));

  Tensor heap = big.clone();
  heap.drop_pages();
  EXPECT_TRUE(same_bytes(heap, big)) << "heap memory must be left alone";
  std::string raw = read_file(p);
  std::vector<uint64_t> buf((raw.size() + 7) / 8);
  std::memcpy(buf.data(), raw.data(), raw.size());
  TensorFile mem = parse_safetensors(reinterpret_cast<const uint8_t*>(buf.data()), raw.size(), "mem", nullptr);
  mem.find("big")->drop_pages();
  EXPECT_TRUE(same_bytes(*mem.find("big"), big)) << "caller memory must be left alone";
}

TEST_F(Safetensors, MisalignedTensorIsCopiedWithWarning) {
  // The data area starts 8-byte aligned; an F16 at data offset 1 is at an odd address.
  std::string h = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F16","shape":[2],"data_offsets":[1,5]}})";
  while ((8 + h.size()) % 8) h += ' ';
  std::string file = make_st(h, std::string("\x01\x02\x03\x04\x05", 5));
  std::vector<uint64_t> buf((file.size() + 7) / 8);
  std::memcpy(buf.data(), file.data(), file.size());
  TensorFile tf = parse_safetensors(reinterpret_cast<const uint8_t*>(buf.data()), file.size(), "m", nullptr);
  const Tensor* b = tf.find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b->data()) % 2, 0u);
  EXPECT_EQ(std::memcmp(b->data(), "\x02\x03\x04\x05", 4), 0);
  ASSERT_EQ(tf.warnings.size(), 1u);
  EXPECT_NE(tf.warnings[0].find("aligned"), std::string::npos);
}

TEST_F(Safetensors, OrderFollowsDataOffsetsAndGapsWarn) {
  std::string h = R"({"z":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                  R"("a":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},)"
                  R"("m":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})";
  std::string p = path("order.safetensors");
  write_file(p, make_st(h, "abcdefgh"));
  TensorFile tf = load_safetensors(p);
  ASSERT_EQ(tf.size(), 3u);
  EXPECT_EQ(tf.tensors[0].name, "z");
  EXPECT_EQ(tf.tensors[1].name, "m");
  EXPECT_EQ(tf.tensors[2].name, "a");
  ASSERT_EQ(tf.warnings.size(), 1u);
  EXPECT_NE(tf.warnings[0].find("4 bytes"), std::string::npos) << tf.warnings[0];
  EXPECT_EQ(std::memcmp(tf.find("a")->data(), "ef", 2), 0);
}

TEST_F(Safetensors, SaveRejectsBadInput) {
  std::string p = path("bad.safetensors");
  expect_error([&] { save_safetensors(p, {{"a", iota({1}, DType::F32)}, {"a", iota({1}, DType::F32)}}); }, p,
               "twice");
  expect_error([&] { save_safetensors(p, {{"u", Tensor()}}); }, p, "undefined");
  expect_error([&] { save_safetensors(p, {{"__metadata__", iota({1}, DType::F32)}}); }, p, "__metadata__");
  expect_error([&] { save_safetensors(p, {{"\xff\xfe", iota({1}, DType::F32)}}); }, p, "UTF-8");
  std::string nodir = path("no/such/dir/x.safetensors");
  expect_error([&] { save_safetensors(nodir, {{"a", iota({1}, DType::F32)}}); }, nodir, "cannot create");
  EXPECT_FALSE(fs::exists(p));
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

// Each malformed file: the expected keyword in the error.
TEST_F(Safetensors, MalformedHeadersAreRejected) {
  const std::string e8 = std::string(8, '\0');
  struct Case {
    const char* name;
    std::string bytes;
    const char* keyword;
  };
  auto ent = [](const std::string& body) { return "{\"t\":" + body + "}"; };
  std::vector<Case> cases = {
      {"short", "abc", "shorter than"},
      {"empty", "", "shorter than"},
      {"huge_len", [] { std::string s(8, '\0'); s[7] = 0x10; return s + "{}"; }(), "absurd"},
      {"len_past_end", make_st("{}", "").substr(0, 8) + "{", "exceeds the file size"},
      {"not_json", make_st("{not json", ""), "not valid JSON"},
      {"zero_len", make_st("", ""), "not valid JSON"},
      {"array", make_st("[1,2]", ""), "not a JSON object"},
      {"entry_not_object", make_st(ent("3"), ""), "not a JSON object"},
      {"no_dtype", make_st(ent(R"({"shape":[1],"data_offsets":[0,1]})"), "x"), "missing \"dtype\""},
      {"no_shape", make_st(ent(R"({"dtype":"U8","data_offsets":[0,1]})"), "x"), "missing \"shape\""},
      {"no_offsets", make_st(ent(R"({"dtype":"U8","shape":[1]})"), "x"), "missing \"data_offsets\""},
      {"dtype_number", make_st(ent(R"({"dtype":5,"shape":[1],"data_offsets":[0,1]})"), "x"), "not a string"},
      {"shape_string", make_st(ent(R"({"dtype":"U8","shape":"1","data_offsets":[0,1]})"), "x"), "not an array"},
      {"dim_float", make_st(ent(R"({"dtype":"U8","shape":[1.5],"data_offsets":[0,1]})"), "x"), "not an integer"},
      {"offsets_one", make_st(ent(R"({"dtype":"U8","shape":[1],"data_offsets":[0]})"), "x"), "two integers"},
      {"offsets_neg", make_st(ent(R"({"dtype":"U8","shape":[0],"data_offsets":[-1,0]})"), "x"), "negative"},
      {"unknown_dtype", make_st(ent(R"({"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]})"), "x"), "F8_E4M3"},
      {"size_mismatch", make_st(ent(R"({"dtype":"F32","shape":[2],"data_offsets":[0,4]})"), "xxxxxxxx"),
       "size mismatch"},
      {"past_end", make_st(ent(R"({"dtype":"U8","shape":[4],"data_offsets":[0,4]})"), "xx"), "past the end"},
      {"begin_gt_end", make_st(ent(R"({"dtype":"U8","shape":[0],"data_offsets":[3,1]})"), "xxxx"), "> end"},
      {"negative_dim", make_st(ent(R"({"dtype":"U8","shape":[-2],"data_offsets":[0,0]})"), ""), "negative"},
      {"overflow", make_st(ent(R"({"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,4]})"), "xxxx"),
       "overflows"},
      {"overflow_zero", make_st(ent(R"({"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]})"), ""),
       "overflows"},
      {"dim_too_large", make_st(ent(R"({"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]})"), ""),
       "too large"},
      {"rank9", make_st(ent(R"({"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]})"), "x"),
       "dimensions"},
      {"overlap",
       make_st(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}})",
               "xxxxxx"),
       "overlap"},
      {"duplicate",
       make_st(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
               "xx"),
       "twice"},
      {"meta_nonstring", make_st(R"({"__metadata__":{"k":1}})", ""), "not a string"},
      {"meta_array", make_st(R"({"__metadata__":["k"]})", ""), "__metadata__"},
      {"deep", make_st(std::string(100000, '[') + std::string(100000, ']'), ""), "nested"},
      {"deep_in_object", make_st("{\"a\":" + std::string(5000, '[') + std::string(5000, ']') + "}", ""), "nested"},
      {"bad_utf8", make_st("{\"\xff\":1}", ""), "not valid JSON"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    std::string p = path(std::string(c.name) + ".safetensors");
    write_file(p, c.bytes);
    expect_error([&] { load_safetensors(p); }, p, c.keyword);
  }
  // The unknown dtype error names the tensor too.
  std::string p = path("unknown_dtype.safetensors");
  expect_error([&] { load_safetensors(p); }, p, "tensor 't'");
}

TEST_F(Safetensors, TruncatedFilesAreRejected) {
  std::string p = path("full.safetensors");
  save_safetensors(p, {{"a", iota({64}, DType::F32)}, {"b", iota({3, 5}, DType::F16)}, {"c", iota({9}, DType::U8)}});
  std::string full = read_file(p);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(full[i])) << (8 * i);
  std::string cut = path("cut.safetensors");
  for (size_t len : {size_t(0), size_t(4), size_t(8), size_t(9), size_t(8 + n / 2), size_t(8 + n),
                     size_t(8 + n + 1), size_t(8 + n + 100), full.size() - 1}) {
    SCOPED_TRACE(len);
    write_file(cut, full.substr(0, len));
    const char* kw = len < 8 ? "shorter than" : len < 8 + n ? "exceeds the file size" : "past the end";
    expect_error([&] { load_safetensors(cut); }, cut, kw);
  }
}

TEST(SafetensorsFuzz, RandomAndMutatedInputsNeverCrash) {
  std::mt19937_64 rng(1234);
  std::string valid = make_st(
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]},"s":{"dtype":"I64","shape":[],"data_offsets":[20,28]}})",
      std::string(28, '\x11'));
  const char* tokens[] = {"{", "}", "[", "]", ",", ":", "\"", "-1", "0", "1e400", "18446744073709551616",
                          "null", "\"F8_E5M2\"", "\"dtype\"", "\"shape\"", "\"data_offsets\"", " ", "\\u0000"};
  size_t ok = 0, errors = 0;
  auto run = [&](const std::string& bytes) {
    std::vector<uint64_t> buf(bytes.size() / 8 + 1);
    std::memcpy(buf.data(), bytes.data(), bytes.size());
    try {
      TensorFile tf = parse_safetensors(reinterpret_cast<const uint8_t*>(buf.data()), bytes.size(), "fuzz", nullptr);
      for (const auto& e : tf.tensors) {  // touching every byte must stay inside the buffer
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < e.tensor.bytes(); ++i) sink = sink ^ static_cast<const uint8_t*>(e.tensor.data())[i];
        (void)sink;
      }
      ++ok;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("fuzz: ", 0), 0u) << e.what();
      ++errors;
    }
  };
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s;
    switch (iter % 3) {
      case 0: {  // random bytes behind a plausible length
        size_t len = rng() % 64;
        s = std::string(8, '\0');
        uint64_t n = rng() % 80;
        for (int i = 0; i < 8; ++i) s[i] = char(uint8_t(n >> (8 * i)));
        for (size_t i = 0; i < len; ++i) s += char(rng());
        break;
      }
      case 1: {  // byte flips in a valid file
        s = valid;
        for (int k = 0, m = 1 + int(rng() % 4); k < m; ++k) s[rng() % s.size()] = char(rng());
        break;
      }
      case 2: {  // token splices in the header, length kept consistent
        std::string h = valid.substr(8, valid.size() - 8 - 28);
        for (int k = 0, m = 1 + int(rng() % 3); k < m; ++k) {
          size_t at = rng() % h.size();
          h.replace(at, rng() % 4, tokens[rng() % (sizeof tokens / sizeof *tokens)]);
        }
        s = make_st(h, std::string(rng() % 40, '\x22'));
        break;
      }
    }
    run(s);
  }
  run(valid);
  EXPECT_GT(errors, 1000u);
  EXPECT_GT(ok, 0u);
}

TEST(SafetensorsFixture, TinySd1Checkpoint) {
  std::string p = sd1_model("tiny-sd1.safetensors");
  if (!fs::exists(p)) GTEST_SKIP() << "fixture absent: " << p;
  TensorFile tf = load_safetensors(p);
  EXPECT_EQ(tf.size(), 980u);
  EXPECT_TRUE(tf.warnings.empty());
  const Tensor* w = tf.find("model.diffusion_model.input_blocks.0.0.weight");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->shape(), Shape({32, 4, 3, 3}));
  EXPECT_EQ(w->dtype(), DType::F16);
  const Tensor* tok = tf.find("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight");
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->shape(), Shape({49408, 64}));
  EXPECT_TRUE(in_mapping_of(tok->data(), p));
  // Values are finite f16 numbers (exponent not all ones).
  const uint16_t* h = w->data<uint16_t>();
  for (int64_t i = 0; i < w->numel(); ++i) ASSERT_NE(h[i] & 0x7c00, 0x7c00) << i;

  TensorFile viaopen = open_model_file(p);
  EXPECT_EQ(viaopen.format, "safetensors");
  EXPECT_EQ(viaopen.size(), tf.size());
}

TEST(SafetensorsFixture, DiffusersFolder) {
  std::string d = sd1_model("diffusers");
  if (!fs::exists(d + "/model_index.json")) GTEST_SKIP() << "fixture absent: " << d;
  EXPECT_TRUE(is_diffusers_dir(d));
  EXPECT_TRUE(is_diffusers_dir(d + "/unet"));
  EXPECT_FALSE(is_diffusers_dir(d + "/tokenizer"));
  EXPECT_FALSE(is_diffusers_dir(d + "/unet/config.json"));

  TensorFile tf = load_diffusers(d);
  EXPECT_EQ(tf.format, "diffusers");
  EXPECT_EQ(tf.size(), 684u + 52u + 244u);
  const Tensor* c = tf.find("unet/conv_in.weight");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->shape(), Shape({32, 4, 3, 3}));
  EXPECT_EQ(c->dtype(), DType::F16);
  EXPECT_NE(tf.find("vae/decoder.conv_in.weight"), nullptr);
  EXPECT_NE(tf.find("text_encoder/text_model.embeddings.token_embedding.weight"), nullptr);
  for (const auto& e : tf.tensors) {
    EXPECT_TRUE(e.name.rfind("unet/", 0) == 0 || e.name.rfind("vae/", 0) == 0 ||
                e.name.rfind("text_encoder/", 0) == 0)
        << e.name;
  }
  // Component order is model_index.json order: text_encoder, unet, vae.
  EXPECT_EQ(tf.tensors.front().name.rfind("text_encoder/", 0), 0u);
  EXPECT_EQ(tf.tensors.back().name.rfind("vae/", 0), 0u);
  ASSERT_TRUE(tf.metadata.count("model_index.json"));
  EXPECT_NE(tf.metadata["model_index.json"].find("StableDiffusionPipeline"), std::string::npos);
  ASSERT_TRUE(tf.metadata.count("unet/config.json"));
  EXPECT_NE(tf.metadata["unet/config.json"].find("UNet2DConditionModel"), std::string::npos);
  EXPECT_TRUE(tf.metadata.count("vae/config.json"));
  EXPECT_TRUE(tf.metadata.count("text_encoder/config.json"));
  EXPECT_FALSE(tf.metadata.count("tokenizer/config.json"));

  TensorFile viaopen = open_model_file(d);
  EXPECT_EQ(viaopen.format, "diffusers");
  EXPECT_EQ(viaopen.size(), tf.size());

  // A single component folder: bare names.
  TensorFile unet = load_diffusers(d + "/unet");
  EXPECT_EQ(unet.size(), 684u);
  EXPECT_NE(unet.find("conv_in.weight"), nullptr);
  EXPECT_TRUE(unet.metadata.count("config.json"));
}

using Diffusers = TempDir;

namespace {
const char* kIndex = R"({"_class_name":"StableDiffusionPipeline","unet":["diffusers","UNet2DConditionModel"],
  "tokenizer":["transformers","CLIPTokenizer"],"safety_checker":[null,null],"vae":["diffusers","AutoencoderKL"]})";
}

TEST_F(Diffusers, ShardedAndVariantComponents) {
  write_file(path("m/model_index.json"), kIndex);
  write_file(path("m/unet/config.json"), R"({"_class_name":"UNet2DConditionModel"})");
  save_safetensors(path("m/unet/diffusion_pytorch_model-00001-of-00002.safetensors"),
                   {{"a.weight", iota({4, 4}, DType::F32)}, {"b.weight", iota({3}, DType::F16)}});
  save_safetensors(path("m/unet/diffusion_pytorch_model-00002-of-00002.safetensors"),
                   {{"c.weight", iota({2, 2}, DType::BF16)}});
  write_file(path("m/unet/diffusion_pytorch_model.safetensors.index.json"),
             R"({"metadata":{"total_size":84},"weight_map":{
               "a.weight":"diffusion_pytorch_model-00001-of-00002.safetensors",
               "b.weight":"diffusion_pytorch_model-00001-of-00002.safetensors",
               "c.weight":"diffusion_pytorch_model-00002-of-00002.safetensors"}})");
  write_file(path("m/tokenizer/vocab.json"), "{}");
  write_file(path("m/vae/config.json"), R"({"_class_name":"AutoencoderKL"})");
  save_safetensors(path("m/vae/diffusion_pytorch_model.fp16.safetensors"), {{"d", iota({5}, DType::F16)}});

  EXPECT_TRUE(is_diffusers_dir(path("m")));
  EXPECT_TRUE(is_diffusers_dir(path("m/unet")));
  TensorFile tf = load_diffusers(path("m"));
  ASSERT_EQ(tf.size(), 4u);
  EXPECT_EQ(tf.tensors[0].name, "unet/a.weight");
  EXPECT_EQ(tf.tensors[2].name, "unet/c.weight");
  EXPECT_EQ(tf.tensors[3].name, "vae/d");
  EXPECT_TRUE(same_bytes(*tf.find("unet/c.weight"), iota({2, 2}, DType::BF16)));
  EXPECT_EQ(tf.find("vae/d")->dtype(), DType::F16);
  EXPECT_EQ(tf.metadata.at("unet/config.json"), R"({"_class_name":"UNet2DConditionModel"})");
  EXPECT_TRUE(tf.metadata.count("vae/config.json"));
  for (const auto& [k, v] : tf.metadata) EXPECT_NE(k.rfind("tokenizer", 0), 0u) << k;
  EXPECT_TRUE(tf.warnings.empty());

  // The sharded component alone: bare names.
  TensorFile unet = load_diffusers(path("m/unet"));
  ASSERT_EQ(unet.size(), 3u);
  EXPECT_NE(unet.find("b.weight"), nullptr);

  // A tensor listed in the map but absent from its shard.
  std::string index = path("m/unet/diffusion_pytorch_model.safetensors.index.json");
  write_file(index, R"({"weight_map":{"a.weight":"diffusion_pytorch_model-00001-of-00002.safetensors",
                        "zz":"diffusion_pytorch_model-00002-of-00002.safetensors"}})");
  expect_error([&] { load_diffusers(path("m")); }, index, "zz");
  // A missing shard.
  write_file(index, R"({"weight_map":{"a.weight":"diffusion_pytorch_model-00009-of-00009.safetensors"}})");
  expect_error([&] { load_diffusers(path("m")); }, index, "missing");
  // A shard outside the folder.
  write_file(index, R"({"weight_map":{"a.weight":"../vae/diffusion_pytorch_model.fp16.safetensors"}})");
  expect_error([&] { load_diffusers(path("m")); }, index, "not a file in the same folder");
  write_file(index, R"({"weight_map":[1]})");
  expect_error([&] { load_diffusers(path("m")); }, index, "weight_map");
  write_file(index, "{oops");
  expect_error([&] { load_diffusers(path("m")); }, index, "not valid JSON");
}

TEST_F(Diffusers, BinWeightsAndBadFolders) {
  write_file(path("m/model_index.json"), kIndex);
  write_file(path("m/unet/config.json"), "{}");
  write_file(path("m/unet/diffusion_pytorch_model.bin"), "PK\x03\x04");
  expect_error([&] { load_diffusers(path("m")); }, path("m/unet"), ".bin");
  expect_error([&] { open_model_file(path("m")); }, path("m/unet"), "convert them to safetensors");

  // Nothing with weights at all.
  write_file(path("e/model_index.json"), kIndex);
  expect_error([&] { load_diffusers(path("e")); }, path("e"), "no component folder");
  write_file(path("j/model_index.json"), "[1, 2");
  expect_error([&] { load_diffusers(path("j")); }, path("j/model_index.json"), "not valid JSON");
  fs::create_directories(path("plain"));
  EXPECT_FALSE(is_diffusers_dir(path("plain")));
  expect_error([&] { load_diffusers(path("plain")); }, path("plain"), "not a diffusers folder");
  expect_error([&] { load_diffusers(path("nope")); }, path("nope"), "no such file");
}

TEST_F(Safetensors, OpenModelFileDispatch) {
  std::string missing = path("missing.safetensors");
  expect_error([&] { open_model_file(missing); }, missing, "no such file or directory");
  std::string p = path("x.bin");  // the extension does not matter
  save_safetensors(p, {{"a", iota({2}, DType::I32)}});
  TensorFile tf = open_model_file(p);
  EXPECT_EQ(tf.format, "safetensors");
  EXPECT_NE(tf.find("a"), nullptr);
  std::string junk = path("junk");
  write_file(junk, "hello world, not a model");
  expect_error([&] { open_model_file(junk); }, junk, "header length");
  // Zip magic goes to the checkpoint reader, whatever the extension.
  std::string zip = path("model.safetensors");
  write_file(zip, std::string("PK\x03\x04", 4) + std::string(40, '\0'));
  try {
    open_model_file(zip);
    ADD_FAILURE() << "a truncated zip loaded";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(zip, 0), 0u) << e.what();
    EXPECT_EQ(std::string(e.what()).find("safetensors header"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsFixture, OpenModelFileSendsZipToCkptReader) {
  std::string p = sd1_model("tiny-sd1.ckpt");
  if (!fs::exists(p)) GTEST_SKIP() << "fixture absent: " << p;
  try {
    TensorFile tf = open_model_file(p);
    EXPECT_EQ(tf.format, "ckpt");
    EXPECT_GT(tf.size(), 0u);
  } catch (const Error& e) {
    // The ckpt reader is tested in test_ckpt; here only the routing matters.
    EXPECT_EQ(std::string(e.what()).find("safetensors header"), std::string::npos) << e.what();
  }
}

TEST(TensorFileIndex, DuplicateNamesAndFind) {
  TensorFile tf;
  tf.path = "mem";
  tf.tensors.push_back({"a", Tensor::zeros({1})});
  tf.tensors.push_back({"b", Tensor::zeros({2})});
  tf.build_index();
  ASSERT_NE(tf.find("b"), nullptr);
  EXPECT_EQ(tf.find("b")->numel(), 2);
  tf.tensors.push_back({"a", Tensor::zeros({3})});
  expect_error([&] { tf.build_index(); }, "mem", "duplicate tensor name 'a'");
}
