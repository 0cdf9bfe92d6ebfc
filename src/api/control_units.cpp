#include "api/control_units.h"

#include <cmath>
#include <cstdio>

#include "core/error.h"
#include "io/output_file.h"
#include "models/canny.h"

namespace diffuse::api {

namespace {

std::string num(double v) {  // 0.6 -> "0.6", 1 -> "1"
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

void check_control_unit(const ControlUnitRequest& u, const std::string& what) {
  DF_CHECK(!u.net.empty(), what, ": no ControlNet file given");
  check_input_file(u.net, what, true);
  DF_CHECK(std::isfinite(u.strength) && u.strength >= 0 && u.strength <= 10, what, ": strength ", u.strength,
           " must be in [0, 10]");
  DF_CHECK(std::isfinite(u.start) && std::isfinite(u.end) && u.start >= 0 && u.start <= u.end && u.end <= 1, what,
           ": guidance start ", u.start, " / end ", u.end, ": need 0 <= start <= end <= 1");
  DF_CHECK(u.canny_low >= 0 && u.canny_low <= u.canny_high && u.canny_high <= 1020, what, ": Canny thresholds ",
           u.canny_low, " / ", u.canny_high, ": need 0 <= low <= high <= 1020");
}

ControlSetup prepare_controls(const std::vector<ControlUnitRequest>& units, int width, int height,
                              const UNetConfig& unet,
                              const std::function<std::shared_ptr<ControlNet>(const std::string&)>& load,
                              const std::function<std::shared_ptr<T2IAdapter>(const std::string&)>& load_adapter,
                              const std::function<std::string(const std::string&)>& name) {
  ControlSetup s;
  s.images.reserve(units.size());  // params point into it
  for (size_t i = 0; i < units.size(); ++i) {
    const ControlUnitRequest& u = units[i];
    DF_CHECK(!u.image.pixels.empty(), "ControlNet unit ", i, " (", u.net, "): no control image");
    std::shared_ptr<ControlNet> net;
    std::shared_ptr<T2IAdapter> adapter;
    if (T2IAdapter::is_adapter_file(u.net)) {
      adapter = load_adapter(u.net);
      DF_CHECK(!u.guess_mode, u.net, ": guess mode applies to ControlNets, not T2I-Adapters");
      try {
        adapter->check_compatible(unet);
      } catch (const Error& e) {
        fail(u.net, ": ", e.what());
      }
    } else {
      net = load(u.net);
      net->check_compatible(unet);
    }
    Image im = to_rgb(u.image);
    if (u.canny) {
      // As the ControlNet canny annotator: resize to the output size first, then detect edges.
      CannyOptions co;
      co.low = float(u.canny_low);
      co.high = float(u.canny_high);
      im = canny(resize_lanczos(im, width, height), co);
    }
    s.images.push_back(std::move(im));
    s.nets.push_back(net);
    s.adapters.push_back(adapter);
    s.params.push_back({net.get(), &s.images.back(), float(u.strength), u.start, u.end, u.guess_mode, adapter.get()});
    std::string text = "Module: " + std::string(u.canny ? "canny" : "none") + ", Model: " + name(u.net) +
                       ", Weight: " + num(u.strength);
    if (u.canny) text += ", Threshold A: " + std::to_string(u.canny_low) + ", Threshold B: " + std::to_string(u.canny_high);
    if (u.start != 0.0 || u.end != 1.0) text += ", Guidance Start: " + num(u.start) + ", Guidance End: " + num(u.end);
    if (u.guess_mode) text += ", Guess Mode: True";
    s.infotext.push_back(std::move(text));
  }
  return s;
}

}  // namespace diffuse::api
