// A1111's prompt editing and alternation (modules/prompt_parser.py, get_learned_conditioning_prompt_schedules):
//   [from:to:when]  "from" until step `when`, then "to"     [to:when]  nothing, then "to"
//   [from::when]    "from", then nothing                     [a|b|c]    a at step 1, b at 2, c at 3, a at 4, ...
// `when` with a '.' is a fraction of the steps ([a:b:0.25] of 20 steps: step 5), without one a step
// number; it is capped at the steps. Brackets that form none of these stay as they are (emphasis
// `(a:1.2)`, `[a]` is left to the weighting parser), and a prompt that does not parse (unbalanced)
// is used as written, as A1111 does.
//
// The schedule is a list of (end_step, text): the text is used while the model evaluation counter
// (0-based, one per UNet call, as A1111's CFG denoiser counts) is <= end_step. Its last entry ends at
// `steps`. A plain prompt gives one entry.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace diffuse {

struct PromptStep {
  int end_step = 0;
  std::string text;
};

std::vector<PromptStep> prompt_schedule(const std::string& prompt, int steps);

// The entry of `schedule` in use at model evaluation `i` (0-based): the first whose end_step >= i
// (the last one after the end).
size_t schedule_index(const std::vector<PromptStep>& schedule, int i);

}  // namespace diffuse
