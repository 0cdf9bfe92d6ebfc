// `diffuse generate --taesd`: live previews decoded by a TAESD decoder (random weights, written here
// in madebyollin's layout) are full-size PNGs, readable while the sampler runs, and not the final
// image; --taesd's errors name the flag and the file; --help documents it.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "../common/taesd_files.h"
#include "cli_util.h"
#include "core/error.h"
#include "io/image.h"
#include "io/tensor_file.h"

using namespace clitest;
namespace fs = std::filesystem;

namespace {

const std::string kModel = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";

std::string taesd_file() {
  static const std::string p = [] {
    taesd_files::Named n;
    taesd_files::add_decoder(n, taesd_files::make_decoder(31), "", 1);
    const std::string path = temp_dir() + "/taesd_decoder.safetensors";
    diffuse::save_safetensors(path, n);
    return path;
  }();
  return p;
}

std::vector<std::string> args(const std::string& out, int steps) {
  return {"generate", "-m", kModel, "-p", "a red cube", "-W", "64", "-H", "64", "--steps", std::to_string(steps),
          "--sampler", "euler", "-s", "7", "-t", "1", "-o", out};
}

// The last "step k/N" line of a progress log: k (0 if none).
int last_step(const std::string& log) {
  const size_t at = log.rfind("step ");
  return at == std::string::npos ? 0 : std::atoi(log.c_str() + at + 5);
}

struct Seen {
  diffuse::Image image;
  int step = 0;  // the progress log's last step when it was read
};

}  // namespace

// The preview file is read while `generate` runs (the process alive, the output not written yet,
// the progress log short of the last step): a 64×64 RGB PNG, the output's size (the cheap preview
// is 8×8), which changes as sampling goes on and is not the final image.
TEST(GeneratePreview, TaesdPreviewIsReadableDuringSampling) {
  const std::string out = temp_dir() + "/taesd_out.png", preview = temp_dir() + "/taesd_preview.png",
                    log = temp_dir() + "/taesd_stderr.txt";
  fs::remove(out);
  fs::remove(preview);
  const int steps = 60;
  std::vector<std::string> a = args(out, steps);
  for (const char* s : {"--preview-every", "1", "--preview-file"}) a.push_back(s);
  a.push_back(preview);
  a.push_back("--taesd");
  a.push_back(taesd_file());

  const pid_t pid = spawn(a, temp_dir() + "/taesd_stdout.txt", log, 300);
  ASSERT_GT(pid, 0);
  std::vector<Seen> seen;
  struct timespec last_mtime {};
  int status = 0;
  const auto start = std::chrono::steady_clock::now();
  while (waitpid(pid, &status, WNOHANG) == 0) {
    struct stat st {};
    if (stat(preview.c_str(), &st) == 0 && !fs::exists(out) &&
        (st.st_mtim.tv_sec != last_mtime.tv_sec || st.st_mtim.tv_nsec != last_mtime.tv_nsec)) {
      last_mtime = st.st_mtim;
      const int step = last_step(slurp(log));
      try {
        Seen s{diffuse::read_image(preview), step};  // written atomically (temp file + rename)
        if (step < steps && !fs::exists(out)) seen.push_back(std::move(s));
      } catch (const diffuse::Error& e) {
        ADD_FAILURE() << "the preview could not be read during the run: " << e.what();
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const double run_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << slurp(log);
  std::printf("  %d steps in %.1f s; %zu distinct previews read during sampling, at steps", steps, run_s, seen.size());
  for (const Seen& s : seen) std::printf(" %d", s.step);
  std::printf("\n");
  ASSERT_GE(seen.size(), 2u) << "the preview was not caught twice while the sampler ran";

  const diffuse::Image final_image = diffuse::read_image(out);
  ASSERT_EQ(final_image.width, 64);
  ASSERT_EQ(final_image.height, 64);
  for (const Seen& s : seen) {
    EXPECT_EQ(s.image.width, 64);
    EXPECT_EQ(s.image.height, 64);
    EXPECT_EQ(s.image.channels, 3);
    EXPECT_EQ(s.image.pixels.size(), size_t(64 * 64 * 3));
    EXPECT_NE(s.image.pixels, final_image.pixels);
    const auto [lo, hi] = std::minmax_element(s.image.pixels.begin(), s.image.pixels.end());
    EXPECT_LT(*lo, *hi) << "a flat preview at step " << s.step;
  }
  // Sampling changes the latent, and so the preview.
  EXPECT_NE(seen.front().image.pixels, seen.back().image.pixels);
  // The last preview (the final latent) stays behind, still a TAESD decode (not the VAE's image).
  const diffuse::Image last = diffuse::read_image(preview);
  EXPECT_EQ(last.width, 64);
  EXPECT_NE(last.pixels, final_image.pixels);
}

TEST(GeneratePreview, TaesdErrorsNameTheFlagAndTheFile) {
  const std::string out = temp_dir() + "/taesd_err.png";
  // Without --preview-every there is nothing to decode.
  std::vector<std::string> a = args(out, 2);
  a.push_back("--taesd");
  a.push_back(taesd_file());
  Result r = run(a);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--taesd"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--preview-every"), std::string::npos) << r.err;
  // The checkpoint given as the TAESD: wrong architecture, named.
  a = args(out, 2);
  for (const std::string& s : {std::string("--preview-every"), std::string("1"), std::string("--taesd"), kModel})
    a.push_back(s);
  r = run(a);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--taesd: " + kModel + ": not a TAESD"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out));
  // A folder without the family's decoder.
  const std::string dir = temp_dir() + "/no_taesd_here";
  fs::create_directories(dir);
  a = args(out, 2);
  for (const std::string& s : {std::string("--preview-every"), std::string("1"), std::string("--taesd"), dir})
    a.push_back(s);
  r = run(a);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("taesd_decoder.safetensors"), std::string::npos) << r.err;
  // A folder with it: the SD 1.x model takes taesd_decoder.*.
  a = args(out, 2);
  for (const std::string& s : {std::string("--preview-every"), std::string("2"), std::string("--taesd"),
                               fs::path(taesd_file()).parent_path().string()})
    a.push_back(s);
  r = run(a);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(diffuse::read_image(temp_dir() + "/taesd_err.preview.png").width, 64);
}

TEST(GeneratePreview, HelpDocumentsTaesd) {
  Result r = run({"generate", "--help"});
  EXPECT_EQ(r.exit_code, 0);
  for (const char* flag : {"--taesd", "--preview-every", "--preview-file"})
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag << " missing from:\n" << r.out;
}
