#include <gtest/gtest.h>
TEST(Placeholder, ops) { GTEST_SKIP() << "being written"; }
