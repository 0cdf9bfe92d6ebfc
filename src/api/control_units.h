// ControlNet units of a request (A1111's ControlNet extension units, diffusers' multi-ControlNet):
// what a request asks for, its checks, and the ControlNets, hints and PNG text a run gets.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/image.h"
#include "models/controlnet.h"
#include "models/t2i_adapter.h"
#include "pipeline/generate.h"

namespace diffuse::api {

struct ControlUnitRequest {
  std::string net;        // ControlNet or T2I-Adapter (told apart by their tensor names): file or diffusers folder
  Image image;            // the hint (any size: resized to the output size)
  double strength = 1.0;  // conditioning scale, [0, 10]
  // Guidance start/end: the unit is active while start <= step/steps <= end (sd-webui-controlnet).
  double start = 0.0, end = 1.0;
  bool guess_mode = false;  // diffusers' guess_mode (pipeline/control.h)
  bool canny = false;       // turn the hint into Canny edges first
  int canny_low = 100, canny_high = 200;
};

// Throws diffuse::Error naming the unit (`what`, e.g. "ControlNet unit 1 (PATH)") and the setting
// out of range; checks the ControlNet path exists (the image is checked by prepare_controls).
void check_control_unit(const ControlUnitRequest& u, const std::string& what);

// What a run gets: the loaded ControlNets (kept alive for the run), the hint images (canny applied)
// and GenerateParams::controls pointing at them, and each unit's PNG text in A1111's wording
// ("Module: canny, Model: NAME, Weight: 1[, Guidance Start: s, Guidance End: e][, Guess Mode: True]").
struct ControlSetup {
  std::vector<std::shared_ptr<ControlNet>> nets;
  std::vector<std::shared_ptr<T2IAdapter>> adapters;
  std::vector<Image> images;
  std::vector<GenerateParams::ControlUnitParams> params;
  std::vector<std::string> infotext;
};
// `load` returns the ControlNet at a path (the engine's cache), `load_adapter` a T2I-Adapter (for
// the files T2IAdapter::is_adapter_file recognises); `name` the name A1111 shows for it. Every
// ControlNet and adapter must fit `unet`. width/height: the output size (canny runs at that size).
ControlSetup prepare_controls(const std::vector<ControlUnitRequest>& units, int width, int height,
                              const UNetConfig& unet,
                              const std::function<std::shared_ptr<ControlNet>(const std::string&)>& load,
                              const std::function<std::shared_ptr<T2IAdapter>(const std::string&)>& load_adapter,
                              const std::function<std::string(const std::string&)>& name);

}  // namespace diffuse::api
