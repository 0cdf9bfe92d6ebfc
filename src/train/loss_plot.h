// The loss chart written beside a trained LoRA (OUT.loss.png, with every OUT.csv): the raw
// training loss per step as light points, a smoothed loss line, the validation loss as marked
// points joined by a line, light grid lines at "nice" tick values (1, 2 or 5 × 10^k) with tick
// labels in a built-in 5×7 pixel font, and a legend. Drawn with this file's own code.
//
// Smoothing: an exponential moving average with TensorBoard's bias correction,
// s_n = m_n / (1 − β^n), m_n = β·m_{n−1} + (1 − β)·x_n, with β = clamp(1 − 20 / N, 0, 0.98) for
// N loss values (an effective window of about N/20 steps, 50 at most; no smoothing below 21
// values). Non-finite values are left out of the chart, the smoothing and the axis ranges.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/image.h"

namespace diffuse::train {

// The series of a loss log (the trainer's CSV: step,loss,lr,val_loss).
struct LossCurve {
  std::vector<double> step, loss;          // rows with a loss value
  std::vector<double> val_step, val_loss;  // rows with a validation loss value
};

// Reads the CSV text: a header line, then rows "step,loss,lr,val_loss" where any of loss or
// val_loss may be empty. Values that do not parse as numbers ("nan" parses, as NaN) are treated
// as empty; lines without a step number are skipped.
LossCurve parse_loss_csv(const std::string& csv);

// The smoothed loss (see the top of this file), one value per input value; a non-finite input
// gives NaN there and leaves the average as it was.
std::vector<double> smooth_loss(const std::vector<double>& loss);

// Where the chart maps values: the plot rectangle in pixels (left..right, top..bottom inclusive)
// and the data ranges it spans. x: steps from min(0, first step) to the last step (at least 1
// wide); y: the finite loss and validation values, padded by 5% of their range on each side (a
// single value v spans v ± max(|v|·0.1, 0.1); none: 0..1).
struct PlotArea {
  int left = 0, top = 0, right = 0, bottom = 0;
  double x_min = 0, x_max = 1, y_min = 0, y_max = 1;
  int x_px(double x) const;  // rounded to the nearest pixel
  int y_px(double y) const;
};
PlotArea loss_plot_area(const LossCurve& c, int width, int height);

// The chart as an 8-bit RGB image of width × height (at least 160 × 120, else diffuse::Error).
Image plot_loss(const LossCurve& c, int width = 640, int height = 360);

// Colours of the chart's elements (RGB), for readers and tests.
struct PlotColors {
  static constexpr uint8_t background[3] = {255, 255, 255};
  static constexpr uint8_t grid[3] = {228, 228, 228};
  static constexpr uint8_t axis[3] = {70, 70, 70};
  static constexpr uint8_t text[3] = {40, 40, 40};
  static constexpr uint8_t raw[3] = {158, 192, 232};
  static constexpr uint8_t smooth[3] = {25, 80, 170};
  static constexpr uint8_t val[3] = {225, 110, 20};
};

// Parses `csv_text` and writes its chart (640 × 360) as a PNG at `path` through the safe writer
// (io/output_file.h); errors name the path.
void write_loss_plot(const std::string& path, const std::string& csv_text);

}  // namespace diffuse::train
