// Textual inversion: embedding files in A1111's and diffusers' formats (written here in their real
// key layouts), the chunking of prompts that use them, and the conditioning they give — checked
// against the plain encoding of a model whose token-embedding table holds the vectors at unused
// token ids (an independent way to get the same numbers) — and the engine's use of a folder of
// them (PNG parameters "TI hashes", unknown names, wrong-architecture files).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "../common/expect_error.h"
#include "../common/torch_pth.h"
#include "api/engine.h"
#include "core/error.h"
#include "core/sha256.h"
#include "io/tensor_file.h"
#include "pipeline/conditioning.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

const char* kTokEmb = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
constexpr int kSlot = 49400;  // token ids whose table rows the reference model overwrites (never in the prompts)

std::string data(const std::string& rel) {
  for (const std::string& base : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/", std::string(DIFFUSE_TEST_DATA) + "/"})
    if (fs::exists(base + rel)) return base + rel;
  return "";
}

const ClipTokenizer& tok() { return ClipTokenizer::builtin(); }

// n random vectors of width w, exactly representable in f16 (the tiny model's table is f16).
Tensor f16_exact_vectors(int64_t n, int64_t w, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.5f);
  Tensor t = Tensor::empty({n, w});
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = f16_to_f32(f32_to_f16(nd(rng)));
  return t;
}

class EmbeddingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = data("sd1/model/tiny-sd1.safetensors");
    if (model_.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors (tests/data or ../shared/fixtures)";
    dir_ = fs::temp_directory_path() /
           ("diffuse_test_embedding_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    be_ = make_cpu_backend(Precision::F32);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::unique_ptr<SDModel> load_te(const std::string& path) {
    SDLoadOptions o;
    o.unet = o.vae_encoder = o.vae_decoder = false;
    return SDModel::load(path, *be_, o);
  }
  int64_t width() {
    TensorFile f = open_model_file(model_);
    return f.find(kTokEmb)->dim(1);
  }
  // A copy of the tiny model whose token rows kSlot.. hold `vecs` (the reference encoder).
  std::string model_with_rows(const Tensor& vecs) {
    TensorFile f = open_model_file(model_);
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const TensorEntry& e : f.tensors) {
      if (e.name != kTokEmb) {
        ts.emplace_back(e.name, e.tensor);
        continue;
      }
      Tensor t = e.tensor.to(DType::F32);
      const int64_t W = t.dim(1);
      for (int64_t j = 0; j < vecs.dim(0); ++j)
        for (int64_t c = 0; c < W; ++c) t.f32()[(kSlot + j) * W + c] = vecs.f32()[j * W + c];
      ts.emplace_back(e.name, t.to(e.tensor.dtype()));
    }
    const std::string path = (dir_ / "reference-model.safetensors").string();
    save_safetensors(path, ts);
    return path;
  }
  // BOS + content + EOS, padded with EOS (SD 1.x), weights 1 except `w` at [wfrom, wto).
  static TokenChunk chunk(const std::vector<int>& content, float w = 1, size_t wfrom = 0, size_t wto = 0) {
    TokenChunk c;
    c.ids.push_back(tok().bos_id());
    c.ids.insert(c.ids.end(), content.begin(), content.end());
    c.ids.push_back(tok().eos_id());
    c.ids.resize(77, tok().eos_id());
    c.weights.assign(77, 1.0f);
    for (size_t i = wfrom; i < wto; ++i) c.weights[i + 1] = w;
    return c;
  }
  static std::vector<int> cat_ids(std::initializer_list<std::vector<int>> parts) {
    std::vector<int> v;
    for (const auto& p : parts) v.insert(v.end(), p.begin(), p.end());
    return v;
  }
  static double max_diff(const Tensor& a, const Tensor& b) {
    EXPECT_EQ(a.shape(), b.shape());
    double m = 0;
    for (int64_t i = 0; i < std::min(a.numel(), b.numel()); ++i)
      m = std::max(m, double(std::fabs(a.f32()[i] - b.f32()[i])));
    return m;
  }

  std::string model_;
  fs::path dir_;
  std::unique_ptr<Backend> be_;
};

}  // namespace

// ---- file formats ----

TEST_F(EmbeddingTest, FormatsA1111SafetensorsDiffusersAndSdxl) {
  const Tensor v = f16_exact_vectors(3, 768, 1);
  save_safetensors((dir_ / "a1111.safetensors").string(), {{"emb_params", v}});
  Embedding a = load_embedding((dir_ / "a1111.safetensors").string());
  EXPECT_EQ(a.name, "a1111");
  EXPECT_EQ(a.vectors(), 3);
  EXPECT_FALSE(a.sdxl());
  EXPECT_EQ(max_diff(a.vec[0], v), 0.0);
  EXPECT_NE(a.describe().find("SD 1.x"), std::string::npos) << a.describe();

  // A1111 / original textual inversion .pt: {"string_to_param": {"*": [n, W]}} in a torch zip.
  torch_pth::Tensor star{"*", {3, 768}, std::vector<float>(v.f32(), v.f32() + v.numel())};
  torch_pth::write((dir_ / "a1111pt.pt").string(), {{"string_to_param", {star}}});
  Embedding pt = load_embedding((dir_ / "a1111pt.pt").string());
  EXPECT_EQ(pt.name, "a1111pt");
  EXPECT_EQ(pt.vectors(), 3);
  EXPECT_EQ(max_diff(pt.vec[0], v), 0.0);
  torch_pth::write((dir_ / "two.pt").string(), {{"string_to_param", {star, {"+", {1, 768}, std::vector<float>(768)}}}});
  expect_error([&] { load_embedding((dir_ / "two.pt").string()); }, (dir_ / "two.pt").string(), "string_to_param holds 2");

  // diffusers' learned_embeds: {"<token>": [W]} (one vector), stored f16 here.
  Tensor one = v.slice0(1, 2).reshape({768}).to(DType::F16);
  save_safetensors((dir_ / "learned_embeds.safetensors").string(), {{"<cat-toy>", one}});
  Embedding d = load_embedding((dir_ / "learned_embeds.safetensors").string());
  EXPECT_EQ(d.vectors(), 1);
  EXPECT_EQ(d.vec[0].dtype(), DType::F32);
  EXPECT_EQ(max_diff(d.vec[0], v.slice0(1, 2)), 0.0);

  // SDXL: clip_l + clip_g.
  const Tensor l = f16_exact_vectors(2, 768, 2), g = f16_exact_vectors(2, 1280, 3);
  save_safetensors((dir_ / "xl.safetensors").string(), {{"clip_g", g}, {"clip_l", l}});
  Embedding x = load_embedding((dir_ / "xl.safetensors").string());
  ASSERT_TRUE(x.sdxl());
  EXPECT_EQ(x.vectors(), 2);
  EXPECT_EQ(max_diff(x.vec[0], l), 0.0);
  EXPECT_EQ(max_diff(x.vec[1], g), 0.0);
  EXPECT_EQ(&x.for_encoder(Family::SDXL, 1, 1280), &x.vec[1]);
  // Wrong architecture: named file, what was expected.
  expect_error([&] { x.for_encoder(Family::SD1, 0, 768); }, x.path, "SDXL embedding");
  expect_error([&] { a.for_encoder(Family::SDXL, 0, 768); }, a.path, "clip_g [n, 1280]");
  expect_error([&] { a.for_encoder(Family::SD2, 0, 1024); }, a.path, "needs [n, 1024]");
}

TEST_F(EmbeddingTest, BadFilesAreErrorsNamingTheFile) {
  const Tensor v = f16_exact_vectors(2, 768, 4);
  save_safetensors((dir_ / "two.safetensors").string(), {{"a", v}, {"b", v}});
  expect_error([&] { load_embedding((dir_ / "two.safetensors").string()); }, (dir_ / "two.safetensors").string(),
               "not a textual-inversion embedding");
  save_safetensors((dir_ / "half.safetensors").string(), {{"clip_l", v}});
  expect_error([&] { load_embedding((dir_ / "half.safetensors").string()); }, (dir_ / "half.safetensors").string(), "clip_g");
  save_safetensors((dir_ / "cube.safetensors").string(), {{"emb_params", Tensor::zeros({2, 2, 768})}});
  expect_error([&] { load_embedding((dir_ / "cube.safetensors").string()); }, (dir_ / "cube.safetensors").string(), "[n, width]");
  Tensor nan = v.clone();
  nan.f32()[5] = std::nanf("");
  save_safetensors((dir_ / "nan.safetensors").string(), {{"emb_params", nan}});
  expect_error([&] { load_embedding((dir_ / "nan.safetensors").string()); }, (dir_ / "nan.safetensors").string(), "non-finite");
  save_safetensors((dir_ / "long.safetensors").string(), {{"emb_params", Tensor::zeros({76, 768})}});
  expect_error([&] { load_embedding((dir_ / "long.safetensors").string()); }, (dir_ / "long.safetensors").string(), "1 to 75 vectors");
  { std::FILE* f = std::fopen((dir_ / "junk.pt").c_str(), "wb"); std::fputs("not a zip", f); std::fclose(f); }
  expect_error([&] { load_embedding((dir_ / "junk.pt").string()); }, (dir_ / "junk.pt").string(), "");
}

// ---- chunking ----

TEST_F(EmbeddingTest, ChunkingPlacesVectorsAsA1111) {
  EmbeddingSet set;
  Embedding e;
  e.name = "myemb";
  e.path = "myemb.pt";
  e.vec[0] = Tensor::zeros({3, 8});
  set.add(e);
  const std::vector<int> cat = tok().tokenize("cat");
  ASSERT_EQ(cat.size(), 1u);

  // "a cat myemb cat": the name's tokens become 3 placeholder positions carrying the run's weight.
  std::vector<TokenChunk> c = chunk_prompt("a cat (myemb:1.5) cat", tok().eos_id(), tok(), &set);
  ASSERT_EQ(c.size(), 1u);
  ASSERT_EQ(c[0].fixes.size(), 1u);
  EXPECT_EQ(c[0].fixes[0].pos, 3);  // BOS, "a", "cat"
  for (int i = 3; i < 6; ++i) {
    EXPECT_EQ(c[0].ids[size_t(i)], 0);
    EXPECT_FLOAT_EQ(c[0].weights[size_t(i)], 1.5f);
  }
  EXPECT_EQ(c[0].ids[6], cat[0]);
  EXPECT_EQ(c[0].ids[7], tok().eos_id());

  // 74 words, then the 3 vectors do not fit the chunk's 75: it is closed and they open the next.
  std::string words;
  for (int i = 0; i < 74; ++i) words += "cat ";
  c = chunk_prompt(words + "myemb", tok().eos_id(), tok(), &set);
  ASSERT_EQ(c.size(), 2u);
  EXPECT_TRUE(c[0].fixes.empty());
  EXPECT_EQ(c[0].ids[74], cat[0]);
  EXPECT_EQ(c[0].ids[75], tok().eos_id());
  ASSERT_EQ(c[1].fixes.size(), 1u);
  EXPECT_EQ(c[1].fixes[0].pos, 1);

  // A comma near the end of a full chunk moves what follows it, embeddings included.
  words.clear();
  for (int i = 0; i < 70; ++i) words += "cat ";
  c = chunk_prompt(words + ", myemb cat cat", tok().eos_id(), tok(), &set);
  ASSERT_EQ(c.size(), 2u);
  EXPECT_TRUE(c[0].fixes.empty());
  ASSERT_EQ(c[1].fixes.size(), 1u);
  EXPECT_EQ(c[1].fixes[0].pos, 1);
  EXPECT_EQ(c[1].ids[4], cat[0]);

  // Without the set, or for another word, the text stays text.
  EXPECT_TRUE(chunk_prompt("a cat myemb", tok().eos_id(), tok(), nullptr)[0].fixes.empty());
  EXPECT_TRUE(chunk_prompt("a cat myembx", tok().eos_id(), tok(), &set)[0].fixes.empty());
}

TEST_F(EmbeddingTest, ComfyPrefixAndUnknownNames) {
  EmbeddingSet set;
  Embedding e;
  e.name = "myemb";
  e.vec[0] = Tensor::zeros({1, 8});
  set.add(e);
  std::vector<std::string> unknown;
  EXPECT_EQ(set.rewrite_prefixed("embedding:myemb.pt, (embedding:myemb:1.2) embedding:nope", &unknown),
            "myemb, (myemb:1.2) embedding:nope");
  ASSERT_EQ(unknown.size(), 1u);
  EXPECT_EQ(unknown[0], "nope");
}

TEST_F(EmbeddingTest, FolderListingSkipsFilesThatAreNotEmbeddings) {
  save_safetensors((dir_ / "good.safetensors").string(), {{"emb_params", f16_exact_vectors(2, 768, 5)}});
  fs::create_directories(dir_ / "sub");
  save_safetensors((dir_ / "sub" / "style.safetensors").string(),
                   {{"lora_unet_x.lora_down.weight", Tensor::zeros({4, 8})}, {"lora_unet_x.lora_up.weight", Tensor::zeros({8, 4})}});
  std::shared_ptr<EmbeddingSet> set = EmbeddingSet::from_dir(dir_.string());
  EXPECT_EQ(set->names(), (std::vector<std::string>{"good", "style"}));
  std::vector<const Embedding*> used = set->used_in("a good style picture");
  ASSERT_EQ(used.size(), 1u);
  EXPECT_EQ(used[0]->name, "good");
  std::vector<std::string> w = set->take_warnings();
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("style.safetensors"), std::string::npos) << w[0];
  EXPECT_NE(w[0].find("left as text"), std::string::npos) << w[0];
  EXPECT_TRUE(EmbeddingSet::from_dir((dir_ / "absent").string())->empty());
}

// ---- conditioning: the vectors in place of token embeddings, computed independently ----

TEST_F(EmbeddingTest, ConditioningEqualsPlainEncodingWithTheVectorsAsTokenRows) {
  const int64_t W = width();
  const Tensor vecs = f16_exact_vectors(2, W, 6);
  std::unique_ptr<SDModel> plain = load_te(model_);
  std::unique_ptr<SDModel> ref = load_te(model_with_rows(vecs));
  Arena arena;
  Ctx ctx{*be_, arena};

  EmbeddingSet set;
  Embedding e;
  e.name = "myemb";
  e.path = "myemb.safetensors";
  e.vec[0] = vecs;
  set.add(e);
  PromptOptions with;
  with.embeddings = &set;

  const std::vector<int> head = tok().tokenize("a photo of"), tail = tok().tokenize(", red");
  const std::vector<int> slots = {kSlot, kSlot + 1};
  // Plain weights.
  Conditioning got = encode_prompt(ctx, *plain, "a photo of myemb, red", with);
  Conditioning want = encode_chunks(ctx, *ref, {chunk(cat_ids({head, slots, tail}))}, {}, {});
  EXPECT_LT(max_diff(got.context, want.context), 1e-6);
  // A1111 emphasis on the embedding's positions.
  got = encode_prompt(ctx, *plain, "a photo of (myemb:1.3), red", with);
  want = encode_chunks(ctx, *ref, {chunk(cat_ids({head, slots, tail}), 1.3f, head.size(), head.size() + 2)}, {}, {});
  EXPECT_LT(max_diff(got.context, want.context), 1e-6);
  // Clip skip 2 goes through the same override.
  PromptOptions skip = with;
  skip.clip_skip = 2;
  PromptOptions skip_plain;
  skip_plain.clip_skip = 2;
  got = encode_prompt(ctx, *plain, "myemb", skip);
  want = encode_chunks(ctx, *ref, {chunk(slots)}, {}, skip_plain);
  EXPECT_LT(max_diff(got.context, want.context), 1e-6);
  // And the result is not the text's encoding: the embedding did something.
  Conditioning text = encode_prompt(ctx, *plain, "a photo of myemb, red", {});
  EXPECT_GT(max_diff(text.context, encode_prompt(ctx, *plain, "a photo of myemb, red", with).context), 1e-3);

  // An embedding of another width is an error naming its file.
  Embedding wide;
  wide.name = "wide";
  wide.path = "wide.safetensors";
  wide.vec[0] = Tensor::zeros({1, W + 8});
  set.add(wide);
  expect_error([&] { encode_prompt(ctx, *plain, "a wide photo", with); }, "wide.safetensors", "needs [n, ");
}

// SDXL: clip_l vectors in encoder 1's table, clip_g in encoder 2's (OpenCLIP layout), the pooled
// output included.
TEST_F(EmbeddingTest, SdxlConditioningUsesClipLAndClipG) {
  const std::string xl = data("sdxl/model/tiny-sdxl.safetensors");
  if (xl.empty()) GTEST_SKIP() << "needs sdxl/model/tiny-sdxl.safetensors (../shared/fixtures)";
  const char* tables[2] = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                           "conditioner.embedders.1.model.token_embedding.weight"};
  TensorFile f = open_model_file(xl);
  const int64_t W1 = f.find(tables[0])->dim(1), W2 = f.find(tables[1])->dim(1);
  const Tensor l = f16_exact_vectors(2, W1, 8), g = f16_exact_vectors(2, W2, 9);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const TensorEntry& e : f.tensors) {
    Tensor t = e.tensor;
    for (int k = 0; k < 2; ++k) {
      if (e.name != tables[k]) continue;
      t = e.tensor.to(DType::F32);
      const Tensor& v = k == 0 ? l : g;
      for (int64_t j = 0; j < 2; ++j)
        for (int64_t c = 0; c < v.dim(1); ++c) t.f32()[(kSlot + j) * v.dim(1) + c] = v.f32()[j * v.dim(1) + c];
      t = t.to(e.tensor.dtype());
    }
    ts.emplace_back(e.name, t);
  }
  const std::string ref_path = (dir_ / "reference-xl.safetensors").string();
  save_safetensors(ref_path, ts);
  std::unique_ptr<SDModel> plain = load_te(xl), ref = load_te(ref_path);
  Arena arena;
  Ctx ctx{*be_, arena};
  EmbeddingSet set;
  Embedding e;
  e.name = "xlemb";
  e.path = "xlemb.safetensors";
  e.vec[0] = l;
  e.vec[1] = g;
  set.add(e);
  PromptOptions with;
  with.embeddings = &set;
  Conditioning got = encode_prompt(ctx, *plain, "a xlemb dog", with);
  const std::vector<int> content = cat_ids({tok().tokenize("a"), {kSlot, kSlot + 1}, tok().tokenize("dog")});
  TokenChunk c2 = chunk(content);
  std::fill(c2.ids.begin() + long(content.size()) + 2, c2.ids.end(), tok().bang_id());  // encoder 2 pads with "!"
  Conditioning want = encode_chunks(ctx, *ref, {chunk(content)}, {c2}, {});
  EXPECT_LT(max_diff(got.context, want.context), 1e-6);
  EXPECT_LT(max_diff(got.pooled, want.pooled), 1e-6);
  // A one-encoder embedding in an SDXL prompt: an error naming the file.
  Embedding one;
  one.name = "oneenc";
  one.path = "oneenc.safetensors";
  one.vec[0] = l;
  set.add(one);
  expect_error([&] { encode_prompt(ctx, *plain, "oneenc", with); }, "oneenc.safetensors", "clip_g [n, 1280]");
}

// ---- the engine: a folder of embeddings, the infotext, warnings ----

TEST_F(EmbeddingTest, EngineUsesTheFolderAndWritesTiHashes) {
  const int64_t W = width();
  const fs::path emb_dir = dir_ / "embeddings";
  fs::create_directories(emb_dir);
  const std::string file = (emb_dir / "myemb.safetensors").string();
  save_safetensors(file, {{"emb_params", f16_exact_vectors(2, W, 7)}});
  save_safetensors((emb_dir / "wide.safetensors").string(), {{"emb_params", Tensor::zeros({1, W + 8})}});

  api::EngineOptions eo;
  eo.precision = "fp32";
  eo.hash_cache_dir = (dir_ / "cache").string();
  api::Engine engine(eo);
  api::Request r;
  r.model = model_;
  r.prompt = "a photo of myemb";
  r.negative = "embedding:nothere";
  r.width = r.height = 64;
  r.steps = 2;
  r.seed = 3;
  r.sampler = "euler";
  r.embeddings_dir = emb_dir.string();
  std::vector<std::string> warnings;
  api::Callbacks cb;
  cb.log = [&](const std::string& s, bool warn) {
    if (warn) warnings.push_back(s);
  };
  api::RunResult with = engine.generate(r, cb);
  const std::string params = with.images.at(0).parameters;
  const std::string hash = sha256_file(file).substr(0, 12);
  EXPECT_NE(params.find("TI hashes: \"myemb: " + hash + "\""), std::string::npos) << params;
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("embedding:nothere"), std::string::npos) << warnings[0];

  // Without the folder the word is text: another image.
  api::Request plain = r;
  plain.embeddings_dir = (dir_ / "empty").string();
  fs::create_directories(plain.embeddings_dir);
  api::RunResult without = engine.generate(plain);
  EXPECT_NE(with.images[0].image.pixels, without.images[0].image.pixels);
  EXPECT_EQ(without.images[0].parameters.find("TI hashes"), std::string::npos);

  // A wrong-architecture embedding in use: an error naming it; a missing folder: an error naming the flag.
  api::Request bad = r;
  bad.prompt = "a wide photo";
  expect_error([&] { engine.generate(bad); }, (emb_dir / "wide.safetensors").string(), "needs [n, ");
  bad.embeddings_dir = (dir_ / "absent").string();
  expect_error([&] { engine.generate(bad); }, "--embeddings-dir", "no such folder");
}
