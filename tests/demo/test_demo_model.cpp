// The bundled demo model (data/models/diffuse-shapes-64.safetensors, trained from scratch by
// `make demo-model`) draws what a prompt says. `diffuse generate` with its defaults (Euler a, 20
// steps, CFG 7, the model's native size from its modelspec.resolution) and fixed seeds draws 48
// prompts of compositions seen in training, worded unlike any training caption; a rule-based reader
// (tests/common/shape_classifier.h: background from the border, shape colour, centroid, fill of the
// bounding box) scores the colour, shape, position and background each image shows against its
// prompt. Controls: the same images scored against shuffled prompts, and the model with its text
// encoder replaced by its random initialisation, each score at most chance + 15 points (chance: the
// agreement expected between the readings and the prompts if they were independent, from their
// frequencies), so the prompt — through the text encoder — decides. Held-out compositions
// (train/shapes_dataset.h heldout_combos(), never drawn in the dataset) are scored and reported.
// The text encoder itself: changing only one attribute's word in a prompt must move its output at
// least half as much as it did before training (training must not erase a word the UNet needs: the
// models that ignored position words had encoders that had folded "left" and "right" together).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../cli/cli_util.h"
#include "../common/shape_classifier.h"
#include "backend/backend.h"
#include "io/image.h"
#include "io/tensor_file.h"
#include "models/sd_model.h"
#include "core/arena.h"
#include "models/synthetic.h"
#include "nn/layers.h"
#include "pipeline/conditioning.h"
#include "train/shapes_dataset.h"

namespace fs = std::filesystem;
using namespace diffuse;
using namespace diffuse::train;
using shapecls::ShapeAttributes;

namespace {

// DIFFUSE_DEMO_MODEL=FILE scores another checkpoint (e.g. an intermediate one of make demo-model).
const std::string kModel = std::getenv("DIFFUSE_DEMO_MODEL")
                               ? std::string(std::getenv("DIFFUSE_DEMO_MODEL"))
                               : std::string(DIFFUSE_SOURCE_DIR) + "/data/models/diffuse-shapes-64.safetensors";
constexpr int kPrompts = 48;
constexpr uint64_t kSeed = 20261206;

// Wordings no training caption uses (train/shapes_dataset.cpp's templates differ).
std::string wording(int k, const std::string& colour, const std::string& shape, ShapePosition pos,
                    const std::string& bg) {
  static const char* where[][2] = {{"on the left", "at the left edge"},   {"on the right", "at the right edge"},
                                   {"at the top", "up at the top"},       {"at the bottom", "down at the bottom"},
                                   {"in the middle", "in the centre"}};
  const std::string w = where[int(pos)][k % 2];
  auto a = [](const std::string& word) { return std::string(word[0] == 'o' ? "an " : "a ") + word; };
  switch (k % 4) {
    case 0: return "a picture of " + a(colour) + " " + shape + " " + w + ", the background is " + bg;
    case 1: return "there is " + a(colour) + " " + shape + " " + w + "; plain " + bg + " background";
    case 2: return "draw " + a(colour) + " " + shape + " " + w + " over " + a(bg) + " background";
    default: return "a simple " + colour + " " + shape + " " + w + " and " + a(bg) + " background behind it";
  }
}

struct Case {
  std::string prompt;
  ShapeAttributes want;
};

// `n` prompts: compositions from `combos` (cycled in a shuffled order), a background colour other
// than the shape's drawn from kSeed, the wording cycled.
std::vector<Case> make_cases(const std::vector<ShapeCombo>& combos, int n, uint64_t salt) {
  std::mt19937_64 g(kSeed + salt);
  std::vector<ShapeCombo> order = combos;
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[size_t(g() % i)]);
  const auto& pal = shape_colours();
  std::vector<Case> out;
  for (int i = 0; i < n; ++i) {
    const ShapeCombo& c = order[size_t(i) % order.size()];
    int bg = int(g() % uint64_t(kShapeColourCount - 1));
    if (bg >= c.colour) ++bg;
    Case k;
    k.prompt = wording(i, pal[size_t(c.colour)].name, shape_kind_name(c.shape), c.position, pal[size_t(bg)].name);
    k.want.colour = c.colour, k.want.shape = c.shape, k.want.position = c.position, k.want.background = bg;
    out.push_back(k);
  }
  return out;
}

// Generates every case's image with `diffuse generate`'s defaults (seed kSeed + index).
std::vector<ShapeAttributes> draw(const std::string& model, const std::vector<Case>& cases, const std::string& tag) {
  const std::string dir = clitest::temp_dir() + "/demo_" + tag;
  fs::create_directories(dir);
  std::string list;
  for (const Case& c : cases) list += c.prompt + "\n";
  clitest::write_file(dir + "/prompts.txt", list);
  const clitest::Result r = clitest::run(
      {"generate", "-q", "-m", model, "--prompt-file", dir + "/prompts.txt", "-s", std::to_string(kSeed),
       "-o", dir + "/img.png", "--grid", dir + "/grid.png"},
      1800);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<ShapeAttributes> got;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = dir + (i == 0 ? "/img.png" : "/img_" + std::to_string(i) + ".png");
    const Image im = to_rgb(read_image(path));
    got.push_back(shapecls::classify_shape_image(im.width, im.height, im.pixels.data()));
  }
  std::printf("%s: images in %s (grid.png)\n", tag.c_str(), dir.c_str());
  return got;
}

struct Scores {
  std::array<double, 4> pct{};     // colour, shape, position, background (percent)
  std::array<double, 4> chance{};  // percent
};

// Per attribute: the share of images whose reading equals the wanted value (a reading that found
// nothing counts as wrong), and chance = Σ_v P(reading = v)·P(wanted = v).
Scores score(const std::vector<ShapeAttributes>& got, const std::vector<ShapeAttributes>& want) {
  Scores s;
  const double n = double(got.size());
  for (int a = 0; a < 4; ++a) {
    std::array<double, 8> pg{}, pw{};
    double hit = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const ShapeAttributes &g = got[i], &w = want[i];
      const bool ok[4] = {g.colour_ok, g.shape_ok, g.position_ok, g.background_ok};
      const int gv[4] = {g.colour, int(g.shape), int(g.position), g.background};
      const int wv[4] = {w.colour, int(w.shape), int(w.position), w.background};
      if (ok[a] && gv[a] == wv[a]) ++hit;
      if (ok[a]) pg[size_t(gv[a])] += 1 / n;
      pw[size_t(wv[a])] += 1 / n;
    }
    s.pct[size_t(a)] = 100 * hit / n;
    for (size_t v = 0; v < 8; ++v) s.chance[size_t(a)] += 100 * pg[v] * pw[v];
  }
  return s;
}

// The bounds: colour ≥ 90%, shape ≥ 80%, position ≥ 85%, background ≥ 90%.
void expect_targets(const char* what, const Scores& s) {
  static const char* names[] = {"colour", "shape", "position", "background"};
  static const double least[] = {90, 80, 85, 90};
  for (size_t a = 0; a < 4; ++a) EXPECT_GE(s.pct[a], least[a]) << what << ": " << names[a];
}

void print(const char* what, const Scores& s) {
  std::printf("%-44s colour %5.1f%%  shape %5.1f%%  position %5.1f%%  background %5.1f%%\n", what, s.pct[0], s.pct[1],
              s.pct[2], s.pct[3]);
  std::printf("%-44s colour %5.1f%%  shape %5.1f%%  position %5.1f%%  background %5.1f%%\n", "  chance", s.chance[0],
              s.chance[1], s.chance[2], s.chance[3]);
}

std::vector<ShapeAttributes> wants(const std::vector<Case>& cases) {
  std::vector<ShapeAttributes> w;
  for (const Case& c : cases) w.push_back(c.want);
  return w;
}

void expect_near_chance(const char* what, const Scores& s) {
  static const char* names[] = {"colour", "shape", "position", "background"};
  for (size_t a = 0; a < 4; ++a)
    EXPECT_LE(s.pct[a], s.chance[a] + 15.0) << what << ": " << names[a] << " scores " << s.pct[a]
                                            << "%, more than chance (" << s.chance[a] << "%) + 15 points";
}

// The demo model with its text encoder's tensors replaced by the values `diffuse synth --arch`
// started from (make demo-model uses seed 1): a text encoder that learned nothing.
std::string untrained_text_encoder_copy(const std::string& dir) {
  const TensorFile f = open_model_file(kModel);
  std::vector<std::pair<std::string, Tensor>> out;
  int replaced = 0;
  for (const TensorEntry& e : f.tensors) {
    if (e.name.rfind("cond_stage_model.", 0) == 0) {
      Tensor t = Tensor::empty(e.tensor.shape());
      synthetic_fill(e.name, e.tensor.shape(), 1, 0, t.numel(), t.f32());
      out.emplace_back(e.name, t.to(e.tensor.dtype()));
      ++replaced;
    } else {
      out.emplace_back(e.name, e.tensor);
    }
  }
  EXPECT_GT(replaced, 0) << "no text encoder tensors in " << kModel;
  const std::string path = dir + "/untrained-te.safetensors";
  save_safetensors(path, out, f.metadata);
  return path;
}

// Per attribute (colour, shape, position, background): the mean over `cases` of the RMS change of the
// text encoder's output when only that attribute's word changes (to the next value, same wording),
// relative to the output's RMS.
struct Separation {
  std::array<double, 4> attribute{};  // colour, shape, position, background
  // The shape word alone by the pair changed: circle -> square, square -> triangle, triangle -> circle.
  std::array<double, kShapeKindCount> shape_pair{};
};

Separation word_separation(const std::string& model_path, const std::vector<Case>& cases) {
  auto be = make_cpu_backend(Precision::F32);
  SDLoadOptions lo;
  lo.unet = lo.vae_encoder = lo.vae_decoder = false;
  const std::unique_ptr<SDModel> m = SDModel::load(model_path, *be, lo);
  const auto& pal = shape_colours();
  auto encode = [&](const std::string& prompt) {
    Arena arena;
    Ctx c{*be, arena, DType::F32};
    return encode_prompt(c, *m, prompt, {}).context.to(DType::F32);
  };
  Separation sep;
  std::array<int, kShapeKindCount> pair_n{};
  for (size_t i = 0; i < cases.size(); ++i) {
    const ShapeAttributes& w = cases[i].want;
    const Tensor base = encode(cases[i].prompt);
    double norm = 0;
    for (int64_t j = 0; j < base.numel(); ++j) norm += double(base.f32()[j]) * base.f32()[j];
    for (int a = 0; a < 4; ++a) {
      int colour = w.colour, bg = w.background, kind = int(w.shape), pos = int(w.position);
      if (a == 0) do colour = (colour + 1) % kShapeColourCount; while (colour == bg);
      if (a == 1) kind = (kind + 1) % kShapeKindCount;
      if (a == 2) pos = (pos + 1) % kShapePositionCount;
      if (a == 3) do bg = (bg + 1) % kShapeColourCount; while (bg == colour);
      const Tensor other = encode(wording(int(i), pal[size_t(colour)].name, shape_kind_name(ShapeKind(kind)),
                                          ShapePosition(pos), pal[size_t(bg)].name));
      double d = 0;
      for (int64_t j = 0; j < base.numel(); ++j) d += std::pow(double(base.f32()[j]) - other.f32()[j], 2);
      const double change = std::sqrt(d / norm);
      sep.attribute[size_t(a)] += change / double(cases.size());
      if (a == 1) sep.shape_pair[size_t(w.shape)] += change, ++pair_n[size_t(w.shape)];
    }
  }
  for (int k = 0; k < kShapeKindCount; ++k)
    if (pair_n[size_t(k)] > 0) sep.shape_pair[size_t(k)] /= pair_n[size_t(k)];
  return sep;
}

}  // namespace

TEST(DemoModel, TextEncoderKeepsEveryAttributesWordApart) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "the demo model is not there (make demo-model writes it): " << kModel;
  std::vector<ShapeCombo> all;
  for (int c = 0; c < kShapeColourCount; ++c)
    for (int k = 0; k < kShapeKindCount; ++k)
      for (int p = 0; p < kShapePositionCount; ++p) all.push_back({c, ShapeKind(k), ShapePosition(p)});
  const std::vector<Case> cases = make_cases(all, 24, 2);
  const std::string dir = clitest::temp_dir() + "/demo_separation";
  fs::create_directories(dir);
  const Separation trained = word_separation(kModel, cases);
  const Separation init = word_separation(untrained_text_encoder_copy(dir), cases);
  static const char* names[] = {"colour", "shape", "position", "background"};
  std::printf("text encoder output change when one word changes (RMS, relative; 24 prompts):\n");
  for (size_t a = 0; a < 4; ++a) {
    std::printf("  %-10s trained %.3f   at initialisation %.3f\n", names[a], trained.attribute[a], init.attribute[a]);
    EXPECT_GE(trained.attribute[a], 0.5 * init.attribute[a])
        << names[a] << ": the trained text encoder hardly tells these words apart";
  }
  for (int k = 0; k < kShapeKindCount; ++k)  // (reported: which shape words the encoder folds together)
    std::printf("  shape %s -> %s: trained %.3f   at initialisation %.3f\n", shape_kind_name(ShapeKind(k)),
                shape_kind_name(ShapeKind((k + 1) % kShapeKindCount)), trained.shape_pair[size_t(k)],
                init.shape_pair[size_t(k)]);
}

TEST(DemoModel, DrawsWhatThePromptSays) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "the demo model is not there (make demo-model writes it): " << kModel;
  std::vector<ShapeCombo> seen;
  for (int c = 0; c < kShapeColourCount; ++c)
    for (int k = 0; k < kShapeKindCount; ++k)
      for (int p = 0; p < kShapePositionCount; ++p) {
        const ShapeCombo combo{c, ShapeKind(k), ShapePosition(p)};
        if (!is_heldout(combo)) seen.push_back(combo);
      }
  const std::vector<Case> cases = make_cases(seen, kPrompts, 0);
  const std::vector<ShapeAttributes> want = wants(cases);
  const std::vector<ShapeAttributes> got = draw(kModel, cases, "seen");
  for (size_t i = 0; i < cases.size(); ++i)
    std::printf("  %-78s -> %s\n", cases[i].prompt.c_str(), shapecls::describe(got[i]).c_str());

  const Scores s = score(got, want);
  print("48 prompts (compositions seen in training)", s);
  expect_targets("48 prompts", s);

  // The same images against the prompts in another order (a fixed derangement: rotate by 17).
  std::vector<ShapeAttributes> rotated(want.size());
  for (size_t i = 0; i < want.size(); ++i) rotated[i] = want[(i + 17) % want.size()];
  const Scores sh = score(got, rotated);
  print("the same images, prompts shuffled", sh);
  expect_near_chance("shuffled prompts", sh);

  // A text encoder that learned nothing.
  const std::string dir = clitest::temp_dir() + "/demo_untrained";
  fs::create_directories(dir);
  const std::vector<ShapeAttributes> got_u = draw(untrained_text_encoder_copy(dir), cases, "untrained_te");
  const Scores su = score(got_u, want);
  print("text encoder left untrained", su);
  expect_near_chance("untrained text encoder", su);
}

// The VAE alone: single-shape scenes the dataset generator draws, encoded and decoded, read back
// with the same reader — the ceiling the diffusion model works under (reported and checked against
// the thresholds above: a VAE below them would make them unreachable).
TEST(DemoModel, VaeReconstructionsKeepWhatTheImageShows) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "the demo model is not there (make demo-model writes it): " << kModel;
  auto be = make_cpu_backend(Precision::F32);
  SDLoadOptions lo;
  lo.text_encoders = false, lo.unet = false;
  std::unique_ptr<SDModel> m = SDModel::load(kModel, *be, lo);
  std::vector<ShapeAttributes> got, want;
  Arena arena;
  Ctx c{*be, arena, DType::F32};
  for (int64_t i = 0; got.size() < 200; ++i) {
    const ShapeSample s = make_shape_sample(kSeed, i);
    if (s.scene.shapes.size() != 1) continue;
    const Image im = render_shape_scene(s.scene, m->declared.width > 0 ? m->declared.width : 64);
    Tensor x = Tensor::empty({1, im.height, im.width, 3});
    for (int64_t j = 0; j < x.numel(); ++j) x.f32()[j] = float(im.pixels[size_t(j)]) / 127.5f - 1.0f;
    const Tensor y = m->vae.decode(c, m->vae.encode(c, x).mean);
    std::vector<uint8_t> rgb(size_t(y.numel()));
    for (int64_t j = 0; j < y.numel(); ++j)
      rgb[size_t(j)] = uint8_t(std::lround(std::clamp((y.f32()[j] + 1.0f) * 127.5f, 0.0f, 255.0f)));
    arena.reset();
    got.push_back(shapecls::classify_shape_image(im.width, im.height, rgb.data()));
    ShapeAttributes w;
    const ShapeSpec& sp = s.scene.shapes[0];
    w.colour = sp.combo.colour, w.shape = sp.combo.shape, w.position = sp.combo.position;
    w.background = s.scene.background;
    want.push_back(w);
  }
  const Scores sc = score(got, want);
  print("200 dataset scenes through the VAE alone", sc);
  expect_targets("the VAE alone", sc);
}

TEST(DemoModel, HeldOutCompositionsAreReported) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "the demo model is not there (make demo-model writes it): " << kModel;
  const std::vector<Case> cases = make_cases(heldout_combos(), kPrompts, 1);
  const std::vector<ShapeAttributes> got = draw(kModel, cases, "heldout");
  for (size_t i = 0; i < cases.size(); ++i)
    std::printf("  %-78s -> %s\n", cases[i].prompt.c_str(), shapecls::describe(got[i]).c_str());
  const Scores s = score(got, wants(cases));
  // Reported, not asserted (issue 17: target 70% per attribute).
  print("48 prompts of held-out compositions", s);
}
