// Rule-based reading of a shapes-dataset image (train/shapes_dataset.h), no ML: what colour, shape
// and position its shape has and what its background is; and the same four attributes read from
// a single-shape caption or prompt. Used to check the dataset against its own captions and to
// score images a small trained model draws, so the image reading tolerates blur, soft edges,
// stray pixels and colours off the palette.
//
// Image rules:
//  - background: the palette colour nearest to the per-channel median of the border pixels (a
//    ring 1/32 of the side wide, at least 1 pixel);
//  - shape colour: every pixel is given its nearest palette colour; pixels given the background
//    colour, within kBackgroundRadius of the measured background, or further than kUnnamedRadius
//    from every palette colour (the greys of a black/white blend) are ignored; the colour given to
//    most of the remaining pixels wins (none when fewer than 0.2% of the image remain), except
//    that a colour lying on the way from the background to a runner-up colour (within
//    kBlendRadius of that segment: orange between red and yellow, purple between red and blue) is
//    taken as the soft edge of a runner-up with at least kBlendMinShare of its pixels;
//  - the shape: the largest 8-connected region of pixels of that colour;
//  - position: from the region's centroid (fractions of the side) with the dataset's rule: centre
//    when both coordinates are in [0.4, 0.6], otherwise the axis further from 0.5 decides
//    (left/right by x, top/bottom by y);
//  - shape: fill = region pixels / its bounding box's area (square ≈ 1, circle ≈ π/4, apex-up
//    triangle ≈ 0.5), top_share = the region's share in the upper half of its bounding box
//    (triangle ≈ 0.25, circle and square 0.5) and diag = the region's mean width along the two
//    diagonals over its mean width along x and y (square ≈ √2, still ≈ 1.2 with corners rounded
//    by blur, circle ≈ 1): triangle when top_share < kTriangleTopShare or fill < kTriangleFill,
//    else square when fill > kSquareFill or diag > kSquareDiag, else circle.
#pragma once
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "train/shapes_dataset.h"

namespace shapecls {

using diffuse::train::ShapeKind;
using diffuse::train::ShapePosition;

constexpr double kTriangleTopShare = 0.40;
constexpr double kTriangleFill = 0.60;
constexpr double kSquareFill = 0.90;
constexpr double kSquareDiag = 1.15;
constexpr int kBackgroundRadius = 48;  // RGB distance to the measured background ignored
constexpr int kUnnamedRadius = 70;     // further from every palette colour: no colour
constexpr double kBlendRadius = 45;    // a colour this near a background–colour blend is an edge
constexpr double kBlendMinShare = 0.15;

struct ShapeAttributes {
  int colour = -1;      // index into shape_colours(); -1 when not found
  int background = -1;  // index into shape_colours(); -1 when not found
  ShapeKind shape = ShapeKind::Circle;
  ShapePosition position = ShapePosition::Centre;
  bool colour_ok = false, shape_ok = false, position_ok = false, background_ok = false;
  // Measurements of an image reading (zero for a prompt).
  double cx = 0, cy = 0, fill = 0, top_share = 0, diag = 0;
  int64_t pixels = 0;  // the shape region's pixel count
};

// "red circle left on black" (with "?" for an attribute not found).
inline std::string describe(const ShapeAttributes& a) {
  const auto& pal = diffuse::train::shape_colours();
  std::string s = a.colour_ok ? pal[size_t(a.colour)].name : "?";
  s += std::string(" ") + (a.shape_ok ? diffuse::train::shape_kind_name(a.shape) : "?");
  s += std::string(" ") + (a.position_ok ? diffuse::train::shape_position_name(a.position) : "?");
  s += std::string(" on ") + (a.background_ok ? pal[size_t(a.background)].name : "?");
  return s;
}

// The palette colour nearest to (r, g, b) (squared RGB distance), its distance in *dist2.
inline int nearest_colour(int r, int g, int b, int* dist2 = nullptr) {
  const auto& pal = diffuse::train::shape_colours();
  int best = 0, best_d = 1 << 30;
  for (size_t i = 0; i < pal.size(); ++i) {
    const int dr = r - pal[i].r, dg = g - pal[i].g, db = b - pal[i].b;
    const int d = dr * dr + dg * dg + db * db;
    if (d < best_d) best_d = d, best = int(i);
  }
  if (dist2) *dist2 = best_d;
  return best;
}

// The dataset's position rule on a centre (fractions of the side).
inline ShapePosition position_of(double cx, double cy) {
  const double dx = cx - 0.5, dy = cy - 0.5;
  if (std::fabs(dx) <= 0.1 && std::fabs(dy) <= 0.1) return ShapePosition::Centre;
  if (std::fabs(dx) >= std::fabs(dy)) return dx < 0 ? ShapePosition::Left : ShapePosition::Right;
  return dy < 0 ? ShapePosition::Top : ShapePosition::Bottom;
}

inline ShapeKind shape_of(double fill, double top_share, double diag) {
  if (top_share < kTriangleTopShare || fill < kTriangleFill) return ShapeKind::Triangle;
  return fill > kSquareFill || diag > kSquareDiag ? ShapeKind::Square : ShapeKind::Circle;
}

namespace detail {

// Per-channel median of the border ring.
inline void border_median(int w, int h, const uint8_t* rgb, int out[3]) {
  const int ring = std::max(1, std::min(w, h) / 32);
  std::vector<int> ch[3];
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      if (x >= ring && x < w - ring && y >= ring && y < h - ring) continue;
      for (int c = 0; c < 3; ++c) ch[c].push_back(rgb[(size_t(y) * w + x) * 3 + c]);
    }
  for (int c = 0; c < 3; ++c) {
    std::nth_element(ch[c].begin(), ch[c].begin() + ch[c].size() / 2, ch[c].end());
    out[c] = ch[c][ch[c].size() / 2];
  }
}

// The largest 8-connected region of `mask` (w × h); its pixel indices.
inline std::vector<int> largest_region(int w, int h, const std::vector<uint8_t>& mask) {
  std::vector<int> label(mask.size(), -1), best, current, stack;
  for (int start = 0; start < w * h; ++start) {
    if (!mask[size_t(start)] || label[size_t(start)] >= 0) continue;
    current.clear();
    stack.assign(1, start);
    label[size_t(start)] = start;
    while (!stack.empty()) {
      const int p = stack.back();
      stack.pop_back();
      current.push_back(p);
      const int px = p % w, py = p / w;
      for (int dy = -1; dy <= 1; ++dy)
        for (int dx = -1; dx <= 1; ++dx) {
          const int qx = px + dx, qy = py + dy;
          if (qx < 0 || qy < 0 || qx >= w || qy >= h) continue;
          const int q = qy * w + qx;
          if (mask[size_t(q)] && label[size_t(q)] < 0) label[size_t(q)] = start, stack.push_back(q);
        }
    }
    if (current.size() > best.size()) best = current;
  }
  return best;
}

// Fills position, shape and the measurements from the shape's region.
inline void measure_region(int w, int h, const std::vector<int>& region, ShapeAttributes& a) {
  int x0 = w, x1 = -1, y0 = h, y1 = -1, s0 = w + h, s1 = -1, d0 = w, d1 = -h;  // s = x + y, d = x - y
  double sx = 0, sy = 0;
  for (int p : region) {
    const int x = p % w, y = p / w;
    x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    s0 = std::min(s0, x + y), s1 = std::max(s1, x + y), d0 = std::min(d0, x - y), d1 = std::max(d1, x - y);
    sx += x + 0.5, sy += y + 0.5;
  }
  // Widths between the outermost pixel centres, plus one pixel.
  const double axis = (x1 - x0 + y1 - y0) / 2.0 + 1.0, diagonal = (s1 - s0 + d1 - d0) / 2.0 / std::sqrt(2.0) + 1.0;
  a.diag = diagonal / axis;
  const double n = double(region.size());
  a.pixels = int64_t(region.size());
  a.cx = sx / n / w;
  a.cy = sy / n / h;
  a.fill = n / (double(x1 - x0 + 1) * double(y1 - y0 + 1));
  const double mid = (y0 + y1 + 1) / 2.0;  // rows whose centre is above mid are the upper half
  double top = 0;
  for (int p : region) {
    const double yc = p / w + 0.5;
    top += yc < mid ? 1.0 : (yc == mid ? 0.5 : 0.0);
  }
  a.top_share = top / n;
  a.position = position_of(a.cx, a.cy);
  a.shape = shape_of(a.fill, a.top_share, a.diag);
  a.position_ok = a.shape_ok = true;
}

// Distance from p to the segment a–b (RGB).
inline double segment_distance(const double p[3], const double a[3], const double b[3]) {
  double ab2 = 0, t = 0;
  for (int c = 0; c < 3; ++c) ab2 += (b[c] - a[c]) * (b[c] - a[c]), t += (p[c] - a[c]) * (b[c] - a[c]);
  t = ab2 > 0 ? std::clamp(t / ab2, 0.0, 1.0) : 0.0;
  double d2 = 0;
  for (int c = 0; c < 3; ++c) d2 += (p[c] - a[c] - t * (b[c] - a[c])) * (p[c] - a[c] - t * (b[c] - a[c]));
  return std::sqrt(d2);
}

// The shape's colour from the per-colour pixel counts (see the top of the file): the most frequent,
// unless it is the blend of the background and a runner-up.
inline int pick_colour(const std::vector<int64_t>& counts, const int bg[3]) {
  const auto& pal = diffuse::train::shape_colours();
  std::vector<int> order(counts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
  std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return counts[size_t(x)] > counts[size_t(y)]; });
  const int best = order[0];
  auto rgb = [&](int i, double out[3]) { out[0] = pal[size_t(i)].r, out[1] = pal[size_t(i)].g, out[2] = pal[size_t(i)].b; };
  double top[3], back[3] = {double(bg[0]), double(bg[1]), double(bg[2])};
  rgb(best, top);
  for (size_t k = 1; k < order.size(); ++k) {
    if (double(counts[size_t(order[k])]) < kBlendMinShare * double(counts[size_t(best)])) break;
    double other[3];
    rgb(order[k], other);
    if (segment_distance(top, back, other) < kBlendRadius) return order[k];
  }
  return best;
}

inline std::vector<std::string> words(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : text) {
    if (std::isalpha(static_cast<unsigned char>(ch))) {
      cur += char(std::tolower(static_cast<unsigned char>(ch)));
    } else if (!cur.empty()) {
      out.push_back(cur);
      cur.clear();
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

inline int colour_word(const std::string& w) {
  const auto& pal = diffuse::train::shape_colours();
  for (size_t i = 0; i < pal.size(); ++i)
    if (w == pal[i].name) return int(i);
  return -1;
}

}  // namespace detail

// Reads an RGB image (width × height × 3 bytes, row-major).
inline ShapeAttributes classify_shape_image(int width, int height, const uint8_t* rgb) {
  ShapeAttributes a;
  if (width < 4 || height < 4) return a;
  int bg[3];
  detail::border_median(width, height, rgb, bg);
  a.background = nearest_colour(bg[0], bg[1], bg[2]);
  a.background_ok = true;
  const size_t n = size_t(width) * height;
  std::vector<int8_t> nearest(n, -1);
  std::vector<int64_t> counts(diffuse::train::shape_colours().size(), 0);
  for (size_t i = 0; i < n; ++i) {
    const int r = rgb[i * 3], g = rgb[i * 3 + 1], b = rgb[i * 3 + 2];
    const int dr = r - bg[0], dg = g - bg[1], db = b - bg[2];
    if (dr * dr + dg * dg + db * db < kBackgroundRadius * kBackgroundRadius) continue;
    int d2 = 0;
    const int c = nearest_colour(r, g, b, &d2);
    if (c == a.background || d2 > kUnnamedRadius * kUnnamedRadius) continue;
    nearest[i] = int8_t(c);
    ++counts[size_t(c)];
  }
  if (*std::max_element(counts.begin(), counts.end()) < std::max<int64_t>(4, int64_t(n) / 500)) return a;
  const int best = detail::pick_colour(counts, bg);
  a.colour = best;
  a.colour_ok = true;
  std::vector<uint8_t> mask(n);
  for (size_t i = 0; i < n; ++i) mask[i] = nearest[i] == best;
  detail::measure_region(width, height, detail::largest_region(width, height, mask), a);
  return a;
}

// Reads a single-shape caption or prompt: colour words (the palette's names), circle / square /
// triangle, left / right / top / bottom / centre / center / middle; the background is the colour
// word right before "background" or right after "background is"; the shape's colour is the last
// other colour word before the shape word.
inline ShapeAttributes parse_shape_prompt(const std::string& text) {
  ShapeAttributes a;
  const std::vector<std::string> w = detail::words(text);
  // Whether the colour word at i names the background.
  auto names_background = [&](size_t i) {
    return (i + 1 < w.size() && w[i + 1] == "background") || (i >= 2 && w[i - 2] == "background" && w[i - 1] == "is");
  };
  size_t shape_at = w.size();
  for (size_t i = 0; i < w.size(); ++i) {
    for (int k = 0; k < diffuse::train::kShapeKindCount; ++k)
      if (!a.shape_ok && w[i] == diffuse::train::shape_kind_name(ShapeKind(k)))
        a.shape = ShapeKind(k), a.shape_ok = true, shape_at = i;
    const int c = detail::colour_word(w[i]);
    if (c >= 0 && names_background(i) && !a.background_ok) a.background = c, a.background_ok = true;
    if (a.position_ok) continue;
    if (w[i] == "left") a.position = ShapePosition::Left, a.position_ok = true;
    else if (w[i] == "right") a.position = ShapePosition::Right, a.position_ok = true;
    else if (w[i] == "top") a.position = ShapePosition::Top, a.position_ok = true;
    else if (w[i] == "bottom") a.position = ShapePosition::Bottom, a.position_ok = true;
    else if (w[i] == "centre" || w[i] == "center" || w[i] == "middle")
      a.position = ShapePosition::Centre, a.position_ok = true;
  }
  for (size_t i = 0; i < shape_at && i < w.size(); ++i) {
    const int c = detail::colour_word(w[i]);
    if (c >= 0 && !names_background(i)) a.colour = c, a.colour_ok = true;
  }
  return a;
}

}  // namespace shapecls
