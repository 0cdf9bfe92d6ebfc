// The synthetic shapes dataset: see shapes_dataset.h for the geometry, colours and held-out rule.
#include "train/shapes_dataset.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <system_error>

#include "core/error.h"
#include "io/output_file.h"

namespace diffuse::train {

namespace fs = std::filesystem;

namespace {

constexpr double kMargin = 0.02;      // a shape stays this far from every edge
constexpr double kPairGap = 0.03;     // bounding boxes of a two-shape image stay this far apart
constexpr double kSideLimit = 0.36;   // left: centre x <= 0.36 (the rule allows < 0.4)
constexpr double kCrossLow = 0.42;    // the other coordinate of left/right/top/bottom: [0.42, 0.58]
constexpr double kCentreLow = 0.45;   // centre: both coordinates in [0.45, 0.55]
constexpr double kTriangleWidth = 1.2;  // a triangle's half base, in units of `half`

// SplitMix64: a small generator whose output is the same on every platform (std:: distributions
// are not specified bit for bit).
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double unit() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * unit(); }
  int below(int n) { return int(next() % uint64_t(n)); }
  bool chance(double p) { return unit() < p; }

 private:
  uint64_t state_;
};

uint64_t mix64(uint64_t x) { return Rng(x).next(); }

double draw_half(bool large, Rng& r) { return large ? r.uniform(0.19, 0.23) : r.uniform(0.10, 0.13); }

// Draws the centre of `s` (its combo and half already set) for its position.
void draw_centre(ShapeSpec& s, Rng& r) {
  const ShapeExtent e = shape_extent(s);
  const double cross = r.uniform(kCrossLow, 1.0 - kCrossLow);
  switch (s.combo.position) {
    case ShapePosition::Left: s.cx = r.uniform(e.left + kMargin, kSideLimit), s.cy = cross; break;
    case ShapePosition::Right: s.cx = r.uniform(1.0 - kSideLimit, 1.0 - e.right - kMargin), s.cy = cross; break;
    case ShapePosition::Top: s.cy = r.uniform(e.up + kMargin, kSideLimit), s.cx = cross; break;
    case ShapePosition::Bottom: s.cy = r.uniform(1.0 - kSideLimit, 1.0 - e.down - kMargin), s.cx = cross; break;
    case ShapePosition::Centre:
      s.cx = r.uniform(kCentreLow, 1.0 - kCentreLow);
      s.cy = r.uniform(kCentreLow, 1.0 - kCentreLow);
      break;
  }
}

// A composition at `position` whose colour is neither `background` nor `other` (-1: none), and
// that is not held out.
ShapeCombo draw_combo(ShapePosition position, int background, int other, Rng& r) {
  for (;;) {
    ShapeCombo c;
    c.position = position;
    c.shape = ShapeKind(r.below(kShapeKindCount));
    c.colour = r.below(kShapeColourCount);
    if (c.colour != background && c.colour != other && !is_heldout(c)) return c;
  }
}

// True when the two shapes' bounding boxes are at least kPairGap apart along the pair's axis
// (a is left of / above b).
bool pair_separated(const ShapeSpec& a, const ShapeSpec& b, bool horizontal) {
  const ShapeExtent ea = shape_extent(a), eb = shape_extent(b);
  if (horizontal) return a.cx + ea.right + kPairGap <= b.cx - eb.left;
  return a.cy + ea.down + kPairGap <= b.cy - eb.up;
}

// Two shapes at opposite positions; at most one of them large, so that they always fit apart.
std::vector<ShapeSpec> draw_pair(int background, Rng& r) {
  const bool horizontal = r.chance(0.5);
  ShapeSpec a, b;
  a.combo = draw_combo(horizontal ? ShapePosition::Left : ShapePosition::Top, background, -1, r);
  b.combo = draw_combo(horizontal ? ShapePosition::Right : ShapePosition::Bottom, background, a.combo.colour, r);
  const int large = r.below(3);  // 0: neither, 1: a, 2: b
  a.large = large == 1;
  b.large = large == 2;
  a.half = draw_half(a.large, r);
  b.half = draw_half(b.large, r);
  bool separated = false;
  for (int attempt = 0; attempt < 64 && !separated; ++attempt) {
    draw_centre(a, r);
    draw_centre(b, r);
    separated = pair_separated(a, b, horizontal);
  }
  if (!separated) {  // both pushed to the outer edges: always apart with at most one large shape
    const ShapeExtent ea = shape_extent(a), eb = shape_extent(b);
    if (horizontal) a.cx = ea.left + kMargin, b.cx = 1.0 - eb.right - kMargin;
    else a.cy = ea.up + kMargin, b.cy = 1.0 - eb.down - kMargin;
  }
  DF_ASSERT(pair_separated(a, b, horizontal));
  // Left/top first in the caption half of the time: the order of the shapes in the list.
  if (r.chance(0.5)) return {a, b};
  return {b, a};
}

ShapeScene draw_scene(Rng& r) {
  ShapeScene scene;
  scene.background = r.below(kShapeColourCount);
  if (r.chance(0.35)) {
    scene.shapes = draw_pair(scene.background, r);
    return scene;
  }
  ShapeSpec s;
  s.combo = draw_combo(ShapePosition(r.below(kShapePositionCount)), scene.background, -1, r);
  s.large = r.chance(0.5);
  s.half = draw_half(s.large, r);
  draw_centre(s, r);
  scene.shapes.push_back(s);
  return scene;
}

// Whether the point (u, v) (fractions of the side) is inside the shape.
bool inside(const ShapeSpec& s, double u, double v) {
  const double dx = u - s.cx, dy = v - s.cy, h = s.half;
  switch (s.combo.shape) {
    case ShapeKind::Circle: return dx * dx + dy * dy <= h * h;
    case ShapeKind::Square: return std::fabs(dx) <= h && std::fabs(dy) <= h;
    case ShapeKind::Triangle: {
      const double height = 2.0 * h, apex = -height * 2.0 / 3.0;  // the centroid is 2/3 down
      if (dy < apex || dy > apex + height) return false;
      return std::fabs(dx) <= kTriangleWidth * h * (dy - apex) / height;
    }
  }
  return false;
}

// ---- captions ----

const char* article(const std::string& word) {
  return std::string("aeiou").find(word.empty() ? 'x' : word[0]) != std::string::npos ? "an" : "a";
}

std::string with_article(const std::string& phrase) { return std::string(article(phrase)) + " " + phrase; }

// Each choice below is drawn from the caption's own generator, so the wording never changes the
// pixels. The phrases vary the words around the attribute words (openers, adjectives, tags, word
// order) so that a text encoder trained on them learns to read the attribute words and not one
// fixed sentence: prompts are worded in other ways than the captions.
const char* pick(const std::vector<const char*>& options, Rng& r) {
  return options[size_t(r.below(int(options.size())))];
}

std::string position_phrase(ShapePosition p, Rng& r) {
  static const std::vector<std::vector<const char*>> phrases = {
      {"on the left", "on the left side", "at the left", "to the left", "on the left-hand side", "in the left half"},
      {"on the right", "on the right side", "at the right", "to the right", "on the right-hand side",
       "in the right half"},
      {"at the top", "near the top", "at the very top", "towards the top", "in the top half"},
      {"at the bottom", "near the bottom", "at the very bottom", "towards the bottom", "in the bottom half"},
      {"in the centre", "in the center", "in the middle", "at the center", "in the centre of the image",
       "in the middle of the frame"},
  };
  return pick(phrases[size_t(p)], r);
}

// "a small red circle on the left", sometimes "a large solid red circle ..."
std::string shape_phrase(const ShapeSpec& s, bool name_size, Rng& r) {
  std::string noun = std::string(shape_colours()[size_t(s.combo.colour)].name) + " " + shape_kind_name(s.combo.shape);
  if (r.chance(0.15)) noun = std::string(pick({"solid", "flat", "single", "filled", "lone", "bright"}, r)) + " " + noun;
  if (name_size) noun = std::string(s.large ? "large " : "small ") + noun;
  return with_article(noun) + " " + position_phrase(s.combo.position, r);
}

// "blue background", sometimes "solid blue background"
std::string background_words(const std::string& colour, Rng& r) {
  return (r.chance(0.15) ? std::string(pick({"solid", "flat", "smooth"}, r)) + " " : std::string()) + colour +
         " background";
}

std::string index_name(int64_t i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%06lld", static_cast<long long>(i));
  return buf;
}

void check_options(const ShapesDatasetOptions& o) {
  DF_CHECK(o.count >= 1 && o.count <= kMaxShapesCount, "--count ", o.count, ": must be between 1 and ",
           kMaxShapesCount);
  DF_CHECK(o.size == 64 || o.size == 128, "--size ", o.size, ": must be 64 or 128");
  DF_CHECK(!o.dir.empty(), "-o/--output: the output folder is empty");
  std::error_code ec;
  const fs::file_status st = fs::status(o.dir, ec);
  if (fs::exists(st)) {
    DF_CHECK(fs::is_directory(st), "-o/--output ", o.dir, ": exists and is not a folder");
    // Files of an earlier dataset would be read as part of this one.
    DF_CHECK(fs::is_empty(o.dir, ec) && !ec, "-o/--output ", o.dir,
             ": the folder is not empty (the dataset needs a new or empty folder)");
    return;
  }
  fs::create_directories(o.dir, ec);
  DF_CHECK(!ec, "-o/--output ", o.dir, ": cannot create the folder: ", ec.message());
}

}  // namespace

const std::vector<NamedColour>& shape_colours() {
  static const std::vector<NamedColour> colours = {
      {"red", 220, 30, 30},     {"green", 30, 170, 50},   {"blue", 40, 70, 220},  {"yellow", 240, 220, 40},
      {"white", 245, 245, 245}, {"black", 15, 15, 15},    {"orange", 250, 140, 20}, {"purple", 140, 50, 180},
  };
  return colours;
}

const char* shape_kind_name(ShapeKind k) {
  switch (k) {
    case ShapeKind::Circle: return "circle";
    case ShapeKind::Square: return "square";
    case ShapeKind::Triangle: return "triangle";
  }
  return "?";
}

const char* shape_position_name(ShapePosition p) {
  switch (p) {
    case ShapePosition::Left: return "left";
    case ShapePosition::Right: return "right";
    case ShapePosition::Top: return "top";
    case ShapePosition::Bottom: return "bottom";
    case ShapePosition::Centre: return "centre";
  }
  return "?";
}

std::string combo_text(const ShapeCombo& c) {
  return cat(shape_colours()[size_t(c.colour)].name, " ", shape_kind_name(c.shape), " ", shape_position_name(c.position));
}

const std::vector<ShapeCombo>& heldout_combos() {
  // Colours 0-7: red green blue yellow white black orange purple. Each shape 4 times, each
  // position 2-3 times, each colour 1-2 times. Not "red circle left": make demo's first prompt.
  using K = ShapeKind;
  using P = ShapePosition;
  static const std::vector<ShapeCombo> combos = {
      {0, K::Circle, P::Top},     {1, K::Square, P::Right},   {2, K::Triangle, P::Top},
      {3, K::Circle, P::Bottom},  {4, K::Square, P::Centre},  {5, K::Triangle, P::Left},
      {6, K::Circle, P::Right},   {7, K::Square, P::Top},     {0, K::Triangle, P::Bottom},
      {2, K::Circle, P::Centre},  {6, K::Square, P::Left},    {7, K::Triangle, P::Right},
  };
  return combos;
}

bool is_heldout(const ShapeCombo& c) {
  const auto& h = heldout_combos();
  return std::find(h.begin(), h.end(), c) != h.end();
}

ShapeExtent shape_extent(const ShapeSpec& s) {
  const double h = s.half;
  if (s.combo.shape == ShapeKind::Triangle)
    return {kTriangleWidth * h, kTriangleWidth * h, 2.0 * h * 2.0 / 3.0, 2.0 * h / 3.0};
  return {h, h, h, h};
}

Image render_shape_scene(const ShapeScene& scene, int size) {
  DF_CHECK(size >= 1 && size <= 4096, "render_shape_scene: size ", size, " out of range");
  constexpr int kSub = 4;  // samples per pixel side
  const auto& pal = shape_colours();
  Image im;
  im.width = im.height = size;
  im.channels = 3;
  im.pixels.resize(size_t(size) * size * 3);
  const NamedColour& bg = pal[size_t(scene.background)];
  for (int y = 0; y < size; ++y)
    for (int x = 0; x < size; ++x) {
      // Coverage counts (of kSub² samples) per shape, then an integer blend with the background.
      int total = 0, acc[3] = {0, 0, 0};
      for (const ShapeSpec& s : scene.shapes) {
        const ShapeExtent e = shape_extent(s);
        const double x0 = double(x) / size, x1 = double(x + 1) / size;
        const double y0 = double(y) / size, y1 = double(y + 1) / size;
        if (x1 < s.cx - e.left || x0 > s.cx + e.right || y1 < s.cy - e.up || y0 > s.cy + e.down) continue;
        int k = 0;
        for (int j = 0; j < kSub; ++j)
          for (int i = 0; i < kSub; ++i)
            k += inside(s, (x + (i + 0.5) / kSub) / size, (y + (j + 0.5) / kSub) / size);
        const NamedColour& c = pal[size_t(s.combo.colour)];
        acc[0] += c.r * k, acc[1] += c.g * k, acc[2] += c.b * k;
        total += k;
      }
      const int n = kSub * kSub, rest = n - std::min(total, n);
      uint8_t* p = &im.pixels[(size_t(y) * size + x) * 3];
      p[0] = uint8_t((acc[0] + bg.r * rest + n / 2) / n);
      p[1] = uint8_t((acc[1] + bg.g * rest + n / 2) / n);
      p[2] = uint8_t((acc[2] + bg.b * rest + n / 2) / n);
    }
  return im;
}

ShapeSpec place_shape(const ShapeCombo& combo, bool large, uint64_t seed) {
  Rng r(mix64(seed));
  ShapeSpec s;
  s.combo = combo;
  s.large = large;
  s.half = draw_half(large, r);
  draw_centre(s, r);
  return s;
}

// What the image is, to open a caption that starts with its shapes: "an image of ", ...
std::string opener(Rng& r) {
  return pick({"an image of ", "a drawing of ", "a photo of ", "an illustration of ", "a painting of ", "a sketch of ",
               "a render of ", "an icon of ", "a view of ", "showing ", "here is ", "i see "},
              r);
}

// One or two distinct style tags, as prompts often end: ", flat colours, minimalist".
std::string style_tags(Rng& r) {
  static const std::vector<const char*> tags = {"flat colours", "minimalist", "high quality", "vector art",
                                                "digital art",  "clean lines", "2d",          "cartoon style",
                                                "geometric",    "no texture"};
  const size_t first = size_t(r.below(int(tags.size())));
  std::string out = std::string(", ") + tags[first];
  if (r.chance(0.4)) out += std::string(", ") + tags[(first + 1 + size_t(r.below(int(tags.size()) - 1))) % tags.size()];
  return out;
}

std::string shape_caption(const ShapeScene& scene, uint64_t wording_seed) {
  DF_CHECK(!scene.shapes.empty(), "shape_caption: a scene without shapes");
  Rng r(mix64(wording_seed));
  const bool name_size = r.chance(0.5);
  std::string body = shape_phrase(scene.shapes[0], name_size, r);
  for (size_t i = 1; i < scene.shapes.size(); ++i) body += " and " + shape_phrase(scene.shapes[i], name_size, r);
  const std::string bg = shape_colours()[size_t(scene.background)].name;
  const std::string bgw = background_words(bg, r);
  // The background named before or after the shapes, its colour before or after the word.
  std::string caption;
  bool body_first = true;
  switch (r.below(13)) {
    case 0: caption = body + ", " + bgw; break;
    case 1: caption = body + " on " + with_article(bgw); break;
    case 2: caption = body + " with " + with_article(bgw); break;
    case 3: caption = "on " + with_article(bgw) + ", " + body, body_first = false; break;
    case 4: caption = bgw + ", " + body, body_first = false; break;
    case 5: caption = body + " against " + with_article(bgw); break;
    case 6: caption = body + "; the background is " + bg; break;
    case 7: caption = "the background is " + bg + " and there is " + body, body_first = false; break;
    case 8: caption = body + " in front of " + with_article(bgw); break;
    case 9: caption = body + " set on " + with_article(bgw); break;
    case 10: caption = with_article(bgw) + " with " + body, body_first = false; break;
    case 11: caption = body + " on top of " + with_article(bgw); break;
    default: caption = body + ", and the background is " + bg; break;
  }
  // A third of the captions that start with the shapes open with what the image is.
  if (body_first && r.chance(0.33)) caption = opener(r) + caption;
  // A quarter end with style tags.
  if (r.chance(0.25)) caption += style_tags(r);
  return caption;
}

ShapeSample make_shape_sample(uint64_t seed, int64_t index) {
  Rng r(mix64(seed) ^ mix64(0x5EED0000ull + uint64_t(index)));
  ShapeSample out;
  out.scene = draw_scene(r);
  out.caption = shape_caption(out.scene, r.next());
  return out;
}

std::string heldout_file_text() {
  std::string text = "# held-out compositions (colour shape position): never drawn in this dataset\n";
  for (const ShapeCombo& c : heldout_combos()) text += combo_text(c) + "\n";
  return text;
}

void write_shapes_dataset(const ShapesDatasetOptions& o, const std::function<void(int64_t, int64_t)>& progress) {
  check_options(o);
  const fs::path dir(o.dir);
  for (int64_t i = 0; i < o.count; ++i) {
    const ShapeSample s = make_shape_sample(o.seed, i);
    const std::string base = (dir / index_name(i)).string();
    // No fsync per file (tens of thousands of them): one sync of the file system at the end.
    const std::vector<uint8_t> png = encode_png(render_shape_scene(s.scene, o.size));
    write_file_safely(base + ".png", png.data(), png.size(), WriteSync::Later);
    const std::string line = s.caption + "\n";
    write_file_safely(base + ".txt", line.data(), line.size(), WriteSync::Later);
    if (progress && ((i + 1) % 1000 == 0 || i + 1 == o.count)) progress(i + 1, o.count);
  }
  sync_written_files(o.dir);
  const std::string held = heldout_file_text();
  write_file_safely((dir / "heldout.txt").string(), held.data(), held.size());
}

}  // namespace diffuse::train
