// Layout name mapping: every component of an ldm single file, mapped to diffusers names, must be
// exactly the diffusers folder of the same weights (names, shapes, bit-identical values), and the
// real SD 1.5 / 2.1 / XL layouts (tests/data/manifests) must map name-for-name at full size.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "../common/expect_error.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/family.h"
#include "models/name_map.h"
#include "nn/weights.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

std::string fixture_dir(const std::string& fam) {
  fs::path p = fs::path(DIFFUSE_SHARED_DIR) / "fixtures" / fam / "model";
  return fs::is_directory(p / "diffusers") ? p.string() : "";
}

std::string bundled_sd1() {
  fs::path shared = fs::path(DIFFUSE_SHARED_DIR) / "fixtures/sd1/model/tiny-sd1.safetensors";
  if (fs::exists(shared)) return shared.string();
  fs::path local = fs::path(DIFFUSE_TEST_DATA) / "sd1/model/tiny-sd1.safetensors";
  return fs::exists(local) ? local.string() : "";
}

std::string single_file(const std::string& dir, const char* ext = ".safetensors") {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ext) return e.path().string();
  return "";
}

std::vector<Component> diffusers_components(const TensorFile& d) {
  std::vector<Component> out;
  for (Component c : {Component::UNet, Component::VAE, Component::TextEncoder, Component::TextEncoder2}) {
    std::string pre = std::string(component_name(c)) + "/";
    for (const auto& e : d.tensors)
      if (e.name.rfind(pre, 0) == 0) {
        out.push_back(c);
        break;
      }
  }
  return out;
}

bool same_f32_bits(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return false;
  Tensor fa = a.to(DType::F32), fb = b.to(DType::F32);
  return std::memcmp(fa.data(), fb.data(), fa.bytes()) == 0;
}

std::string joined(const std::vector<std::string>& v, size_t n = 5) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < n; ++i) s += (i ? ", " : "") + v[i];
  return s;
}

// The single file's component (mapped) against the diffusers folder's (stripped): same names,
// shapes and values.
void expect_same_component(const TensorFile& single, const TensorFile& diff, Component c, Family fam) {
  SCOPED_TRACE(std::string(family_name(fam)) + " " + component_name(c) + " from " + single.path);
  WeightStore a = component_weights(single, c, fam);
  WeightStore b = component_weights(diff, c, fam);
  EXPECT_EQ(a.origin(), single.path);
  EXPECT_EQ(a.component(), component_name(c));
  std::string pre = std::string(component_name(c)) + "/";
  size_t n = 0, value_mismatch = 0, shape_mismatch = 0, absent = 0;
  std::vector<std::string> bad;
  for (const auto& e : diff.tensors) {
    if (e.name.rfind(pre, 0) != 0) continue;
    std::string name = e.name.substr(pre.size());
    ++n;
    if (!a.has(name)) {
      ++absent;
      bad.push_back("missing " + name);
      continue;
    }
    Tensor ta = a.take(name, e.tensor.shape());  // zeros (and a recorded problem) on a shape mismatch
    Tensor tb = b.take(name, e.tensor.shape());
    if (ta.shape() != e.tensor.shape()) {
      ++shape_mismatch;
      bad.push_back("shape " + name);
    } else if (!same_f32_bits(ta, tb)) {
      ++value_mismatch;
      bad.push_back("values " + name);
    }
  }
  EXPECT_GT(n, 0u);
  EXPECT_EQ(a.size(), n) << "extra mapped names: " << joined(a.unused());
  EXPECT_EQ(b.size(), n);
  EXPECT_EQ(absent + shape_mismatch + value_mismatch, 0u) << joined(bad);
  EXPECT_NO_THROW(a.finish());
  EXPECT_NO_THROW(b.finish());
  std::printf("[name_map] %s %-14s %4zu tensors: %zu missing, %zu shape, %zu value mismatches\n", family_name(fam),
              component_name(c), n, absent, shape_mismatch, value_mismatch);
}

void check_fixture(const std::string& fam_dir_name, Family fam, const char* ext = ".safetensors") {
  std::string dir = fixture_dir(fam_dir_name);
  if (dir.empty()) GTEST_SKIP() << "fixture " << fam_dir_name << " not found under " << DIFFUSE_SHARED_DIR;
  std::string file = single_file(dir, ext);
  ASSERT_FALSE(file.empty()) << "no " << ext << " in " << dir;
  TensorFile single = open_model_file(file);
  TensorFile diff = open_model_file(dir + "/diffusers");
  EXPECT_EQ(summarize_model(single).family, fam);
  std::vector<Component> comps = diffusers_components(diff);
  EXPECT_GE(comps.size(), 3u);
  for (Component c : comps) expect_same_component(single, diff, c, fam);
  // The family argument is a preference, not a requirement: Unknown finds the same tensors.
  for (Component c : comps) EXPECT_EQ(component_weights(single, c, Family::Unknown).size(),
                                      component_weights(diff, c, Family::Unknown).size());
}

}  // namespace

TEST(NameMapFixtures, SD1) { check_fixture("sd1", Family::SD1); }
TEST(NameMapFixtures, SD1Ckpt) { check_fixture("sd1", Family::SD1, ".ckpt"); }
TEST(NameMapFixtures, SD2) { check_fixture("sd2", Family::SD2); }
TEST(NameMapFixtures, SDXL) { check_fixture("sdxl", Family::SDXL); }
TEST(NameMapFixtures, SD1Inpaint) { check_fixture("sd1-inpaint", Family::SD1); }

// ---------------------------------------------------------------------------------------------
// Real layouts at full size, from the manifests.

namespace {

struct Row {
  std::string layout, component, name;
  Shape shape;
};

std::string manifest_path(const std::string& name) {
  for (fs::path p : {fs::path(DIFFUSE_TEST_DATA) / "manifests" / name, fs::path(DIFFUSE_SHARED_DIR) / "manifests" / name})
    if (fs::exists(p)) return p.string();
  return "";
}

Shape parse_shape(const std::string& s) {
  std::vector<int64_t> d;
  std::stringstream ss(s);
  std::string x;
  while (std::getline(ss, x, 'x')) d.push_back(std::stoll(x));
  return Shape(d);
}

std::vector<Row> read_manifest(const std::string& path) {
  std::ifstream in(path);
  std::vector<Row> rows;
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::vector<std::string> f;
    std::stringstream ss(line);
    std::string x;
    while (std::getline(ss, x, '\t')) f.push_back(x);
    if (f.size() != 4) continue;
    rows.push_back({f[0], f[1], f[2], parse_shape(f[3])});
  }
  return rows;
}

Component component_named(const std::string& s) {
  for (Component c : {Component::UNet, Component::VAE, Component::TextEncoder, Component::TextEncoder2})
    if (s == component_name(c)) return c;
  return Component::Other;
}

// An ldm file with the manifest's tensors (all views of one zeroed buffer, mostly never touched:
// calloc'd pages cost nothing until read) plus the extras real files carry.
TensorFile fake_ldm(const std::string& path, const std::vector<Row>& rows,
                    const std::vector<std::pair<std::string, Shape>>& extras) {
  size_t max_bytes = 8;
  for (const Row& r : rows) max_bytes = std::max(max_bytes, size_t(r.shape.numel()) * 2);
  void* buf = std::calloc(max_bytes, 1);
  std::shared_ptr<const void> owner(buf, [](const void* p) { std::free(const_cast<void*>(p)); });
  auto storage = Storage::borrow(buf, max_bytes, owner);
  TensorFile f;
  f.path = path;
  f.format = "safetensors";
  for (const Row& r : rows)
    if (r.layout == "ldm") f.tensors.push_back({r.name, Tensor(storage, 0, r.shape, DType::F16)});
  for (const auto& [name, shape] : extras) f.tensors.push_back({name, Tensor(storage, 0, shape, DType::F16)});
  f.build_index();
  return f;
}

void check_manifest(const std::string& file, Family fam, const std::vector<std::pair<std::string, Shape>>& extras) {
  std::string path = manifest_path(file);
  if (path.empty()) GTEST_SKIP() << file << " not found in tests/data/manifests or the shared folder";
  std::vector<Row> rows = read_manifest(path);
  ASSERT_GT(rows.size(), 1000u) << path;
  TensorFile ldm = fake_ldm(path + " (ldm rows)", rows, extras);
  EXPECT_EQ(summarize_model(ldm).family, fam);
  std::map<Component, std::vector<const Row*>> want;
  for (const Row& r : rows)
    if (r.layout == "diffusers") want[component_named(r.component)].push_back(&r);
  EXPECT_GE(want.size(), 3u);
  for (const auto& [c, drows] : want) {
    SCOPED_TRACE(file + " " + component_name(c));
    ASSERT_NE(c, Component::Other);
    WeightStore s = component_weights(ldm, c, fam);
    std::vector<std::string> missing;
    for (const Row* r : drows) {
      if (!s.has(r->name)) missing.push_back(r->name);
      s.take(r->name, r->shape);
    }
    EXPECT_EQ(s.size(), drows.size()) << "extra: " << joined(s.unused());
    EXPECT_TRUE(missing.empty()) << missing.size() << " missing, e.g. " << joined(missing);
    try {
      s.finish();
    } catch (const Error& e) {
      ADD_FAILURE() << e.what();
    }
    std::printf("[name_map] %s %-14s %4zu diffusers tensors mapped from the ldm layout, %zu missing\n", file.c_str(),
                component_name(c), drows.size(), missing.size());
  }
}

}  // namespace

TEST(NameMapManifest, SD15) {
  check_manifest("sd15.tsv", Family::SD1,
                 {{"cond_stage_model.transformer.text_model.embeddings.position_ids", Shape{1, 77}},
                  {"model_ema.decay", Shape{}},
                  {"model_ema.num_updates", Shape{}},
                  {"model_ema.diffusion_modeltime_embed0weight", Shape{1280, 320}}});
}

TEST(NameMapManifest, SD21) {
  // The ldm rows hold 24 text blocks, the diffusers rows 23; real files also carry these.
  check_manifest("sd21.tsv", Family::SD2,
                 {{"cond_stage_model.model.text_projection", Shape{1024, 1024}},
                  {"cond_stage_model.model.logit_scale", Shape{}}});
}

TEST(NameMapManifest, SDXL) {
  check_manifest("sdxl.tsv", Family::SDXL,
                 {{"conditioner.embedders.0.transformer.text_model.embeddings.position_ids", Shape{1, 77}},
                  {"conditioner.embedders.1.model.logit_scale", Shape{}}});
}

// ---------------------------------------------------------------------------------------------
// Conversions that must be views (no copy) and the one that must be a copy.

TEST(NameMap, ViewsShareFileStorage) {
  std::string path = bundled_sd1();
  if (path.empty()) GTEST_SKIP() << "no sd1 single file in the shared fixtures or tests/data";
  TensorFile f = open_model_file(path);
  WeightStore vae = component_weights(f, Component::VAE, Family::SD1);
  const Tensor* q = f.find("first_stage_model.decoder.mid.attn_1.q.weight");
  ASSERT_NE(q, nullptr);
  ASSERT_EQ(q->rank(), 4);
  Tensor t = vae.take("decoder.mid_block.attentions.0.to_q.weight", {q->dim(0), q->dim(1)});
  EXPECT_EQ(t.data(), q->data());  // reshaped view of the file's bytes
  // ldm decoder level 0 is the last diffusers up block.
  const Tensor* up0 = f.find("first_stage_model.decoder.up.0.block.0.conv1.weight");
  ASSERT_NE(up0, nullptr);
  EXPECT_EQ(vae.take("decoder.up_blocks.3.resnets.0.conv1.weight", up0->shape()).data(), up0->data());
  WeightStore unet = component_weights(f, Component::UNet, Family::SD1);
  const Tensor* op = f.find("model.diffusion_model.input_blocks.3.0.op.weight");
  ASSERT_NE(op, nullptr);
  EXPECT_EQ(unet.take("down_blocks.0.downsamplers.0.conv.weight", op->shape()).data(), op->data());
}

TEST(NameMap, OpenClipSplitIsViewProjectionTransposed) {
  std::string dir = fixture_dir("sdxl");
  if (dir.empty()) GTEST_SKIP() << "sdxl fixture not found under " << DIFFUSE_SHARED_DIR;
  TensorFile f = open_model_file(single_file(dir));
  WeightStore te2 = component_weights(f, Component::TextEncoder2, Family::SDXL);
  const Tensor* in = f.find("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight");
  ASSERT_NE(in, nullptr);
  int64_t w = in->dim(0) / 3;
  Tensor k = te2.take("text_model.encoder.layers.1.self_attn.k_proj.weight", {w, in->dim(1)});
  EXPECT_EQ(static_cast<const uint8_t*>(k.data()),
            static_cast<const uint8_t*>(in->data()) + size_t(w * in->dim(1)) * dtype_size(in->dtype()));
  const Tensor* proj = f.find("conditioner.embedders.1.model.text_projection");
  ASSERT_NE(proj, nullptr);
  Tensor p = te2.take("text_projection.weight", {proj->dim(1), proj->dim(0)});
  ASSERT_EQ(p.dtype(), proj->dtype());
  Tensor pf = p.to(DType::F32), rf = proj->to(DType::F32);
  int64_t r = proj->dim(0), c = proj->dim(1), wrong = 0;
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) wrong += pf.f32()[j * r + i] != rf.f32()[i * c + j];
  EXPECT_EQ(wrong, 0);
  EXPECT_NE(p.data(), proj->data());
}

// ---------------------------------------------------------------------------------------------
// The inverse (ldm_tensor_sources + ldm_tensor_from): every tensor of an ldm file that a component
// reads is rebuilt, bit for bit, from the diffusers tensors component_weights made of it; every
// diffusers tensor is used exactly once; what the mapping leaves out is named as left out.

namespace {
void check_inverse(const std::string& fam_dir_name, Family fam) {
  std::string dir = fixture_dir(fam_dir_name);
  if (dir.empty()) GTEST_SKIP() << "fixture " << fam_dir_name << " not found under " << DIFFUSE_SHARED_DIR;
  TensorFile f = open_model_file(single_file(dir));
  size_t rebuilt = 0, split = 0, transposed = 0;
  for (Component c : {Component::UNet, Component::VAE, Component::TextEncoder, Component::TextEncoder2}) {
    if (fam != Family::SDXL && c == Component::TextEncoder2) continue;
    SCOPED_TRACE(std::string(family_name(fam)) + " " + component_name(c));
    WeightStore store = component_weights(f, c, fam);
    std::map<std::string, int> used;
    for (const LdmSource& s : ldm_tensor_sources(f, c, fam)) {
      const Tensor* orig = f.find(s.ldm_name);
      ASSERT_NE(orig, nullptr) << s.ldm_name;
      std::vector<Tensor> parts;
      for (const std::string& d : s.diffusers) {
        const Tensor* t = store.find(d);
        ASSERT_NE(t, nullptr) << d << " (from " << s.ldm_name << ")";
        parts.push_back(*t);
        ++used[d];
      }
      const Tensor back = ldm_tensor_from(s, orig->shape(), parts);
      ASSERT_EQ(back.shape(), orig->shape()) << s.ldm_name;
      ASSERT_EQ(back.dtype(), orig->dtype()) << s.ldm_name;
      EXPECT_EQ(0, std::memcmp(back.data(), orig->data(), orig->bytes())) << s.ldm_name << " not rebuilt exactly";
      ++rebuilt;
      split += s.diffusers.size() > 1;
      transposed += s.transposed;
    }
    EXPECT_EQ(used.size(), store.size()) << "diffusers tensors without an ldm source";
    for (const auto& [name, n] : used) EXPECT_EQ(n, 1) << name;
  }
  std::printf("[name_map] %s inverse: %zu ldm tensors rebuilt (%zu from row blocks, %zu transposed)\n",
              family_name(fam), rebuilt, split, transposed);
  if (fam == Family::SD2 || fam == Family::SDXL) {
    EXPECT_GT(split, 0u);  // OpenCLIP's fused in_proj
  }
  EXPECT_EQ(transposed, fam == Family::SDXL ? 1u : 0u);  // SDXL's text_projection
}
}  // namespace

TEST(NameMapInverse, SD1) { check_inverse("sd1", Family::SD1); }
TEST(NameMapInverse, SD2) { check_inverse("sd2", Family::SD2); }
TEST(NameMapInverse, SDXL) { check_inverse("sdxl", Family::SDXL); }

TEST(NameMapInverse, RefusesDiffusersFoldersAndBadShapes) {
  std::string dir = fixture_dir("sd1");
  if (dir.empty()) GTEST_SKIP() << "sd1 fixture not found under " << DIFFUSE_SHARED_DIR;
  const TensorFile d = open_model_file(dir + "/diffusers");
  expect_error([&] { ldm_tensor_sources(d, Component::UNet, Family::SD1); }, d.path, "diffusers folder has no ldm names");
  LdmSource s{"model.diffusion_model.out.2.weight", {"conv_out.weight"}, false};
  expect_error([&] { ldm_tensor_from(s, {4, 4}, {Tensor::zeros({4, 5})}); }, s.ldm_name, "the ldm shape is [4, 4]");
}

// ---------------------------------------------------------------------------------------------
// Errors

namespace {
TensorFile subset(const TensorFile& f, const std::string& path, const std::function<bool(const std::string&)>& keep) {
  TensorFile g;
  g.path = path;
  g.format = f.format;
  for (const auto& e : f.tensors)
    if (keep(e.name)) g.tensors.push_back(e);
  return g;
}
}  // namespace

TEST(NameMap, MissingComponentNamesPrefix) {
  std::string path = bundled_sd1();
  if (path.empty()) GTEST_SKIP() << "no sd1 single file in the shared fixtures or tests/data";
  TensorFile f = open_model_file(path);
  TensorFile unet_only = subset(f, "unet-only.safetensors",
                                [](const std::string& n) { return n.rfind("model.diffusion_model.", 0) == 0; });
  unet_only.build_index();
  EXPECT_NO_THROW(component_weights(unet_only, Component::UNet, Family::SD1));
  expect_error([&] { component_weights(unet_only, Component::VAE, Family::SD1); }, "unet-only.safetensors",
               "no vae tensors found (expected names starting with first_stage_model.)");
  expect_error([&] { component_weights(unet_only, Component::TextEncoder, Family::SD1); }, "unet-only.safetensors",
               "no text_encoder tensors found (expected names starting with cond_stage_model.transformer.");
  expect_error([&] { component_weights(f, Component::TextEncoder2, Family::SD1); }, path,
               "no text_encoder_2 tensors found (expected names starting with conditioner.embedders.1.model. or "
               "conditioner.embedders.0.model.)");  // SDXL base, or the refiner's only encoder
  expect_error([&] { component_weights(f, Component::EMA, Family::SD1); }, path, "ema");
}

TEST(NameMap, MissingDiffusersComponent) {
  std::string dir = fixture_dir("sd1");
  if (dir.empty()) GTEST_SKIP() << "sd1 fixture not found under " << DIFFUSE_SHARED_DIR;
  TensorFile d = open_model_file(dir + "/diffusers");
  expect_error([&] { component_weights(d, Component::TextEncoder2, Family::SD1); }, d.path,
               "no text_encoder_2 tensors found (expected names starting with text_encoder_2/)");
  WeightStore vae = component_weights(d, Component::VAE, Family::SD1);
  EXPECT_TRUE(vae.has("decoder.mid_block.attentions.0.to_q.weight"));
  EXPECT_EQ(vae.origin(), d.path);
  EXPECT_EQ(vae.component(), "vae");
}

TEST(NameMap, UnknownNamesAreReportedNotDropped) {
  std::string path = bundled_sd1();
  if (path.empty()) GTEST_SKIP() << "no sd1 single file in the shared fixtures or tests/data";
  TensorFile f = open_model_file(path);
  TensorFile g = subset(f, "odd.safetensors", [](const std::string&) { return true; });
  Tensor any = f.tensors.front().tensor;
  g.tensors.push_back({"model.diffusion_model.input_blocks.1.0.mystery.weight", any});
  g.tensors.push_back({"model.diffusion_model.zzz.weight", any});
  g.tensors.push_back({"first_stage_model.encoder.mid.attn_1.qkv.weight", any});
  // Known extras are dropped silently.
  g.tensors.push_back({"model_ema.decay", any});
  g.tensors.push_back({"cond_stage_model.transformer.text_model.embeddings.position_ids", any});
  g.build_index();
  expect_error([&] { component_weights(g, Component::UNet, Family::SD1); }, "odd.safetensors",
               "2 unet tensor(s) not understood");
  expect_error([&] { component_weights(g, Component::UNet, Family::SD1); }, "odd.safetensors",
               "model.diffusion_model.input_blocks.1.0.mystery.weight");
  expect_error([&] { component_weights(g, Component::VAE, Family::SD1); }, "odd.safetensors",
               "first_stage_model.encoder.mid.attn_1.qkv.weight");
  WeightStore te = component_weights(g, Component::TextEncoder, Family::SD1);
  EXPECT_FALSE(te.has("text_model.embeddings.position_ids"));
  EXPECT_TRUE(te.has("text_model.embeddings.token_embedding.weight"));
}

TEST(NameMap, SingleComponentFolderHasBareNames) {
  std::string dir = fixture_dir("sd1");
  if (dir.empty()) GTEST_SKIP() << "sd1 fixture not found under " << DIFFUSE_SHARED_DIR;
  TensorFile whole = open_model_file(dir + "/diffusers");
  TensorFile unet_dir = open_model_file(dir + "/diffusers/unet");
  WeightStore a = component_weights(unet_dir, Component::UNet, Family::SD1);
  EXPECT_EQ(a.size(), component_weights(whole, Component::UNet, Family::SD1).size());
  EXPECT_TRUE(a.has("conv_in.weight"));
  expect_error([&] { component_weights(unet_dir, Component::VAE, Family::SD1); }, unet_dir.path,
               "no vae tensors found (expected names starting with vae/)");
}

// A standalone VAE file (--vae) in each of its layouts maps to the checkpoint's own VAE: the same
// diffusers names, shapes and (viewed) storage.
TEST(NameMap, StandaloneVaeFileLayouts) {
  std::string path = bundled_sd1();
  if (path.empty()) GTEST_SKIP() << "no sd1 single file in the shared fixtures or tests/data";
  TensorFile f = open_model_file(path);
  const WeightStore ref = component_weights(f, Component::VAE, Family::SD1);
  auto expect_same = [&](const WeightStore& w, const std::string& what) {
    ASSERT_EQ(w.names(), ref.names()) << what;
    for (const std::string& n : ref.names()) {
      EXPECT_EQ(w.find(n)->shape(), ref.find(n)->shape()) << what << " " << n;
      EXPECT_EQ(std::memcmp(w.find(n)->data(), ref.find(n)->data(), ref.find(n)->bytes()), 0) << what << " " << n;
    }
  };
  const std::string pre = "first_stage_model.";
  auto make = [&](const std::string& p, const std::function<std::string(const std::string&)>& name) {
    TensorFile g;
    g.path = p;
    g.format = "safetensors";
    for (const TensorEntry& e : f.tensors)
      if (e.name.rfind(pre, 0) == 0) g.tensors.push_back({name(e.name.substr(pre.size())), e.tensor});
    return g;
  };
  TensorFile bare = make("bare.safetensors", [](const std::string& n) { return n; });
  bare.tensors.push_back({"model_ema.decay", Tensor::zeros({1})});  // vae-ft-mse files keep these
  bare.tensors.push_back({"loss.logvar", Tensor::zeros({1})});
  bare.build_index();
  expect_same(vae_file_weights(bare), "bare ldm names");
  TensorFile prefixed = make("prefixed.safetensors", [&](const std::string& n) { return pre + n; });
  prefixed.build_index();
  expect_same(vae_file_weights(prefixed), "first_stage_model. names");

  // diffusers names, current and old (query/key/value/proj_attn as [C, C, 1, 1] convs).
  TensorFile diff, old;
  diff.path = "diffusers.safetensors";
  old.path = "old-diffusers.safetensors";
  diff.format = old.format = "safetensors";
  for (const std::string& n : ref.names()) {
    const Tensor& t = *ref.find(n);
    diff.tensors.push_back({n, t});
    std::string o = n;
    for (auto [a, b] : {std::pair{".to_q.", ".query."}, {".to_k.", ".key."}, {".to_v.", ".value."},
                        {".to_out.0.", ".proj_attn."}})
      if (size_t at = o.find(a); at != std::string::npos) o = o.replace(at, std::strlen(a), b);
    const bool conv = o != n && t.rank() == 2;
    old.tensors.push_back({o, conv ? t.reshape({t.dim(0), t.dim(1), 1, 1}) : t});
  }
  diff.build_index();
  old.build_index();
  expect_same(vae_file_weights(diff), "diffusers names");
  expect_same(vae_file_weights(old), "old diffusers attention names");

  TensorFile none = subset(f, "unet-only.safetensors",
                           [](const std::string& n) { return n.rfind("model.diffusion_model.", 0) == 0; });
  none.build_index();
  expect_error([&] { vae_file_weights(none); }, "unet-only.safetensors", "no VAE tensors found");
  TensorFile mixed = bare;
  mixed.path = "mixed.safetensors";
  mixed.tensors.push_back({"decoder.up_blocks.0.resnets.0.norm1.weight", Tensor::zeros({4})});
  mixed.build_index();
  expect_error([&] { vae_file_weights(mixed); }, "mixed.safetensors", "mixes ldm");
  TensorFile odd = bare;
  odd.path = "odd.safetensors";
  odd.tensors.push_back({"decoder.up.0.frobnicate.weight", Tensor::zeros({4})});
  odd.build_index();
  expect_error([&] { vae_file_weights(odd); }, "odd.safetensors", "decoder.up.0.frobnicate.weight");
}
