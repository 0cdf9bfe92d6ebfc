// libFuzzer: A1111 prompt editing and alternation (pipeline/prompt_schedule.h) parse every prompt a
// user or a client sends. Whatever the text, prompt_schedule must return (no crash, no hang, no
// unbounded growth) a schedule whose last entry ends at `steps`, with entries in step order, and
// schedule_index must stay inside it. The first byte picks the steps (1..150), the rest is the prompt.
#include <cstddef>
#include <cstdint>
#include <string>

#include "pipeline/prompt_schedule.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int steps = 1 + data[0] % 150;
  const std::string prompt(reinterpret_cast<const char*>(data + 1), size - 1);
  const std::vector<diffuse::PromptStep> s = diffuse::prompt_schedule(prompt, steps);
  if (s.empty() || s.back().end_step != steps) __builtin_trap();
  size_t total = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (i > 0 && s[i].end_step <= s[i - 1].end_step) __builtin_trap();
    total += s[i].text.size();
  }
  // Each entry is the prompt with brackets resolved: never longer than the prompt.
  if (total > size_t(steps) * (prompt.size() + 1)) __builtin_trap();
  for (int i = 0; i <= steps + 2; ++i)
    if (diffuse::schedule_index(s, i) >= s.size()) __builtin_trap();
  return 0;
}
