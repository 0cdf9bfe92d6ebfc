// The loss chart (train/loss_plot.h): the CSV it reads, the smoothing, where a known series lands
// in the picture (raw points, smoothed line, validation markers), tick labels, and series that are
// empty or hold NaN.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/image.h"
#include "train/loss_plot.h"

using namespace diffuse;
using namespace diffuse::train;
namespace fs = std::filesystem;

namespace {

bool is(const Image& im, int x, int y, const uint8_t (&c)[3]) {
  const uint8_t* p = &im.pixels[(size_t(y) * size_t(im.width) + size_t(x)) * 3];
  return p[0] == c[0] && p[1] == c[1] && p[2] == c[2];
}
// Whether any pixel within `r` of (x, y) has colour c.
bool near(const Image& im, int x, int y, const uint8_t (&c)[3], int r = 1) {
  for (int dy = -r; dy <= r; ++dy)
    for (int dx = -r; dx <= r; ++dx)
      if (x + dx >= 0 && y + dy >= 0 && x + dx < im.width && y + dy < im.height && is(im, x + dx, y + dy, c))
        return true;
  return false;
}
int count(const Image& im, int x0, int y0, int x1, int y1, const uint8_t (&c)[3]) {
  int n = 0;
  for (int y = y0; y <= y1; ++y)
    for (int x = x0; x <= x1; ++x) n += is(im, x, y, c);
  return n;
}

// Steps 1..100 with the loss alternating 1 (odd steps) and 2 (even steps); validation 1.5 at step
// 0 and 1.2 at step 100, as the trainer writes them.
std::string alternating_csv() {
  std::string csv = "step,loss,lr,val_loss\n0,,,1.5\n";
  for (int s = 1; s <= 100; ++s) csv += std::to_string(s) + "," + (s % 2 ? "1" : "2") + ",0.0001,\n";
  return csv + "100,,,1.2\n";
}

TEST(LossPlot, ParsesTheTrainersCsv) {
  const LossCurve c = parse_loss_csv(alternating_csv());
  ASSERT_EQ(c.step.size(), 100u);
  EXPECT_EQ(c.step.front(), 1);
  EXPECT_EQ(c.loss[0], 1);
  EXPECT_EQ(c.loss[1], 2);
  EXPECT_EQ(c.val_step, (std::vector<double>{0, 100}));
  EXPECT_EQ(c.val_loss, (std::vector<double>{1.5, 1.2}));
  // A mid-run validation value on a step row, CRLF, junk and NaN.
  const LossCurve d = parse_loss_csv("step,loss,lr,val_loss\r\n5,0.25,0.1,0.5\r\nbad line\n6,nan,0.1,\n7,x,,\n");
  EXPECT_EQ(d.step, (std::vector<double>{5, 6}));
  EXPECT_EQ(d.loss[0], 0.25);
  EXPECT_TRUE(std::isnan(d.loss[1]));
  EXPECT_EQ(d.val_step, (std::vector<double>{5}));
  EXPECT_EQ(d.val_loss, (std::vector<double>{0.5}));
}

TEST(LossPlot, SmoothingIsADebiasedMovingAverage) {
  // Below 21 values no smoothing.
  EXPECT_EQ(smooth_loss({3, 1, 2}), (std::vector<double>{3, 1, 2}));
  // A constant stays constant (the bias correction), a NaN is skipped.
  std::vector<double> flat(200, 0.7);
  flat[50] = NAN;
  const std::vector<double> s = smooth_loss(flat);
  EXPECT_TRUE(std::isnan(s[50]));
  for (size_t i = 0; i < s.size(); ++i)
    if (i != 50) {
      EXPECT_NEAR(s[i], 0.7, 1e-12) << i;
    }
  // 100 alternating values: β = 0.8, so after the start the average stays near 1.5 (±0.06).
  std::vector<double> alt;
  for (int i = 1; i <= 100; ++i) alt.push_back(i % 2 ? 1.0 : 2.0);
  const std::vector<double> a = smooth_loss(alt);
  EXPECT_EQ(a[0], 1.0);
  for (size_t i = 20; i < a.size(); ++i) EXPECT_NEAR(a[i], 1.5, 0.06) << i;
}

TEST(LossPlot, KnownSeriesLandsWhereItMaps) {
  const LossCurve c = parse_loss_csv(alternating_csv());
  const Image im = plot_loss(c);
  ASSERT_EQ(im.width, 640);
  ASSERT_EQ(im.height, 360);
  ASSERT_EQ(im.channels, 3);
  const PlotArea a = loss_plot_area(c, 640, 360);
  // Ranges: steps 0..100, losses 1..2 padded by 5%.
  EXPECT_EQ(a.x_min, 0);
  EXPECT_EQ(a.x_max, 100);
  EXPECT_NEAR(a.y_min, 0.95, 1e-12);
  EXPECT_NEAR(a.y_max, 2.05, 1e-12);
  EXPECT_EQ(a.x_px(0), a.left);
  EXPECT_EQ(a.x_px(100), a.right);
  EXPECT_EQ(a.y_px(2.05), a.top);
  EXPECT_EQ(a.y_px(0.95), a.bottom);

  // Raw points where the smoothed line is far away (steps 20..99).
  for (int s = 20; s < 100; ++s) {
    const double v = s % 2 ? 1.0 : 2.0;
    EXPECT_TRUE(is(im, a.x_px(s), a.y_px(v), PlotColors::raw)) << "step " << s;
    EXPECT_TRUE(is(im, a.x_px(s) + 1, a.y_px(v) + 1, PlotColors::raw)) << "step " << s;
  }
  // The smoothed line through each step's average.
  const std::vector<double> sm = smooth_loss(c.loss);
  for (int s = 20; s <= 100; s += 7)
    EXPECT_TRUE(is(im, a.x_px(s), a.y_px(sm[size_t(s - 1)]), PlotColors::smooth)) << "step " << s;
  // Nothing of the loss is drawn between the raw points and the line (y 1.75 and 1.25).
  for (int s = 30; s < 90; s += 5) {
    EXPECT_TRUE(is(im, a.x_px(s) + 3, a.y_px(1.75), PlotColors::background) ||
                is(im, a.x_px(s) + 3, a.y_px(1.75), PlotColors::grid))
        << "step " << s;
  }
  // Validation markers (5×5) at (0, 1.5) and (100, 1.2), and their line in between.
  for (int dy = -2; dy <= 2; ++dy)
    for (int dx = -2; dx <= 2; ++dx) {
      EXPECT_TRUE(is(im, a.x_px(0) + dx, a.y_px(1.5) + dy, PlotColors::val));
      EXPECT_TRUE(is(im, a.x_px(100) + dx, a.y_px(1.2) + dy, PlotColors::val));
    }
  EXPECT_TRUE(near(im, a.x_px(50), a.y_px(1.35), PlotColors::val));
  // Axes, tick labels left of the y axis and below the x axis, the legend above the plot.
  EXPECT_TRUE(is(im, a.left, a.top + 10, PlotColors::axis));
  EXPECT_TRUE(is(im, (a.left + a.right) / 2, a.bottom, PlotColors::axis));
  EXPECT_GT(count(im, 0, a.y_px(1.0) - 4, a.left - 2, a.y_px(1.0) + 4, PlotColors::text), 10);  // "1.0"
  EXPECT_GT(count(im, a.x_px(50) - 8, a.bottom + 4, a.x_px(50) + 8, a.bottom + 14, PlotColors::text), 10);  // "50"
  EXPECT_GT(count(im, a.left, 0, a.right, a.top - 1, PlotColors::text), 50);
  EXPECT_GT(count(im, a.left, 0, a.right, a.top - 1, PlotColors::raw), 10);
  // Corners of the picture stay background.
  EXPECT_TRUE(is(im, 0, 0, PlotColors::background));
  EXPECT_TRUE(is(im, 639, 359, PlotColors::background));
}

TEST(LossPlot, TickLabelsAreDrawnDigits) {
  // One validation value at 0 over steps 0..1: y ticks around 0 (v ± 0.1 range) include "0.00"
  // whose glyph '0' has a known first row 0x0E (.XXX.).
  LossCurve c;
  c.val_step = {0, 1};
  c.val_loss = {0.0, 0.0};
  const Image im = plot_loss(c);
  const PlotArea a = loss_plot_area(c, 640, 360);
  EXPECT_NEAR(a.y_min, -0.1, 1e-12);
  EXPECT_NEAR(a.y_max, 0.1, 1e-12);
  // The label "0.00" (4 glyphs of 5 px, advance 6: 23 px) ends 6 px left of the axis, so its
  // last '0' covers columns left − 11 .. left − 7; it is centred on the tick (rows −3..+3).
  const int y0 = a.y_px(0) - 3, x0 = a.left - 11;
  const bool row0[5] = {false, true, true, true, false};
  for (int k = 0; k < 5; ++k) EXPECT_EQ(is(im, x0 + k, y0, PlotColors::text), row0[k]) << "column " << k;
  const bool row6[5] = {false, true, true, true, false};
  for (int k = 0; k < 5; ++k) EXPECT_EQ(is(im, x0 + k, y0 + 6, PlotColors::text), row6[k]) << "column " << k;
}

TEST(LossPlot, EmptyAndNanSeriesDoNotBreakIt) {
  for (const std::string& csv : {std::string(""), std::string("step,loss,lr,val_loss\n"),
                                std::string("step,loss,lr,val_loss\n1,nan,0.1,\n2,inf,0.1,nan\n"),
                                std::string("step,loss,lr,val_loss\n0,,,0.9\n"),
                                std::string("step,loss,lr,val_loss\n1,0.5,0.1,\n2,nan,0.1,\n3,0.4,0.1,\n")}) {
    const LossCurve c = parse_loss_csv(csv);
    Image im;
    ASSERT_NO_THROW(im = plot_loss(c)) << csv;
    EXPECT_EQ(im.pixels.size(), size_t(640) * 360 * 3) << csv;
    const PlotArea a = loss_plot_area(c, 640, 360);
    EXPECT_TRUE(std::isfinite(a.y_min) && std::isfinite(a.y_max) && a.y_min < a.y_max) << csv;
    EXPECT_TRUE(a.x_min < a.x_max) << csv;
  }
  // NaN points are left out; the finite ones around them are drawn.
  const LossCurve c = parse_loss_csv("step,loss,lr,val_loss\n1,0.5,0.1,\n2,nan,0.1,\n3,0.4,0.1,\n");
  const Image im = plot_loss(c);
  const PlotArea a = loss_plot_area(c, 640, 360);
  EXPECT_TRUE(near(im, a.x_px(3), a.y_px(0.4), PlotColors::raw) || near(im, a.x_px(3), a.y_px(0.4), PlotColors::smooth));
  EXPECT_NEAR(a.y_min, 0.4 - 0.005, 1e-12);
  EXPECT_NEAR(a.y_max, 0.5 + 0.005, 1e-12);
  EXPECT_THROW(plot_loss(c, 100, 50), Error);
}

TEST(LossPlot, WritesAPng) {
  const std::string path =
      (fs::temp_directory_path() / ("diffuse_test_loss_plot_" + std::to_string(::getpid()) + ".png")).string();
  write_loss_plot(path, alternating_csv());
  const Image back = read_image(path);
  fs::remove(path);
  EXPECT_EQ(back.width, 640);
  EXPECT_EQ(back.height, 360);
  EXPECT_EQ(back.pixels, plot_loss(parse_loss_csv(alternating_csv())).pixels);
  // A folder that does not exist: the error names the path.
  try {
    write_loss_plot("/nonexistent_dir_for_test/x.png", alternating_csv());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent_dir_for_test/x.png"), std::string::npos) << e.what();
  }
}

}  // namespace
