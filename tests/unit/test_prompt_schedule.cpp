// A1111's prompt editing and alternation: the schedules A1111's own doctests list for 10 steps
// (modules/prompt_parser.py), the fraction/step rule, the evaluation -> entry rule, hostile input.
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "pipeline/prompt_schedule.h"

using namespace diffuse;

namespace {

using Want = std::vector<std::pair<int, std::string>>;

void expect_schedule(const std::string& prompt, const Want& want, int steps = 10) {
  std::vector<PromptStep> got = prompt_schedule(prompt, steps);
  ASSERT_EQ(got.size(), want.size()) << prompt;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].end_step, want[i].first) << prompt << " entry " << i;
    EXPECT_EQ(got[i].text, want[i].second) << prompt << " entry " << i;
  }
}

}  // namespace

TEST(PromptSchedule, A1111Doctests) {
  expect_schedule("test", {{10, "test"}});
  expect_schedule("a [b:3]", {{3, "a "}, {10, "a b"}});
  expect_schedule("a [b: 3]", {{3, "a "}, {10, "a b"}});
  expect_schedule("a [[[b]]:2]", {{2, "a "}, {10, "a [[b]]"}});
  expect_schedule("[(a:2):3]", {{3, ""}, {10, "(a:2)"}});
  expect_schedule("a [b : c : 1] d", {{1, "a b  d"}, {10, "a  c  d"}});
  expect_schedule("a[b:[c:d:2]:1]e", {{1, "abe"}, {2, "ace"}, {10, "ade"}});
  expect_schedule("a [unbalanced", {{10, "a [unbalanced"}});
  expect_schedule("a [b:.5] c", {{5, "a  c"}, {10, "a b c"}});
  expect_schedule("a [{b|d{:.5] c", {{5, "a  c"}, {10, "a {b|d{ c"}});
  expect_schedule("((a][:b:c [d:3]", {{3, "((a][:b:c "}, {10, "((a][:b:c d"}});
  expect_schedule("[a|(b:1.1)]", {{1, "a"}, {2, "(b:1.1)"}, {3, "a"}, {4, "(b:1.1)"}, {5, "a"}, {6, "(b:1.1)"},
                                  {7, "a"}, {8, "(b:1.1)"}, {9, "a"}, {10, "(b:1.1)"}});
  expect_schedule("[fe|]male", {{1, "female"}, {2, "male"}, {3, "female"}, {4, "male"}, {5, "female"}, {6, "male"},
                                {7, "female"}, {8, "male"}, {9, "female"}, {10, "male"}});
  expect_schedule("[fe|||]male", {{1, "female"}, {2, "male"}, {3, "male"}, {4, "male"}, {5, "female"}, {6, "male"},
                                  {7, "male"}, {8, "male"}, {9, "female"}, {10, "male"}});
}

TEST(PromptSchedule, FractionsStepsAndRemoval) {
  // A '.' makes `when` a fraction of the steps (A1111's current scheduling): 0.25 of 20 is step 5;
  // 1.0 is every step; an integer is a step number, capped at the steps.
  expect_schedule("a [cat:dog:0.25]", {{5, "a cat"}, {20, "a dog"}}, 20);
  expect_schedule("a [cat:dog:1.0]", {{20, "a cat"}}, 20);
  expect_schedule("a [cat:dog:7]", {{7, "a cat"}, {20, "a dog"}}, 20);
  expect_schedule("a [cat:dog:50]", {{20, "a cat"}}, 20);
  expect_schedule("a [cat::3] b", {{3, "a cat b"}, {20, "a  b"}}, 20);
  expect_schedule("a [cat:dog:0]", {{20, "a dog"}}, 20);
  // Emphasis and escapes stay for the weighting parser.
  expect_schedule("(a:1.2) \\[x\\] [y:2]", {{2, "(a:1.2) \\[x\\] "}, {20, "(a:1.2) \\[x\\] y"}}, 20);
}

TEST(PromptSchedule, EvaluationIndexPicksTheEntry) {
  // A1111's CFG denoiser: entry k is used while the 0-based evaluation counter <= end_step.
  std::vector<PromptStep> s = prompt_schedule("[a:b:3]", 6);
  ASSERT_EQ(s.size(), 2u);
  for (int i = 0; i <= 3; ++i) EXPECT_EQ(schedule_index(s, i), 0u) << i;
  for (int i = 4; i < 12; ++i) EXPECT_EQ(schedule_index(s, i), 1u) << i;
}

TEST(PromptSchedule, HostileInputIsUsedAsWritten) {
  std::string deep(5000, '[');
  deep += "a:b:1";
  EXPECT_EQ(prompt_schedule(deep, 20).size(), 1u);
  std::string nested;
  for (int i = 0; i < 40; ++i) nested += "[x:";
  nested += "y";
  for (int i = 0; i < 40; ++i) nested += ":1]";
  std::vector<PromptStep> s = prompt_schedule(nested, 20);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].text, nested);
}
