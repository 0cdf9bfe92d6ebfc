// The synthetic shapes dataset (train/shapes_dataset.h) and the rule-based reader of its images and
// captions (tests/common/shape_classifier.h): determinism, the position/size/colour rules on the
// generator's own description, held-out compositions never drawn, captions that say what the image
// shows (read back by the prompt parser and, from the pixels, by the classifier), the files written.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "../common/shape_classifier.h"
#include "core/error.h"
#include "io/image.h"
#include "train/dataset.h"
#include "train/shapes_dataset.h"

using namespace diffuse;
using namespace diffuse::train;
namespace fs = std::filesystem;

namespace {

// The attributes a single-shape scene has, in the classifier's form.
shapecls::ShapeAttributes truth(const ShapeScene& s) {
  shapecls::ShapeAttributes a;
  a.colour = s.shapes[0].combo.colour;
  a.shape = s.shapes[0].combo.shape;
  a.position = s.shapes[0].combo.position;
  a.background = s.background;
  a.colour_ok = a.shape_ok = a.position_ok = a.background_ok = true;
  return a;
}

// Per-attribute agreement counts.
struct Score {
  int n = 0, colour = 0, shape = 0, position = 0, background = 0;
  void add(const shapecls::ShapeAttributes& want, const shapecls::ShapeAttributes& got) {
    ++n;
    colour += got.colour_ok && got.colour == want.colour;
    shape += got.shape_ok && got.shape == want.shape;
    position += got.position_ok && got.position == want.position;
    background += got.background_ok && got.background == want.background;
  }
  void print(const char* what) const {
    std::printf("%s over %d images: colour %.1f%%, shape %.1f%%, position %.1f%%, background %.1f%%\n", what, n,
                100.0 * colour / n, 100.0 * shape / n, 100.0 * position / n, 100.0 * background / n);
  }
  void expect_at_least(double frac) const {
    EXPECT_GE(colour, frac * n);
    EXPECT_GE(shape, frac * n);
    EXPECT_GE(position, frac * n);
    EXPECT_GE(background, frac * n);
  }
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class ShapesFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("diffuse_test_shapes_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  fs::path dir_;
};

void expect_option_error(const ShapesDatasetOptions& o, const std::string& option, const std::string& keyword) {
  try {
    write_shapes_dataset(o);
    ADD_FAILURE() << "no error; expected one naming " << option;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(option, 0), 0u) << msg;
    EXPECT_NE(msg.find(keyword), std::string::npos) << msg;
  }
}

}  // namespace

TEST(ShapesVocabulary, PaletteAndNames) {
  const auto& pal = shape_colours();
  ASSERT_EQ(pal.size(), size_t(kShapeColourCount));
  std::set<std::string> names;
  for (const auto& c : pal) names.insert(c.name);
  EXPECT_EQ(names, (std::set<std::string>{"red", "green", "blue", "yellow", "white", "black", "orange", "purple"}));
  // Well separated: every pair at least 80 apart in RGB (the classifier's nearest-colour rule).
  for (size_t i = 0; i < pal.size(); ++i)
    for (size_t j = i + 1; j < pal.size(); ++j) {
      const double d = std::hypot(std::hypot(pal[i].r - pal[j].r, pal[i].g - pal[j].g), pal[i].b - pal[j].b);
      EXPECT_GE(d, 80.0) << pal[i].name << " vs " << pal[j].name;
    }
  EXPECT_STREQ(shape_kind_name(ShapeKind::Triangle), "triangle");
  EXPECT_STREQ(shape_position_name(ShapePosition::Centre), "centre");
}

TEST(ShapesVocabulary, HeldOutListCoversEveryAttributeInTraining) {
  const auto& held = heldout_combos();
  ASSERT_EQ(held.size(), 12u);  // 10% of 8 × 3 × 5
  std::set<std::string> unique;
  for (const auto& c : held) unique.insert(combo_text(c));
  EXPECT_EQ(unique.size(), held.size());
  EXPECT_EQ(combo_text(held[0]), "red circle top");
  // Every colour, shape and position, and every pair of them, still has a training combination.
  std::set<std::pair<int, int>> cs, cp, sp;
  for (int c = 0; c < kShapeColourCount; ++c)
    for (int s = 0; s < kShapeKindCount; ++s)
      for (int p = 0; p < kShapePositionCount; ++p)
        if (!is_heldout({c, ShapeKind(s), ShapePosition(p)})) cs.insert({c, s}), cp.insert({c, p}), sp.insert({s, p});
  EXPECT_EQ(cs.size(), size_t(kShapeColourCount * kShapeKindCount));
  EXPECT_EQ(cp.size(), size_t(kShapeColourCount * kShapePositionCount));
  EXPECT_EQ(sp.size(), size_t(kShapeKindCount * kShapePositionCount));
  // heldout.txt: a comment line, then the list in order.
  std::istringstream in(heldout_file_text());
  std::string line;
  ASSERT_TRUE(std::getline(in, line));
  EXPECT_EQ(line[0], '#');
  for (const auto& c : held) {
    ASSERT_TRUE(std::getline(in, line));
    EXPECT_EQ(line, combo_text(c));
  }
  EXPECT_FALSE(std::getline(in, line));
}

TEST(ShapesGenerator, Deterministic) {
  for (int64_t i = 0; i < 20; ++i) {
    const ShapeSample a = make_shape_sample(7, i), b = make_shape_sample(7, i);
    EXPECT_EQ(a.caption, b.caption);
    EXPECT_EQ(encode_png(render_shape_scene(a.scene, 64)), encode_png(render_shape_scene(b.scene, 64)));
  }
  // Another seed: different captions and pixels for nearly every index.
  int same_caption = 0, same_pixels = 0;
  for (int64_t i = 0; i < 50; ++i) {
    const ShapeSample a = make_shape_sample(7, i), b = make_shape_sample(8, i);
    same_caption += a.caption == b.caption;
    same_pixels += render_shape_scene(a.scene, 64).pixels == render_shape_scene(b.scene, 64).pixels;
  }
  EXPECT_LE(same_caption, 2);
  EXPECT_EQ(same_pixels, 0);
  // Indices of one seed differ from each other too.
  std::set<std::string> captions;
  for (int64_t i = 0; i < 50; ++i) captions.insert(make_shape_sample(7, i).caption);
  EXPECT_GE(captions.size(), 48u);
}

// The rules of shapes_dataset.h on the generator's own description, over many scenes.
TEST(ShapesGenerator, PositionSizeColourAndHeldOutRules) {
  int singles = 0, large = 0, shapes_total = 0;
  std::set<int> colours, kinds, positions;
  for (int64_t i = 0; i < 5000; ++i) {
    const ShapeScene sc = make_shape_sample(1234, i).scene;
    ASSERT_TRUE(sc.shapes.size() == 1 || sc.shapes.size() == 2);
    singles += sc.shapes.size() == 1;
    for (const ShapeSpec& s : sc.shapes) {
      ++shapes_total;
      large += s.large;
      colours.insert(s.combo.colour), kinds.insert(int(s.combo.shape)), positions.insert(int(s.combo.position));
      EXPECT_FALSE(is_heldout(s.combo)) << "image " << i << " draws held-out " << combo_text(s.combo);
      EXPECT_NE(s.combo.colour, sc.background) << "image " << i;
      if (s.large) EXPECT_TRUE(s.half >= 0.19 && s.half <= 0.23) << s.half;
      else EXPECT_TRUE(s.half >= 0.10 && s.half <= 0.13) << s.half;
      const ShapeExtent e = shape_extent(s);
      EXPECT_GE(s.cx - e.left, 0.02 - 1e-12) << "image " << i;
      EXPECT_LE(s.cx + e.right, 0.98 + 1e-12) << "image " << i;
      EXPECT_GE(s.cy - e.up, 0.02 - 1e-12) << "image " << i;
      EXPECT_LE(s.cy + e.down, 0.98 + 1e-12) << "image " << i;
      const bool mid_x = s.cx >= 0.35 && s.cx <= 0.65, mid_y = s.cy >= 0.35 && s.cy <= 0.65;
      switch (s.combo.position) {
        case ShapePosition::Left: EXPECT_TRUE(s.cx < 0.4 && mid_y) << s.cx << "," << s.cy; break;
        case ShapePosition::Right: EXPECT_TRUE(s.cx > 0.6 && mid_y) << s.cx << "," << s.cy; break;
        case ShapePosition::Top: EXPECT_TRUE(s.cy < 0.4 && mid_x) << s.cx << "," << s.cy; break;
        case ShapePosition::Bottom: EXPECT_TRUE(s.cy > 0.6 && mid_x) << s.cx << "," << s.cy; break;
        case ShapePosition::Centre:
          EXPECT_TRUE(s.cx >= 0.4 && s.cx <= 0.6 && s.cy >= 0.4 && s.cy <= 0.6) << s.cx << "," << s.cy;
          break;
      }
      // The classifier's reading of the centre agrees with the rule.
      EXPECT_EQ(shapecls::position_of(s.cx, s.cy), s.combo.position);
    }
    if (sc.shapes.size() == 2) {
      const ShapeSpec &a = sc.shapes[0], &b = sc.shapes[1];
      EXPECT_NE(a.combo.colour, b.combo.colour);
      std::set<ShapePosition> pair = {a.combo.position, b.combo.position};
      EXPECT_TRUE((pair == std::set<ShapePosition>{ShapePosition::Left, ShapePosition::Right}) ||
                  (pair == std::set<ShapePosition>{ShapePosition::Top, ShapePosition::Bottom}));
      // Bounding boxes do not overlap.
      const ShapeExtent ea = shape_extent(a), eb = shape_extent(b);
      const bool apart_x = a.cx + ea.right < b.cx - eb.left || b.cx + eb.right < a.cx - ea.left;
      const bool apart_y = a.cy + ea.down < b.cy - eb.up || b.cy + eb.down < a.cy - ea.up;
      EXPECT_TRUE(apart_x || apart_y) << "image " << i;
    }
  }
  std::printf("5000 scenes: %.1f%% single-shape, %.1f%% of shapes large\n", 100.0 * singles / 5000,
              100.0 * large / shapes_total);
  EXPECT_NEAR(singles / 5000.0, 0.65, 0.03);
  EXPECT_NEAR(double(large) / shapes_total, 0.45, 0.05);  // half the single shapes, a third of pairs' shapes
  EXPECT_EQ(colours.size(), size_t(kShapeColourCount));
  EXPECT_EQ(kinds.size(), size_t(kShapeKindCount));
  EXPECT_EQ(positions.size(), size_t(kShapePositionCount));
}

TEST(ShapesCaptions, WordingAndParserReadBack) {
  int singles = 0, parsed = 0, sized = 0;
  std::set<std::string> openings;
  for (int64_t i = 0; i < 3000; ++i) {
    const ShapeSample s = make_shape_sample(99, i);
    const std::string& c = s.caption;
    EXPECT_EQ(c.find('\n'), std::string::npos);
    const std::string bg = shape_colours()[size_t(s.scene.background)].name;
    EXPECT_TRUE(c.find(bg + " background") != std::string::npos || c.find("background is " + bg) != std::string::npos)
        << c;
    // "a" / "an": an exactly before a vowel.
    const std::vector<std::string> w = shapecls::detail::words(c);
    for (size_t k = 0; k + 1 < w.size(); ++k) {
      const bool vowel = std::string("aeiou").find(w[k + 1][0]) != std::string::npos;
      if (w[k] == "a") {
        EXPECT_FALSE(vowel) << c;
      }
      if (w[k] == "an") {
        EXPECT_TRUE(vowel) << c;
      }
    }
    openings.insert(w[0] + " " + w[1]);
    if (s.scene.shapes.size() == 2) {
      EXPECT_NE(c.find(" and "), std::string::npos) << c;
      continue;
    }
    ++singles;
    sized += c.find("small ") != std::string::npos || c.find("large ") != std::string::npos;
    const shapecls::ShapeAttributes got = shapecls::parse_shape_prompt(c), want = truth(s.scene);
    const bool ok = got.colour_ok && got.shape_ok && got.position_ok && got.background_ok &&
                    got.colour == want.colour && got.shape == want.shape && got.position == want.position &&
                    got.background == want.background;
    parsed += ok;
    EXPECT_TRUE(ok) << c << " read as " << shapecls::describe(got);
  }
  EXPECT_EQ(parsed, singles);
  EXPECT_NEAR(double(sized) / singles, 0.5, 0.05);
  EXPECT_GE(openings.size(), 6u);  // the templates vary the start ("a red", "on a", "blue background", …)
  // The parser on hand-written prompts.
  const shapecls::ShapeAttributes a = shapecls::parse_shape_prompt("On a purple background, a large WHITE circle in the middle");
  EXPECT_EQ(shapecls::describe(a), "white circle centre on purple");
  const shapecls::ShapeAttributes b = shapecls::parse_shape_prompt("a red square");
  EXPECT_TRUE(b.colour_ok && b.shape_ok);
  EXPECT_FALSE(b.position_ok || b.background_ok);
}

// The classifier reads every single-shape image's caption attributes from its pixels.
TEST(ShapesClassifier, AgreesWithCaptions) {
  Score score;
  for (int64_t i = 0; score.n < 400; ++i) {
    const ShapeSample s = make_shape_sample(5, i);
    if (s.scene.shapes.size() != 1) continue;
    const Image im = render_shape_scene(s.scene, 64);
    const shapecls::ShapeAttributes got = shapecls::classify_shape_image(im.width, im.height, im.pixels.data());
    const shapecls::ShapeAttributes want = shapecls::parse_shape_prompt(s.caption);
    score.add(want, got);
    if (!(got.colour == want.colour && got.shape == want.shape && got.position == want.position))
      std::printf("  image %lld \"%s\": read %s (fill %.2f, top share %.2f)\n", static_cast<long long>(i),
                  s.caption.c_str(), shapecls::describe(got).c_str(), got.fill, got.top_share);
  }
  score.print("classifier vs caption, 64 px");
  score.expect_at_least(0.98);
  Score big;
  for (int64_t i = 0; big.n < 100; ++i) {
    const ShapeSample s = make_shape_sample(5, i);
    if (s.scene.shapes.size() != 1) continue;
    const Image im = render_shape_scene(s.scene, 128);
    big.add(shapecls::parse_shape_prompt(s.caption), shapecls::classify_shape_image(128, 128, im.pixels.data()));
  }
  big.print("classifier vs caption, 128 px");
  big.expect_at_least(0.98);
}

// Blurred and noisy versions (a stand-in for a model's soft output) are still read correctly.
TEST(ShapesClassifier, ToleratesBlurAndNoise) {
  Score score;
  uint32_t noise = 12345;
  for (int64_t i = 0; score.n < 200; ++i) {
    const ShapeSample s = make_shape_sample(6, i);
    if (s.scene.shapes.size() != 1) continue;
    const Image im = render_shape_scene(s.scene, 64);
    const int n = im.width;
    std::vector<uint8_t> out(im.pixels.size());
    for (int y = 0; y < n; ++y)
      for (int x = 0; x < n; ++x)
        for (int c = 0; c < 3; ++c) {
          int sum = 0, cnt = 0;  // 5 × 5 box blur
          for (int dy = -2; dy <= 2; ++dy)
            for (int dx = -2; dx <= 2; ++dx) {
              const int xx = std::clamp(x + dx, 0, n - 1), yy = std::clamp(y + dy, 0, n - 1);
              sum += im.pixels[(size_t(yy) * n + xx) * 3 + c], ++cnt;
            }
          noise = noise * 1664525u + 1013904223u;
          const int v = sum / cnt + int(noise >> 27) - 16;  // ±16
          out[(size_t(y) * n + x) * 3 + c] = uint8_t(std::clamp(v, 0, 255));
        }
    const shapecls::ShapeAttributes got = shapecls::classify_shape_image(n, n, out.data());
    score.add(truth(s.scene), got);
    if (got.shape != s.scene.shapes[0].combo.shape || got.colour != s.scene.shapes[0].combo.colour)
      std::printf("  blurred image %lld \"%s\": read %s (fill %.2f, top share %.2f, diag %.2f, %lld px)\n",
                  static_cast<long long>(i), s.caption.c_str(), shapecls::describe(got).c_str(), got.fill,
                  got.top_share, got.diag, static_cast<long long>(got.pixels));
  }
  score.print("classifier on blurred + noisy images, 64 px");
  score.expect_at_least(0.95);
}

// Known cases rendered on purpose, held-out compositions included (the later demo draws those).
TEST(ShapesClassifier, KnownCasesAndHeldOutCompositions) {
  ShapeScene sc;
  sc.background = 4;  // white
  sc.shapes = {place_shape({0, ShapeKind::Square, ShapePosition::Centre}, true, 1)};
  const Image im = render_shape_scene(sc, 128);
  ASSERT_EQ(im.width, 128);
  ASSERT_EQ(im.channels, 3);
  const uint8_t* mid = &im.pixels[(size_t(64) * 128 + 64) * 3];
  EXPECT_EQ(int(mid[0]), 220);  // red inside
  EXPECT_EQ(int(mid[1]), 30);
  EXPECT_EQ(int(im.pixels[0]), 245);  // white corner
  EXPECT_EQ(shapecls::describe(shapecls::classify_shape_image(128, 128, im.pixels.data())), "red square centre on white");
  for (const ShapeCombo& c : heldout_combos())
    for (bool large : {false, true}) {
      ShapeScene h;
      h.background = c.colour == 5 ? 4 : 5;  // black, or white behind a black shape
      h.shapes = {place_shape(c, large, 3)};
      const Image hi = render_shape_scene(h, 64);
      const shapecls::ShapeAttributes got = shapecls::classify_shape_image(64, 64, hi.pixels.data());
      EXPECT_EQ(shapecls::describe(got), combo_text(c) + " on " + shape_colours()[size_t(h.background)].name)
          << (large ? "large" : "small");
    }
  // A flat image has a background and no shape.
  std::vector<uint8_t> flat(32 * 32 * 3, 15);
  const shapecls::ShapeAttributes f = shapecls::classify_shape_image(32, 32, flat.data());
  EXPECT_TRUE(f.background_ok);
  EXPECT_EQ(f.background, 5);
  EXPECT_FALSE(f.colour_ok || f.shape_ok || f.position_ok);
}

TEST_F(ShapesFiles, WritesImagesCaptionsAndHeldOut) {
  ShapesDatasetOptions o;
  o.count = 12;
  o.size = 64;
  o.dir = dir_.string();
  o.seed = 11;
  std::vector<int64_t> calls;
  write_shapes_dataset(o, [&](int64_t done, int64_t count) {
    EXPECT_EQ(count, 12);
    calls.push_back(done);
  });
  EXPECT_EQ(calls, std::vector<int64_t>{12});
  for (int64_t i = 0; i < 12; ++i) {
    char name[16];
    std::snprintf(name, sizeof name, "%06lld", static_cast<long long>(i));
    const Image im = read_image((dir_ / (std::string(name) + ".png")).string());
    EXPECT_EQ(im.width, 64);
    EXPECT_EQ(im.channels, 3);
    const ShapeSample s = make_shape_sample(11, i);
    EXPECT_EQ(im.pixels, render_shape_scene(s.scene, 64).pixels);
    EXPECT_EQ(slurp(dir_ / (std::string(name) + ".txt")), s.caption + "\n");
  }
  EXPECT_EQ(slurp(dir_ / "heldout.txt"), heldout_file_text());
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) files += e.is_regular_file();
  EXPECT_EQ(files, 12u * 2 + 1);  // no temporary files left
  // `diffuse train` reads the folder: every image with its caption, nothing skipped.
  DatasetOptions scan;
  scan.resolution = 64;
  const Dataset ds = scan_dataset(dir_.string(), scan);
  ASSERT_EQ(ds.items.size(), 12u);
  EXPECT_TRUE(ds.warnings.empty()) << ds.warnings[0];
  EXPECT_EQ(ds.items[7].caption, make_shape_sample(11, 7).caption);
  // Not again into the same folder (stale files would join the dataset); into another: the same bytes.
  expect_option_error(o, "-o/--output", "not empty");
  const fs::path again = dir_ / "again";
  fs::create_directory(again);  // an existing empty folder is fine
  o.dir = again.string();
  write_shapes_dataset(o);
  for (const char* name : {"000000.png", "000011.png", "000005.txt", "heldout.txt"})
    EXPECT_EQ(slurp(again / name), slurp(dir_ / name)) << name;
}

TEST_F(ShapesFiles, BadOptionsNameTheOption) {
  ShapesDatasetOptions o;
  o.dir = dir_.string();
  o.count = 0;
  expect_option_error(o, "--count", "between 1 and");
  o.count = -3;
  expect_option_error(o, "--count", "between 1 and");
  o.count = 2;
  o.size = 100;
  expect_option_error(o, "--size", "64 or 128");
  o.size = 64;
  std::ofstream(dir_.string() + ".file") << "x";
  o.dir = dir_.string() + ".file";
  expect_option_error(o, "-o/--output", "not a folder");
  fs::remove(o.dir);
  EXPECT_FALSE(fs::exists(dir_));  // nothing created by the failed calls
}
