// `diffuse generate --refiner`: the flags in --help, a tiny SDXL refiner (written by the test in the
// published ldm layout, tests/common/refiner_files.h) continuing the tiny SDXL base, A1111's
// "Refiner: NAME [hash], Refiner switch at: S" in the PNG read back by `diffuse info`, `diffuse
// info` calling the file an sdxl-refiner, and other models as --refiner refused naming the file.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "../common/refiner_files.h"
#include "cli_util.h"

namespace fs = std::filesystem;
using clitest::run;

namespace {

const std::string kFix = DIFFUSE_SHARED_DIR "/fixtures";
const std::string kBase = kFix + "/sdxl/model/tiny-sdxl.safetensors";
const std::string kSD1 = kFix + "/sd1/model/tiny-sd1.safetensors";

#define SKIP_UNLESS(path) \
  if (!fs::exists(path)) GTEST_SKIP() << "fixture " << (path) << " not found"

std::string refiner() {
  static std::string p = [] {
    const std::string out = clitest::temp_dir() + "/tiny-refiner.safetensors";
    refiner_files::write_refiner(kBase, out);
    return out;
  }();
  return p;
}

// The first 10 hex digits of the file's SHA-256, by coreutils' sha256sum.
std::string sha10(const std::string& path) {
  FILE* f = popen(("sha256sum '" + path + "'").c_str(), "r");
  char buf[65] = {0};
  const size_t n = f ? fread(buf, 1, 64, f) : 0;
  if (f) pclose(f);
  return n == 64 ? std::string(buf, 10) : "";
}

}  // namespace

TEST(CliRefiner, HelpDocumentsTheFlags) {
  clitest::Result r = run({"generate", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("--refiner "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--refiner-switch"), std::string::npos) << r.out;
}

TEST(CliRefiner, InfoSaysSdxlRefiner) {
  SKIP_UNLESS(kBase);
  clitest::Result r = run({"info", refiner()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("sdxl-refiner"), std::string::npos) << r.out;
  r = run({"info", kBase});
  EXPECT_EQ(r.out.find("sdxl-refiner"), std::string::npos) << r.out;
}

TEST(CliRefiner, GeneratesAndWritesA1111Parameters) {
  SKIP_UNLESS(kBase);
  const std::string out = clitest::temp_dir() + "/refined.png";
  clitest::Result r = run({"generate", "-m", kBase, "--refiner", refiner(), "--refiner-switch", "0.6", "-p",
                           "a red fox", "-n", "blurry", "-W", "64", "-H", "64", "--steps", "5", "-s", "7", "-o",
                           out, "--precision", "fp32"},
                          600);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string hash = sha10(refiner());
  ASSERT_EQ(hash.size(), 10u);
  clitest::Result info = run({"info", out});
  EXPECT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("Refiner: tiny-refiner [" + hash + "], Refiner switch at: 0.6"), std::string::npos)
      << info.out;
}

TEST(CliRefiner, OtherModelsAndBadSwitchAreRefused) {
  SKIP_UNLESS(kBase);
  SKIP_UNLESS(kSD1);
  const std::string out = clitest::temp_dir() + "/never.png";
  clitest::Result r = run({"generate", "-m", kBase, "--refiner", kSD1, "-p", "x", "-W", "64", "-H", "64", "--steps",
                           "2", "-o", out},
                          600);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find(kSD1), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("expects an SDXL refiner"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out));
  r = run({"generate", "-m", kBase, "--refiner", refiner(), "--refiner-switch", "1.5", "-p", "x", "-o", out});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--refiner-switch 1.5: must be in [0, 1]"), std::string::npos) << r.err;
  r = run({"generate", "-m", kBase, "--refiner", clitest::temp_dir() + "/missing.safetensors", "-p", "x", "-o", out});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--refiner"), std::string::npos) << r.err;
}
