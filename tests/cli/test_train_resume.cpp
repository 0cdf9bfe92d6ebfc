// `diffuse train lora --resume`: a run killed with SIGKILL after a save and resumed from its state
// file ends with the same LoRA, bit for bit, as a run that was never interrupted (and the same
// loss log); a state from other settings is refused naming what differs.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "cli_util.h"
#include "io/image.h"
#include "io/tensor_file.h"

namespace fs = std::filesystem;
using namespace clitest;

namespace {

const std::string kModel = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";

std::string make_data(const std::string& root) {
  const std::string dir = root + "/data/5_sks";
  fs::create_directories(dir);
  for (int i = 0; i < 4; ++i) {
    diffuse::Image im;
    im.width = im.height = 64, im.channels = 3;
    im.pixels.resize(64 * 64 * 3);
    for (int y = 0; y < 64; ++y)
      for (int x = 0; x < 64; ++x) {
        const bool on = ((x / 8 + y / 8 + i) % 2) == 0;
        uint8_t* p = &im.pixels[size_t((y * 64 + x) * 3)];
        p[0] = on ? 230 : 20, p[1] = on ? 90 : 200, p[2] = uint8_t(40 + 10 * i);
      }
    diffuse::write_png(dir + "/img" + std::to_string(i) + ".png", im);
    write_file(dir + "/img" + std::to_string(i) + ".txt", "sks pattern");
  }
  return root + "/data";
}

std::vector<std::string> args(const std::string& data, const std::string& out) {
  return {"train", "lora", "-m", kModel, "--data", data, "-o", out, "--resolution", "64", "--steps", "60", "--lr",
          "1e-3", "--rank", "4", "--seed", "3", "--save-every", "10", "--shuffle-captions"};
}

// Every tensor of two safetensors files, compared bit for bit.
void expect_same_tensors(const std::string& a, const std::string& b) {
  const diffuse::TensorFile fa = diffuse::load_safetensors(a), fb = diffuse::load_safetensors(b);
  ASSERT_EQ(fa.size(), fb.size());
  for (const auto& e : fa.tensors) {
    const diffuse::Tensor* t = fb.find(e.name);
    ASSERT_TRUE(t) << e.name;
    ASSERT_EQ(t->shape(), e.tensor.shape()) << e.name;
    EXPECT_EQ(0, std::memcmp(t->data(), e.tensor.data(), t->bytes())) << e.name << " differs";
  }
}

}  // namespace

TEST(TrainResume, KilledAndResumedRunIsBitIdentical) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  const std::string root = temp_dir() + "/resume";
  fs::create_directories(root + "/a");
  fs::create_directories(root + "/b");
  const std::string data = make_data(root);
  const std::string a = root + "/a/s.safetensors", b = root + "/b/s.safetensors";
  Result ra = run(args(data, a), 300);
  ASSERT_EQ(ra.exit_code, 0) << ra.err;

  // Run B, killed with SIGKILL once its first state is written (step 10 of 60).
  const pid_t pid = fork();
  if (pid == 0) {
    const int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 2);
    std::vector<std::string> v = args(data, b);
    std::vector<char*> argv;
    std::string bin = DIFFUSE_BIN;
    argv.push_back(bin.data());
    for (std::string& s : v) argv.push_back(s.data());
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  const std::string state = b + ".state.safetensors";
  const auto t0 = std::chrono::steady_clock::now();
  while (!fs::exists(state) && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(120))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::this_thread::sleep_for(std::chrono::milliseconds(150));  // a few steps past the save
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(fs::exists(state));
  const bool killed = WIFSIGNALED(status);
  std::printf("run B %s; resuming from %s\n", killed ? "killed by SIGKILL" : "had already finished", state.c_str());

  std::vector<std::string> resume = args(data, b);
  resume.push_back("--resume");
  resume.push_back(state);
  Result rb = run(resume, 300);
  ASSERT_EQ(rb.exit_code, 0) << rb.err;
  if (killed) EXPECT_NE(rb.err.find("resuming at step"), std::string::npos) << rb.err;
  expect_same_tensors(a, b);
  EXPECT_EQ(slurp(a + ".csv"), slurp(b + ".csv"));

  // A state from other settings is refused, naming what differs.
  std::vector<std::string> other = args(data, root + "/b/t.safetensors");
  other[other.size() - 4] = "4";  // --seed 4
  other.push_back("--resume");
  other.push_back(state);
  Result rc = run(other, 120);
  EXPECT_EQ(rc.exit_code, 1);
  EXPECT_NE(rc.err.find("seed"), std::string::npos) << rc.err;
  EXPECT_FALSE(fs::exists(root + "/b/t.safetensors"));
}
