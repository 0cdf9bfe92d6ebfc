// What a hostile but realistic user tries (the reliability issue's reproducers): output targets
// that are not plain files, refusals before any work, non-finite values, inputs that would block.
// Device nodes, FIFOs and symlinks are private ones in a temporary folder.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "cli_util.h"

using namespace clitest;
namespace fs = std::filesystem;

namespace {

std::string model() {
  return first_existing({std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1/model/tiny-sd1.safetensors",
                         std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors"});
}

class Reliability : public ::testing::Test {
 protected:
  void SetUp() override {
    m_ = model();
    if (m_.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = temp_dir() + "/" + info->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::vector<std::string> gen(std::vector<std::string> extra) const {
    std::vector<std::string> a = {"generate", "-m", m_, "-W", "64", "-H", "64", "--steps", "2", "-s", "1", "-p", "cat"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  // Exit 1 with one `diffuse: error:` line (the last) containing every needle; before_work: it is
  // all stderr holds (nothing loaded, no step ran).
  static void expect_refused(const Result& r, const std::vector<std::string>& needles, bool before_work = true) {
    EXPECT_EQ(r.exit_code, 1) << r.err;
    const size_t at = r.err.find("diffuse: error: ");
    ASSERT_NE(at, std::string::npos) << r.err;
    const std::string line = r.err.substr(at);
    EXPECT_EQ(std::count(line.begin(), line.end(), '\n'), 1) << r.err;
    for (const std::string& n : needles) EXPECT_NE(line.find(n), std::string::npos) << "'" << n << "' not in: " << line;
    if (before_work) EXPECT_EQ(at, 0u) << "work started before the refusal:\n" << r.err;
  }
  std::string m_, dir_;
};

bool is_png(const std::string& bytes) { return bytes.size() > 8 && bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0; }

// ---- 1, 2: output never destroys what it should not ----

TEST_F(Reliability, OutputToADeviceWritesThroughIt) {
  if (geteuid() != 0) GTEST_SKIP() << "mknod of a private /dev/null-like node needs root";
  const std::string n = path("null");
  ASSERT_EQ(mknod(n.c_str(), S_IFCHR | 0666, makedev(1, 3)), 0);
  Result r = run(gen({"-o", n, "-q"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  struct stat st {};
  ASSERT_EQ(stat(n.c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode)) << "the device node became something else";
}

TEST_F(Reliability, OutputThroughASymlinkWritesItsTarget) {
  const std::string target = path("target.png"), link = path("link.png");
  write_file(target, "mine");
  ASSERT_EQ(symlink(target.c_str(), link.c_str()), 0);
  Result r = run(gen({"-o", link, "-q"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::is_symlink(link));
  EXPECT_TRUE(is_png(slurp(target)));
}

TEST_F(Reliability, OutputToAFifoWritesIntoIt) {
  const std::string f = path("pipe");
  ASSERT_EQ(mkfifo(f.c_str(), 0644), 0);
  std::string got;
  std::thread reader([&] { got = slurp(f); });
  Result r = run(gen({"-o", f, "-q"}));
  reader.join();
  EXPECT_EQ(r.exit_code, 0) << r.err;
  struct stat st {};
  ASSERT_EQ(stat(f.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_TRUE(is_png(got));
}

TEST_F(Reliability, ReadOnlyTargetIsRefusedOrKeepsItsMode) {
  const std::string ro = path("ro.png");
  write_file(ro, "mine");
  ASSERT_EQ(chmod(ro.c_str(), 0444), 0);
  Result r = run(gen({"-o", ro, "-q"}));
  struct stat st {};
  ASSERT_EQ(stat(ro.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0444u);
  if (geteuid() == 0) {  // root may write it: it does, and the mode stays
    EXPECT_EQ(r.exit_code, 0) << r.err;
  } else {
    expect_refused(r, {"-o/--output", "not writable"});
    EXPECT_EQ(slurp(ro), "mine");
  }
}

TEST_F(Reliability, TemporaryFilesAreUniqueAndTheUsersAreUntouched) {
  const std::string out = path("a.png");
  write_file(out + ".tmp", "the user's");
  Result r = run(gen({"-o", out, "-q"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(slurp(out + ".tmp"), "the user's");
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) files += e.is_regular_file();
  EXPECT_EQ(files, 2);  // a.png and the user's a.png.tmp: no stray temporary
}

TEST_F(Reliability, DashWritesThePngToStandardOutput) {
  Result r = run(gen({"-o", "-", "-q"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(is_png(r.out));
  EXPECT_NE(r.err.find("wrote standard output"), std::string::npos) << r.err;
  expect_refused(run(gen({"-o", "-", "-b", "2"})), {"-o -", "-b 1"});
}

// ---- 3: no silent NaN ----

TEST_F(Reliability, PromptWeightsOutsideFloatAreRefused) {
  expect_refused(run(gen({"-p", "a (cat:1" + std::string(43, '0') + ")", "-o", path("x.png")})),
                 {"-p/--prompt", "32-bit float"});
  expect_refused(run(gen({"-p", std::string(1000, '(') + "cat", "-o", path("x.png")})), {"-p/--prompt", "32-bit float"});
  expect_refused(run(gen({"-n", "(x:1" + std::string(39, '0') + ")", "-o", path("x.png")})), {"-n/--negative"});
}

TEST_F(Reliability, NonFiniteLatentIsAnErrorNotABlackImage) {
  const std::string out = path("x.png");
  Result r = run(gen({"--cfg-scale", "3e38", "-o", out}));
  expect_refused(r, {"non-finite latent after step"}, false);
  EXPECT_FALSE(fs::exists(out));
  expect_refused(run(gen({"--lora", m_ + ":1e10", "-o", out})), {"--lora", "multiplier"});
}

// ---- 4, 5, 7: checked before the work, values as typed ----

TEST_F(Reliability, LimitsAndValuesAreCheckedBeforeTheWork) {
  const std::string out = path("x.png");
  expect_refused(run(gen({"-W", "16392", "-H", "8", "-o", out})), {"-W/--width", "16384"});
  expect_refused(run(gen({"-o", out, "--save-latent", out})), {"--save-latent", "-o"});
  expect_refused(run(gen({"--steps", "1001", "-o", out})), {"--steps", "1000"});
  expect_refused(run(gen({"--strength", "-0.5", "-o", out})), {"--strength", "[0, 1]"});
  expect_refused(run(gen({"--lora", m_ + ":abc", "-o", out})), {"--lora", "'abc' is not a number"});
  expect_refused(run(gen({"-p", "caf\xe9", "-o", out})), {"-p/--prompt", "UTF-8"});
  std::string breaks;
  for (int i = 0; i < 300; ++i) breaks += "a BREAK ";
  expect_refused(run(gen({"-p", breaks, "-o", out})), {"-p/--prompt", "BREAK"});
  expect_refused(run(gen({"-o", dir_})), {"-o/--output", "folder"});
  expect_refused(run(gen({"-o", path("x.gif")})), {"-o/--output", ".gif"});
  expect_refused(run(gen({"-W", "abc"})), {"--width"});
  // Memory that cannot be there (~3000 GiB of activations estimated) is refused up front.
  expect_refused(run(gen({"-W", "16384", "-H", "16384", "-b", "64", "-o", out}), 60),
                 {"needs about", "GiB", "activations"});
  EXPECT_FALSE(fs::exists(out));
}

// The estimate is the peak, not a lower bound: the tiny model at 16384² (batch 1) needs ~47 GiB of
// activations (models/memory_estimate.h; its estimates are checked against real passes in
// test_memory_estimate) and is refused before it loads, instead of running into the OOM killer.
TEST_F(Reliability, SizesBeyondTheMemoryEstimateAreRefusedBeforeLoading) {
  size_t avail_kb = 0;
  {
    std::ifstream mi("/proc/meminfo");
    std::string key;
    size_t v = 0;
    std::string unit;
    while (mi >> key >> v >> unit)
      if (key == "MemAvailable:" || key == "SwapFree:") avail_kb += v;
  }
  if (avail_kb == 0 || avail_kb > (size_t(40) << 20))
    GTEST_SKIP() << "this machine has " << avail_kb / (1 << 20) << " GiB available: the 47 GiB run could fit";
  const std::string out = path("big.png");
  expect_refused(run(gen({"-W", "16384", "-H", "16384", "-o", out}), 60), {"needs about", "GiB", "activations"});
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(Reliability, SeedsCoverTheWholeUint64Range) {
  const std::string out = path("max.png");
  std::vector<std::string> a = gen({"-o", out, "-q"});
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] == "-s") a[i + 1] = "18446744073709551615";
  Result r = run(a);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("seed 18446744073709551615"), std::string::npos) << r.out;
  Result i = run({"info", out});
  EXPECT_NE(i.out.find("Seed: 18446744073709551615,"), std::string::npos) << i.out;
  for (size_t k = 0; k < a.size(); ++k)
    if (a[k] == "-s") a[k + 1] = "18446744073709551616";
  expect_refused(run(a), {"-s/--seed", "18446744073709551616"});
}

// ---- 6: no hangs, no crashes on arguments ----

TEST_F(Reliability, FifosAndHugeThreadCountsAreRefused) {
  const std::string f = path("pipe");
  ASSERT_EQ(mkfifo(f.c_str(), 0644), 0);
  expect_refused(run(gen({"-i", f, "-o", path("x.png")}), 20), {"-i/--init", "FIFO"});
  expect_refused(run({"generate", "-m", f, "-p", "x", "-o", path("x.png")}, 20), {"-m/--model", "FIFO"});
  expect_refused(run({"info", f}, 20), {"FIFO"});
  expect_refused(run(gen({"-t", "65536", "-o", path("x.png")})), {"--threads"});
}

// ---- 8: info is safe on what it prints ----

TEST_F(Reliability, InfoEscapesControlCharacters) {
  const std::string out = path("esc.png");
  Result g = run(gen({"-p", "cat \x1b[31mred\x1b[0m\rover", "-o", out, "-q"}));
  ASSERT_EQ(g.exit_code, 0) << g.err;
  Result r = run({"info", out});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find('\x1b'), std::string::npos);
  EXPECT_EQ(r.out.find('\r'), std::string::npos);
  EXPECT_NE(r.out.find("\\x1b[31mred"), std::string::npos) << r.out;
}

}  // namespace

// The CLI starts itself again with short OpenMP spins unless the user chose a wait policy
// (core/threads.h): `bench` reports what its process ran with.
TEST(OmpWait, TheCliRunsWithShortSpinsUnlessTheUserChose) {
  auto omp_wait = [](const std::string& env) {
    const std::string cmd = "env -u GOMP_SPINCOUNT -u OMP_WAIT_POLICY " + env + " " + std::string(DIFFUSE_BIN) +
                            " bench ops --op group_norm --precision fp32 --repeats 1 -t 1 2>/dev/null";
    std::FILE* f = popen(cmd.c_str(), "r");
    std::string text;
    char buf[4096];
    size_t got;
    while (f && (got = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, got);
    EXPECT_EQ(f ? pclose(f) : -1, 0) << cmd;
    const size_t at = text.find("\"omp_wait\": \"");
    if (at == std::string::npos) return std::string("(no omp_wait in: ") + text + ")";
    const size_t from = at + 13;
    return text.substr(from, text.find('"', from) - from);
  };
  EXPECT_EQ(omp_wait(""), "GOMP_SPINCOUNT=1000");
  EXPECT_EQ(omp_wait("GOMP_SPINCOUNT=20000"), "GOMP_SPINCOUNT=20000");
  EXPECT_EQ(omp_wait("OMP_WAIT_POLICY=active"), "OMP_WAIT_POLICY=active");
}
