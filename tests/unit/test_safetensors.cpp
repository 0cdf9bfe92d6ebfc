#include <gtest/gtest.h>
TEST(Placeholder, safetensors) { GTEST_SKIP() << "being written"; }
