// The SDXL refiner hand-over (A1111's "Refiner", diffusers' denoising_end / denoising_start): the
// base model denoises the first part of the schedule, then the refiner (models/family.h
// ModelSummary::refiner: OpenCLIP bigG only, 5 time ids) continues on the same latent with the same
// scheduler state (its timesteps, sigmas and multistep history), conditioned by its own encoder.
//
// Where: before the first model evaluation whose timestep t has completed_ratio = (999 − t̂)/1000
// >= switch_at, t̂ the training timestep nearest t in sigma (A1111's default rule, the same cut as
// diffusers' denoising_end: the base runs t̂ >= round(1000 − 1000·switch_at)). Once handed over
// the refiner runs to the end; switch_at 1 never hands over, 0 hands over at once.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "models/sd_model.h"
#include "pipeline/denoise.h"
#include "pipeline/generate.h"

namespace diffuse {

// A1111's sdxl_refiner_high/low_aesthetic_score and diffusers' aesthetic_score /
// negative_aesthetic_score defaults.
constexpr double kRefinerAestheticScore = 6.0;
constexpr double kRefinerNegativeAestheticScore = 2.5;

// The refiner's 5 time ids [1, 5]: (original height, width, crop top, crop left, aesthetic score),
// original size = the output size, crop (0, 0) (diffusers' _get_add_time_ids with
// requires_aesthetics_score; A1111's refiner conditioning).
Tensor refiner_time_ids(int width, int height, double aesthetic_score);

// The evaluation index (0-based, into `run`: the timesteps of the evaluations that run, in order)
// at which the refiner takes over by the rule above; run.size() when it never does. `train_sigmas`:
// the 1000 training sigmas (schedule.h train_sigmas); a fractional t's sigma is log-sigma
// interpolated (k-diffusion's t_to_sigma). Throws for switch_at outside [0, 1].
int refiner_switch_index(const std::vector<double>& run, double switch_at, const std::vector<double>& train_sigmas);

// The refiner's guidance for a prompt and negative (p's by default): its own encoding of them
// (A1111's SDXL zeros for an empty negative), time ids with the aesthetic scores (cond 6.0, uncond
// 2.5), p's cfg. Throws naming the file when `refiner` is not a refiner or its encoder is not loaded.
Guidance refiner_guidance(Ctx& ctx, const SDModel& refiner, const GenerateParams& p);
Guidance refiner_guidance(Ctx& ctx, const SDModel& refiner, const GenerateParams& p, const std::string& prompt,
                          const std::string& negative);

// The refiner's guidance at each model evaluation of the run with A1111's prompt editing and
// alternation (pipeline/prompt_schedule.h) applied to p.prompt and p.negative, as the base's: each
// distinct pair of texts encoded once. at(i): evaluation i (0-based; past the schedule: the last).
struct RefinerGuides {
  std::map<std::pair<size_t, size_t>, Guidance> by_texts;  // (prompt entry, negative entry) -> guidance
  std::vector<std::pair<size_t, size_t>> keys;              // per evaluation 0..steps
  const Guidance& at(int i) const;
};
RefinerGuides refiner_guides(Ctx& ctx, const SDModel& refiner, const GenerateParams& p);

// Checks that `refiner` can continue `base`'s latents: an SDXL refiner (throws naming its file and
// what was expected otherwise), a 4-channel base of the SDXL latent space, no ControlNet.
void check_refiner(const SDModel& base, const SDModel& refiner, const GenerateParams& p);

// denoise() with the hand-over: `base` with `gb` (or hooks.guidance) for the evaluations before
// `switch_index`, then `refiner` with gr(i) (i counted over the whole run) for the rest, one
// scheduler. hooks see the whole run: after_step's index and progress count over both parts; stop
// ends the run (the refiner part too). hooks.control, hooks.model_input and hooks.guidance apply to
// the base part only. `first` as denoise().
Tensor denoise_refined(Ctx& ctx, const UNet& base, const Guidance& gb, const UNet& refiner,
                       const std::function<const Guidance&(int)>& gr,
                       int switch_index, Scheduler& sched, Tensor x, const NoiseFn& draw_noise,
                       const DenoiseHooks& hooks = {}, int first = 0);

}  // namespace diffuse
