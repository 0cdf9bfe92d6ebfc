// Growing a model into a larger architecture (models/sd_arch.h write_grown_checkpoint, `diffuse
// synth --arch A --from FILE`): every tensor the source has at the same name and shape is copied,
// the rest is initialised as for training, and since ldm zero-initialises each transformer's
// proj_out, a model grown by cross-attention at another level draws the same pixels as its source
// until it is trained. Widened layers (another shape) are initialised and reported.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "backend/backend.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/sd_arch.h"
#include "models/sd_model.h"
#include "pipeline/generate.h"

namespace diffuse {
namespace {

SdArch small(std::vector<bool> attention) {
  SdArch a;
  a.unet_channels = {32, 64};
  a.unet_attention = std::move(attention);
  a.vae_channels = {32, 32, 64};
  a.text_layers = 1;
  a.text_intermediate = 64;
  a.resolution = 32;
  return a;
}

std::string tmp(const std::string& name) { return ::testing::TempDir() + name; }

Image draw(const std::string& path) {
  auto be = make_cpu_backend(Precision::F32);
  std::unique_ptr<SDModel> m = SDModel::load(path, *be);
  GenerateParams p;
  p.prompt = "a red circle on the left";
  p.width = p.height = 32;
  p.steps = 3;
  p.seed = 11;
  std::vector<Result> r = generate(*m, *be, p);
  EXPECT_EQ(r.size(), 1u);
  return r.empty() ? Image{} : r[0].image;
}

TEST(SdGrow, AddedAttentionStartsAsTheIdentity) {
  const SdArch from = small({false, true}), to = small({true, true});
  const std::string src = tmp("grow_from.safetensors"), out = tmp("grow_to.safetensors");
  write_synthetic_checkpoint(sd1_ldm_rows(from), "ldm", src, DType::F32, 5, "", false, {});
  const GrowStats st = write_grown_checkpoint(to, src, out, DType::F32, 6, {{"modelspec.resolution", "32x32"}});
  const size_t n_from = sd1_ldm_rows(from).size(), n_to = sd1_ldm_rows(to).size();
  EXPECT_EQ(size_t(st.copied), n_from);  // every tensor of the source has its place
  EXPECT_EQ(size_t(st.copied + st.initialised), n_to);
  EXPECT_GT(st.initialised, 0);
  EXPECT_TRUE(st.reshaped.empty());
  EXPECT_EQ(st.unused, 0);

  const TensorFile a = open_model_file(src), b = open_model_file(out);
  for (const TensorEntry& e : a.tensors) {
    const Tensor* t = b.find(e.name);
    ASSERT_NE(t, nullptr) << e.name;
    ASSERT_EQ(t->shape(), e.tensor.shape()) << e.name;
    EXPECT_EQ(std::memcmp(t->data(), e.tensor.data(), e.tensor.bytes()), 0) << e.name;
  }
  const Tensor* added = b.find("model.diffusion_model.input_blocks.1.1.proj_in.weight");
  ASSERT_NE(added, nullptr);  // the level-0 transformer is new
  EXPECT_EQ(a.find("model.diffusion_model.input_blocks.1.1.proj_in.weight"), nullptr);

  const Image x = draw(src), y = draw(out);
  ASSERT_EQ(x.pixels.size(), y.pixels.size());
  EXPECT_TRUE(x.pixels == y.pixels) << "the grown model draws other pixels than its source";
  std::filesystem::remove(src);
  std::filesystem::remove(out);
}

TEST(SdGrow, WidenedLayersAreInitialisedAndReported) {
  SdArch wide = small({false, true});
  wide.unet_channels = {32, 96};
  const std::string src = tmp("grow_narrow.safetensors"), out = tmp("grow_wide.safetensors");
  write_synthetic_checkpoint(sd1_ldm_rows(small({false, true})), "ldm", src, DType::F32, 5, "", false, {});
  const GrowStats st = write_grown_checkpoint(wide, src, out, DType::F16, 6, {});
  EXPECT_FALSE(st.reshaped.empty());
  EXPECT_GT(st.copied, 0);  // the VAE and the text encoder, the first level
  EXPECT_EQ(open_model_file(out).find("first_stage_model.decoder.conv_out.weight")->dtype(), DType::F16);
  std::filesystem::remove(out);

  // A file that shares nothing with the architecture is refused, naming it.
  const std::string alien = tmp("grow_alien.safetensors");
  save_safetensors(alien, {{"some.other.weight", Tensor::zeros({3, 3})}});
  try {
    write_grown_checkpoint(wide, alien, out, DType::F32, 1, {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(alien), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("shares no tensor"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(out));
  std::filesystem::remove(alien);
  std::filesystem::remove(src);
}

}  // namespace
}  // namespace diffuse
