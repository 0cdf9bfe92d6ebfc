#include <gtest/gtest.h>
TEST(Placeholder, ckpt) { GTEST_SKIP() << "being written"; }
