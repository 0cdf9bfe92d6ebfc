// The loss chart (see loss_plot.h).
#include "train/loss_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "core/error.h"

namespace diffuse::train {

namespace {

using Rgb = const uint8_t (&)[3];

// ---- a 5×7 pixel font: rows top to bottom, bit 4 = leftmost column ----

struct Glyph {
  char c;
  uint8_t rows[7];
};
constexpr Glyph kFont[] = {
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}}, {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}}, {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}}, {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}}, {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}}, {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C}}, {'-', {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00}},
    {'+', {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00}}, {'e', {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E}},
    {'l', {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}}, {'o', {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E}},
    {'s', {0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E}}, {'m', {0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11}},
    {'t', {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06}}, {'h', {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11}},
    {'d', {0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F}}, {'v', {0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04}},
    {'a', {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F}}, {'p', {0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10}},
    {'i', {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E}}, {'n', {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11}},
    {'r', {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10}},
};
constexpr int kGlyphW = 5, kGlyphH = 7, kAdvance = 6;

const Glyph* glyph(char c) {
  for (const Glyph& g : kFont)
    if (g.c == c) return &g;
  return nullptr;  // drawn as a blank
}

int text_width(const std::string& s) { return s.empty() ? 0 : int(s.size()) * kAdvance - 1; }

// ---- drawing on an RGB image ----

class Canvas {
 public:
  explicit Canvas(Image& im) : im_(im) {}
  void set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= im_.width || y >= im_.height) return;
    std::copy(c, c + 3, im_.pixels.begin() + (size_t(y) * size_t(im_.width) + size_t(x)) * 3);
  }
  void fill(int x0, int y0, int x1, int y1, Rgb c) {  // inclusive
    for (int y = y0; y <= y1; ++y)
      for (int x = x0; x <= x1; ++x) set(x, y, c);
  }
  // Bresenham from (x0, y0) to (x1, y1) with a brush of `size`×`size` pixels whose top-left
  // follows the line (so both end points are covered).
  void line(int x0, int y0, int x1, int y1, Rgb c, int size = 1) {
    const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    for (;;) {
      fill(x0, y0, x0 + size - 1, y0 + size - 1, c);
      if (x0 == x1 && y0 == y1) break;
      const int e2 = 2 * err;
      if (e2 >= dy) err += dy, x0 += sx;
      if (e2 <= dx) err += dx, y0 += sy;
    }
  }
  void text(int x, int y, const std::string& s, Rgb c) {  // top-left at (x, y)
    for (size_t i = 0; i < s.size(); ++i) {
      const Glyph* g = glyph(s[i]);
      if (!g) continue;
      for (int r = 0; r < kGlyphH; ++r)
        for (int k = 0; k < kGlyphW; ++k)
          if (g->rows[r] & (0x10 >> k)) set(x + int(i) * kAdvance + k, y + r, c);
    }
  }

 private:
  Image& im_;
};

// ---- axes ----

// A "nice" tick spacing (1, 2 or 5 × 10^k) giving about `target` intervals over `range`.
double nice_step(double range, int target) {
  const double raw = range / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double n = raw / mag;
  return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
}

std::vector<double> ticks(double lo, double hi, int target) {
  const double step = nice_step(hi - lo, target);
  std::vector<double> t;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9 && t.size() < 50; v += step)
    t.push_back(std::fabs(v) < step * 1e-9 ? 0.0 : v);
  return t;
}

// A tick label with as many decimals as the spacing needs.
std::string tick_label(double v, double step) {
  char b[32];
  const int decimals = std::max(0, int(-std::floor(std::log10(step) + 1e-9)));
  if (std::fabs(v) >= 1e6 || decimals > 6)
    std::snprintf(b, sizeof b, "%.3g", v);
  else
    std::snprintf(b, sizeof b, "%.*f", decimals, v);
  return b;
}

bool parse_number(const std::string& field, double& v) {
  if (field.empty()) return false;
  char* end = nullptr;
  v = std::strtod(field.c_str(), &end);
  return end == field.c_str() + field.size();
}

std::vector<std::string> split_csv_line(const std::string& line) {
  std::vector<std::string> f;
  std::stringstream ss(line);
  std::string cell;
  while (std::getline(ss, cell, ',')) f.push_back(cell);
  if (!line.empty() && line.back() == ',') f.emplace_back();
  return f;
}

void draw_grid_and_labels(Canvas& cv, const PlotArea& a) {
  const double xs = nice_step(a.x_max - a.x_min, 8), ys = nice_step(a.y_max - a.y_min, 6);
  for (double y : ticks(a.y_min, a.y_max, 6)) {
    const int py = a.y_px(y);
    cv.line(a.left, py, a.right, py, PlotColors::grid);
    const std::string s = tick_label(y, ys);
    cv.text(a.left - 6 - text_width(s), py - kGlyphH / 2, s, PlotColors::text);
  }
  for (double x : ticks(a.x_min, a.x_max, 8)) {
    const int px = a.x_px(x);
    cv.line(px, a.top, px, a.bottom, PlotColors::grid);
    const std::string s = tick_label(x, std::max(1.0, xs));
    cv.text(px - text_width(s) / 2, a.bottom + 6, s, PlotColors::text);
  }
  cv.line(a.left, a.top, a.left, a.bottom, PlotColors::axis);
  cv.line(a.left, a.bottom, a.right, a.bottom, PlotColors::axis);
  cv.text(a.right - text_width("step"), a.bottom + 18, "step", PlotColors::text);
}

void draw_legend(Canvas& cv, const PlotArea& a) {
  int x = a.left + 4;
  const int y = 9;
  auto entry = [&](const std::string& label, Rgb c, bool marker) {
    if (marker) cv.fill(x + 4, y + 1, x + 8, y + 5, c);
    cv.line(x, y + 3, x + 12, y + 3, c, 2);
    cv.text(x + 17, y, label, PlotColors::text);
    x += 17 + text_width(label) + 14;
  };
  entry("loss", PlotColors::raw, true);
  entry("smoothed", PlotColors::smooth, false);
  entry("val loss", PlotColors::val, true);
}

}  // namespace

LossCurve parse_loss_csv(const std::string& csv) {
  LossCurve c;
  std::stringstream ss(csv);
  std::string line;
  bool header = true;
  while (std::getline(ss, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (header) {
      header = false;
      continue;
    }
    const std::vector<std::string> f = split_csv_line(line);
    double step = 0, v = 0;
    if (f.empty() || !parse_number(f[0], step)) continue;
    if (f.size() > 1 && parse_number(f[1], v)) c.step.push_back(step), c.loss.push_back(v);
    if (f.size() > 3 && parse_number(f[3], v)) c.val_step.push_back(step), c.val_loss.push_back(v);
  }
  return c;
}

std::vector<double> smooth_loss(const std::vector<double>& loss) {
  const double beta = std::clamp(1.0 - 20.0 / double(std::max<size_t>(loss.size(), 1)), 0.0, 0.98);
  std::vector<double> out(loss.size(), NAN);
  double m = 0, debias = 1;
  for (size_t i = 0; i < loss.size(); ++i) {
    if (!std::isfinite(loss[i])) continue;
    m = beta * m + (1 - beta) * loss[i];
    debias *= beta;
    out[i] = m / (1 - debias);
  }
  return out;
}

int PlotArea::x_px(double x) const {
  return left + int(std::lround((x - x_min) / (x_max - x_min) * double(right - left)));
}
int PlotArea::y_px(double y) const {
  return bottom - int(std::lround((y - y_min) / (y_max - y_min) * double(bottom - top)));
}

PlotArea loss_plot_area(const LossCurve& c, int width, int height) {
  PlotArea a;
  a.left = 62, a.right = width - 16, a.top = 28, a.bottom = height - 32;
  double lo = INFINITY, hi = -INFINITY, last = 1, first = 0;
  auto take = [&](const std::vector<double>& steps, const std::vector<double>& values) {
    for (size_t i = 0; i < values.size(); ++i) {
      if (!std::isfinite(values[i]) || !std::isfinite(steps[i])) continue;
      lo = std::min(lo, values[i]), hi = std::max(hi, values[i]);
      last = std::max(last, steps[i]), first = std::min(first, steps[i]);
    }
  };
  take(c.step, c.loss);
  take(c.val_step, c.val_loss);
  a.x_min = first, a.x_max = last;
  if (!(lo <= hi)) {
    a.y_min = 0, a.y_max = 1;
  } else if (hi - lo < 1e-12 * std::max(1.0, std::fabs(hi))) {
    const double pad = std::max(std::fabs(hi) * 0.1, 0.1);
    a.y_min = lo - pad, a.y_max = hi + pad;
  } else {
    a.y_min = lo - 0.05 * (hi - lo), a.y_max = hi + 0.05 * (hi - lo);
  }
  return a;
}

Image plot_loss(const LossCurve& c, int width, int height) {
  DF_CHECK(width >= 160 && height >= 120, "plot_loss: ", width, "x", height, " is too small (at least 160x120)");
  Image im;
  im.width = width, im.height = height, im.channels = 3;
  im.pixels.assign(size_t(width) * size_t(height) * 3, 255);
  Canvas cv(im);
  const PlotArea a = loss_plot_area(c, width, height);
  draw_grid_and_labels(cv, a);

  // Markers of `size` pixels (top-left at the point for 2, centred for odd sizes) at the finite
  // points of a series, and a line through them `size` pixels wide.
  auto markers = [&](const std::vector<double>& xs, const std::vector<double>& ys, Rgb col, int size) {
    for (size_t i = 0; i < ys.size(); ++i) {
      if (!std::isfinite(ys[i]) || !std::isfinite(xs[i])) continue;
      const int x = a.x_px(xs[i]) - (size - 1) / 2, y = a.y_px(ys[i]) - (size - 1) / 2;
      cv.fill(x, y, x + size - 1, y + size - 1, col);
    }
  };
  auto polyline = [&](const std::vector<double>& xs, const std::vector<double>& ys, Rgb col, int size) {
    bool have = false;
    int px = 0, py = 0;
    for (size_t i = 0; i < ys.size(); ++i) {
      if (!std::isfinite(ys[i]) || !std::isfinite(xs[i])) continue;
      const int x = a.x_px(xs[i]), y = a.y_px(ys[i]);
      cv.line(have ? px : x, have ? py : y, x, y, col, size);
      have = true, px = x, py = y;
    }
  };
  markers(c.step, c.loss, PlotColors::raw, 2);
  polyline(c.step, smooth_loss(c.loss), PlotColors::smooth, 2);
  polyline(c.val_step, c.val_loss, PlotColors::val, 1);
  markers(c.val_step, c.val_loss, PlotColors::val, 5);
  draw_legend(cv, a);
  return im;
}

void write_loss_plot(const std::string& path, const std::string& csv_text) {
  write_png(path, plot_loss(parse_loss_csv(csv_text)));
}

}  // namespace diffuse::train
