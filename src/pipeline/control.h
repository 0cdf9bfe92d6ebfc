// Several ControlNets at once (A1111's ControlNet units, diffusers' MultiControlNetModel): each
// unit has its hint, strength, guidance start/end and guess mode; the residuals of the units
// active at a step are summed.
#pragma once
#include <functional>
#include <vector>

#include "models/controlnet.h"
#include "models/t2i_adapter.h"
#include "pipeline/denoise.h"

namespace diffuse {

// A unit runs a ControlNet (residuals for the skips and mid block) or a T2I-Adapter (features
// added inside the down path, UNet::forward's intrablock; computed once, they do not depend on
// the step).
struct ControlUnit {
  const ControlNet* net = nullptr;  // must outlive the hook (or null with `adapter`)
  Tensor hint;                      // [1 or B, H, W, 3] in [0, 1] (prepare_hint)
  float strength = 1.0f;
  // The share of the sampling steps the unit is active for (sd-webui-controlnet's guidance start
  // and end): active at evaluation `step` of `steps` when start <= step/steps <= end.
  double start = 0.0, end = 1.0;
  // diffusers' guess_mode: with classifier-free guidance only the conditional half gets control
  // (the unconditional half's residuals are zero), and the residuals are scaled from 0.1 at the
  // first skip to 1 at the mid block (ControlNet::guess_mode_scale).
  bool guess_mode = false;  // ControlNets only
  const T2IAdapter* adapter = nullptr;  // instead of net; must outlive the hook
};

// Whether a unit with guidance start/end is active at evaluation `step` (0-based) of `steps`.
bool control_active(double start, double end, int step, int steps);

// A control hook over several units (each checked as control_hook checks its net and hint); the
// residuals of the units active at a step are summed. No active unit: an empty ControlResiduals
// (the UNet runs without control). Throws diffuse::Error on an empty list or bad start/end.
std::function<ControlResiduals(Ctx&, const ControlInputs&)> control_hook(std::vector<ControlUnit> units);

// The units of a generation: GenerateParams::control (if set) then GenerateParams::controls, each
// hint prepared at the output size (prepare_hint).
struct GenerateParams;
std::function<ControlResiduals(Ctx&, const ControlInputs&)> control_hook(const GenerateParams& p);

}  // namespace diffuse
