// A synthetic captioned dataset of coloured shapes (`diffuse dataset shapes`): a flat background
// and one shape (about 65% of images) or two (35%), with a plain-English caption each, for
// training a small diffusion model from scratch and checking what it learned.
//
// Vocabulary: 8 colours (shape_colours(), names and RGB), 3 shapes (circle, axis-aligned square,
// isosceles triangle with a horizontal base at the bottom and the apex up), 5 positions (left,
// right, top, bottom, centre) and 2 sizes (small, large).
//
// Geometry, in fractions of the image side (x to the right, y down). A shape's centre is its
// centroid: for a circle and a square their centre; for a triangle the centroid of its area.
// Positions (the rule the tests check):
//   left:   centre x < 0.4 (the left 40%),   centre y in [0.35, 0.65] (the middle 30%)
//   right:  centre x > 0.6 (the right 40%),  centre y in the middle 30%
//   top:    centre y < 0.4,                  centre x in the middle 30%
//   bottom: centre y > 0.6,                  centre x in the middle 30%
//   centre: centre x and y both in [0.4, 0.6] (the middle 20%)
// Sizes: `half` is a circle's radius and a square's half side: small 0.10-0.13, large 0.19-0.23.
// A triangle of `half` h has base 2·1.2h and height 2h. Every shape lies fully inside the image
// (at least 0.02 from each edge). Two-shape images put their shapes at opposite positions (left
// and right, or top and bottom), their bounding boxes at least 0.03 apart.
// Colours: a shape's colour differs from the background and from the other shape's. No shape of
// any image is a held-out composition (heldout_combos()).
// Rendering: 4×4 supersampling per pixel (the coverage blends shape and background colours).
//
// Determinism: image i of a seed depends only on (seed, i) and the size, through a generator of
// this file (no std:: distributions), so a seed gives the same files byte for byte everywhere,
// and the first N images of a larger count are the same as a count of N.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "io/image.h"

namespace diffuse::train {

struct NamedColour {
  const char* name;
  uint8_t r, g, b;
};
// red, green, blue, yellow, white, black, orange, purple: a colour is its index in this list.
const std::vector<NamedColour>& shape_colours();
constexpr int kShapeColourCount = 8;

enum class ShapeKind { Circle, Square, Triangle };
enum class ShapePosition { Left, Right, Top, Bottom, Centre };
constexpr int kShapeKindCount = 3, kShapePositionCount = 5;
const char* shape_kind_name(ShapeKind k);          // "circle", "square", "triangle"
const char* shape_position_name(ShapePosition p);  // "left", "right", "top", "bottom", "centre"

// One (colour, shape, position) composition.
struct ShapeCombo {
  int colour = 0;  // index into shape_colours()
  ShapeKind shape = ShapeKind::Circle;
  ShapePosition position = ShapePosition::Left;
  bool operator==(const ShapeCombo& o) const {
    return colour == o.colour && shape == o.shape && position == o.position;
  }
};
// "red circle left" (colour shape position).
std::string combo_text(const ShapeCombo& c);

// The held-out compositions: 12 of the 120, fixed (no seed), chosen so that every colour, shape
// and position (and every pair of them) still occurs in training. Never drawn by the generator.
const std::vector<ShapeCombo>& heldout_combos();
bool is_heldout(const ShapeCombo& c);

// One shape of a scene; coordinates and `half` in fractions of the image side.
struct ShapeSpec {
  ShapeCombo combo;
  bool large = false;
  double cx = 0.5, cy = 0.5;  // centre (centroid)
  double half = 0.1;          // circle radius / square half side / triangle scale (see the top)
};
// The shape's extent from its centre: left, right, up, down (fractions of the side).
struct ShapeExtent {
  double left, right, up, down;
};
ShapeExtent shape_extent(const ShapeSpec& s);

struct ShapeScene {
  int background = 0;  // index into shape_colours()
  std::vector<ShapeSpec> shapes;  // 1 or 2
};

// The scene as an RGB image of size × size (4×4 supersampled coverage; integer blending, so
// the bytes are the same on every platform for the same scene).
Image render_shape_scene(const ShapeScene& scene, int size);

// A shape placed as the generator places it, with the given composition and size, at a
// position drawn from `seed` (for tests that render a known case).
ShapeSpec place_shape(const ShapeCombo& combo, bool large, uint64_t seed);

struct ShapeSample {
  ShapeScene scene;
  std::string caption;  // one line, lower case, no trailing newline
};
// Image `index` of the dataset drawn from `seed`.
ShapeSample make_shape_sample(uint64_t seed, int64_t index);

// The caption of a scene: its wording (one of 13 templates, the position phrase, whether sizes are
// named, and now and then an opener such as "a drawing of", an adjective such as "solid", and
// style tags such as ", flat colours") is drawn from `wording_seed`, so it never changes the
// pixels. Exposed for tests; make_shape_sample uses it.
std::string shape_caption(const ShapeScene& scene, uint64_t wording_seed);

struct ShapesDatasetOptions {
  int64_t count = 0;  // images, 1 .. kMaxShapesCount
  int size = 64;      // 64 or 128
  std::string dir;    // created when missing; an existing one must be empty
  uint64_t seed = 0;
};
constexpr int64_t kMaxShapesCount = 1000000;

// Writes <dir>/000000.png + 000000.txt (the caption and a newline) ... and <dir>/heldout.txt, each
// through write_file_safely (temporary file + rename). `progress(done, count)` is called every
// 1000 images and at the end. Throws diffuse::Error naming the option (--count, --size, -o) for
// bad options, and naming the path when a file cannot be written.
void write_shapes_dataset(const ShapesDatasetOptions& o,
                          const std::function<void(int64_t done, int64_t count)>& progress = {});

// The content of heldout.txt: a '#' comment line, then one "colour shape position" per line.
std::string heldout_file_text();

}  // namespace diffuse::train
