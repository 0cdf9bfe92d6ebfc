// Safe output writing (io/output_file.h) and the in-memory/JPEG image encoders (io/image.h):
// permissions, symlinks, devices and FIFOs written in place, no temporary files left behind.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "io/image.h"
#include "io/output_file.h"
#include "io/tensor_file.h"

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

namespace {

class OutputFile : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("diffuse_test_output_file_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);  // after read-only tests
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Names in the test folder (or a subfolder), sorted: catches stray temporary files.
  std::set<std::string> listing(const std::string& sub = "") const {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(sub.empty() ? dir_ : dir_ / sub))
      names.insert(e.path().filename().string());
    return names;
  }

  fs::path dir_;
};

std::string read_text(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_text(const std::string& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

mode_t mode_of(const std::string& p) {
  struct stat st {};
  EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
  return st.st_mode & 07777;
}

mode_t type_of(const std::string& p) {  // lstat: the entry itself, not what a link points to
  struct stat st {};
  EXPECT_EQ(::lstat(p.c_str(), &st), 0) << p;
  return st.st_mode & S_IFMT;
}

mode_t read_umask() {
  mode_t m = ::umask(022);
  ::umask(m);
  return m;
}

void write_str(const std::string& p, const std::string& s) { diffuse::write_file_safely(p, s.data(), s.size()); }

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const diffuse::Error& e) {
    return e.what();
  }
  return "<no error>";
}

// Expects a diffuse::Error that starts with `prefix` and contains `keyword`.
void expect_error(const std::function<void()>& fn, const std::string& prefix, const std::string& keyword) {
  std::string e = error_of(fn);
  EXPECT_EQ(e.rfind(prefix, 0), 0u) << "does not start with '" << prefix << "': " << e;
  EXPECT_NE(e.find(keyword), std::string::npos) << "missing '" << keyword << "' in: " << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << "not one line: " << e;
}

// Reads everything from a FIFO on a thread (opening it for reading unblocks the writer's open).
struct FifoReader {
  std::string data;
  int open_errno = 0;
  std::thread thread;
  explicit FifoReader(const std::string& p) {
    thread = std::thread([this, p] {
      int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        open_errno = errno;
        return;
      }
      char buf[4096];
      for (;;) {
        ssize_t n = ::read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        data.append(buf, size_t(n));
      }
      ::close(fd);
    });
  }
  ~FifoReader() {
    if (thread.joinable()) thread.join();
  }
  std::string wait() {
    thread.join();
    return data;
  }
};

std::string pattern(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = char((i * 131 + i / 7) & 0xFF);
  return s;
}

}  // namespace

// ===== write_file_safely ======================================================================

TEST_F(OutputFile, NewFileGetsDefaultModeFromUmask) {
  std::string p = path("new.bin");
  write_str(p, "hello");
  EXPECT_EQ(read_text(p), "hello");
  EXPECT_EQ(mode_of(p), 0666 & ~read_umask());
  EXPECT_EQ(listing(), (std::set<std::string>{"new.bin"}));

  // Another umask: the new file follows it (mkstemp's 0600 must not leak through).
  mode_t old = ::umask(027);
  std::string q = path("new027.bin");
  write_str(q, "x");
  ::umask(old);
  EXPECT_EQ(mode_of(q), mode_t(0640));
}

TEST_F(OutputFile, ExistingFileKeepsItsMode) {
  std::string p = path("keep.bin");
  write_text(p, "old contents that are longer");
  ASSERT_EQ(::chmod(p.c_str(), 0640), 0);
  write_str(p, "new");
  EXPECT_EQ(read_text(p), "new");
  EXPECT_EQ(mode_of(p), mode_t(0640));

  ASSERT_EQ(::chmod(p.c_str(), 0604), 0);
  write_str(p, "");  // empty content is a valid file
  EXPECT_EQ(read_text(p), "");
  EXPECT_EQ(mode_of(p), mode_t(0604));
  EXPECT_EQ(type_of(p), mode_t(S_IFREG));
  EXPECT_EQ(listing(), (std::set<std::string>{"keep.bin"}));
}

// A SIGTERM (or Ctrl-C) while the temporary file is being written removes it before the process
// dies: here the writer itself raises the signal, in a child that installed the handlers.
TEST_F(OutputFile, SignalWhileWritingLeavesNoTemporaryFile) {
  const std::string target = path("sig.png");
  for (int sig : {SIGTERM, SIGINT}) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      diffuse::install_output_cleanup();
      diffuse::write_file_safely(target, [&](FILE* f) {
        std::fputs("partial", f);
        std::fflush(f);
        ::raise(sig);
      });
      _exit(0);  // not reached
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the child was not killed by signal " << sig;
    EXPECT_EQ(WTERMSIG(status), sig);
    std::vector<std::string> left;
    for (const auto& e : fs::directory_iterator(dir_)) left.push_back(e.path().filename().string());
    EXPECT_TRUE(left.empty()) << "left behind: " << left.front();
  }
}

TEST_F(OutputFile, UsersTmpFileIsUntouched) {
  std::string p = path("out.png");
  write_text(p + ".tmp", "mine, not yours");
  write_str(p, "image");
  EXPECT_EQ(read_text(p), "image");
  EXPECT_EQ(read_text(p + ".tmp"), "mine, not yours");
  EXPECT_EQ(listing(), (std::set<std::string>{"out.png", "out.png.tmp"}));
}

TEST_F(OutputFile, SymlinkStaysAndItsTargetIsWritten) {
  fs::create_directories(dir_ / "sub");
  std::string real = path("sub/real.bin");
  write_text(real, "old");
  ASSERT_EQ(::chmod(real.c_str(), 0600), 0);
  std::string link = path("link.bin");
  ASSERT_EQ(::symlink("sub/real.bin", link.c_str()), 0);  // relative link
  write_str(link, "through the link");
  EXPECT_EQ(type_of(link), mode_t(S_IFLNK));
  EXPECT_EQ(fs::read_symlink(link).string(), "sub/real.bin");
  EXPECT_EQ(type_of(real), mode_t(S_IFREG));
  EXPECT_EQ(read_text(real), "through the link");
  EXPECT_EQ(mode_of(real), mode_t(0600));
  EXPECT_EQ(listing(), (std::set<std::string>{"link.bin", "sub"}));
  EXPECT_EQ(listing("sub"), (std::set<std::string>{"real.bin"}));

  // A chain of links: still only the final file changes.
  std::string link2 = path("link2.bin");
  ASSERT_EQ(::symlink(link.c_str(), link2.c_str()), 0);  // absolute link to a link
  write_str(link2, "chain");
  EXPECT_EQ(type_of(link2), mode_t(S_IFLNK));
  EXPECT_EQ(type_of(link), mode_t(S_IFLNK));
  EXPECT_EQ(read_text(real), "chain");
}

TEST_F(OutputFile, DanglingSymlinkCreatesItsTarget) {
  fs::create_directories(dir_ / "sub");
  std::string link = path("dangling.bin");
  ASSERT_EQ(::symlink("sub/created.bin", link.c_str()), 0);
  write_str(link, "created");
  EXPECT_EQ(type_of(link), mode_t(S_IFLNK));
  EXPECT_EQ(read_text(path("sub/created.bin")), "created");
  EXPECT_EQ(mode_of(path("sub/created.bin")), 0666 & ~read_umask());
  EXPECT_EQ(listing("sub"), (std::set<std::string>{"created.bin"}));
}

TEST_F(OutputFile, FifoIsWrittenInPlace) {
  std::string p = path("pipe");
  ASSERT_EQ(::mkfifo(p.c_str(), 0600), 0) << std::strerror(errno);
  EXPECT_TRUE(diffuse::is_special_output(p));
  const std::string payload = pattern(300000);  // several pipe buffers: the reader must drain it
  {
    FifoReader reader(p);
    write_str(p, payload);
    std::string got = reader.wait();
    EXPECT_EQ(reader.open_errno, 0) << std::strerror(reader.open_errno);
    EXPECT_TRUE(got == payload) << "read " << got.size() << " of " << payload.size() << " bytes";
  }
  EXPECT_EQ(type_of(p), mode_t(S_IFIFO));

  // The streaming form, through a symlink to the FIFO.
  std::string link = path("pipe.link");
  ASSERT_EQ(::symlink("pipe", link.c_str()), 0);
  {
    FifoReader reader(p);
    diffuse::write_file_safely(link, [](FILE* f) {
      std::fputs("one ", f);
      std::fputs("two", f);
    });
    EXPECT_EQ(reader.wait(), "one two");
  }
  EXPECT_EQ(type_of(p), mode_t(S_IFIFO));
  EXPECT_EQ(type_of(link), mode_t(S_IFLNK));
  EXPECT_EQ(listing(), (std::set<std::string>{"pipe", "pipe.link"}));
}

TEST_F(OutputFile, DevNullStaysACharacterDevice) {
  EXPECT_TRUE(diffuse::is_special_output("/dev/null"));
  write_str("/dev/null", "discarded");
  EXPECT_EQ(type_of("/dev/null"), mode_t(S_IFCHR));
  // Through a symlink in our folder, as a user pointing an output at /dev/null would.
  std::string link = path("null.link");
  ASSERT_EQ(::symlink("/dev/null", link.c_str()), 0);
  write_str(link, "discarded");
  EXPECT_EQ(type_of(link), mode_t(S_IFLNK));
  EXPECT_EQ(type_of("/dev/null"), mode_t(S_IFCHR));
}

TEST_F(OutputFile, ProcFdLinkToAPipeIsWrittenInPlace) {
  // What /dev/stdout is when stdout is a pipe: /proc/self/fd/N -> "pipe:[inode]", a name that
  // resolves to no file, yet opening the link reaches the pipe.
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  std::string p = "/proc/self/fd/" + std::to_string(fds[1]);
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    GTEST_SKIP() << "no /proc/self/fd here";
  }
  EXPECT_TRUE(diffuse::is_special_output(p));
  EXPECT_NO_THROW(diffuse::check_output_writable(p, "output"));
  write_str(p, "through the pipe");
  ::close(fds[1]);
  std::string got;
  char buf[256];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) got.append(buf, size_t(n));
  ::close(fds[0]);
  EXPECT_EQ(got, "through the pipe");
}

TEST_F(OutputFile, OwnCharacterDeviceStaysACharacterDevice) {
  if (::geteuid() != 0) GTEST_SKIP() << "creating a device node (mknod) needs root";
  std::string p = path("null");
  if (::mknod(p.c_str(), S_IFCHR | 0666, makedev(1, 3)) != 0)
    GTEST_SKIP() << "mknod of a 1:3 character device failed here: " << std::strerror(errno);
  EXPECT_TRUE(diffuse::is_special_output(p));
  write_str(p, "discarded");
  EXPECT_EQ(type_of(p), mode_t(S_IFCHR));
  struct stat st {};
  ASSERT_EQ(::stat(p.c_str(), &st), 0);
  EXPECT_EQ(major(st.st_rdev), 1u);
  EXPECT_EQ(minor(st.st_rdev), 3u);
  EXPECT_EQ(listing(), (std::set<std::string>{"null"}));
}

TEST_F(OutputFile, WriteErrorOnADeviceIsReported) {
  struct stat st {};
  if (::stat("/dev/full", &st) != 0 || !S_ISCHR(st.st_mode)) GTEST_SKIP() << "no /dev/full here";
  std::string link = path("full.link");
  ASSERT_EQ(::symlink("/dev/full", link.c_str()), 0);
  expect_error([&] { write_str(link, pattern(100000)); }, link, "cannot write: No space left on device");
  EXPECT_EQ(type_of(link), mode_t(S_IFLNK));
  EXPECT_EQ(listing(), (std::set<std::string>{"full.link"}));
}

TEST_F(OutputFile, RegularFileIsNotSpecial) {
  std::string p = path("f");
  write_text(p, "x");
  EXPECT_FALSE(diffuse::is_special_output(p));
  EXPECT_FALSE(diffuse::is_special_output(path("missing")));
  EXPECT_FALSE(diffuse::is_special_output(""));
  EXPECT_TRUE(diffuse::is_special_output(dir_.string()));  // a folder is not a regular file
}

TEST_F(OutputFile, FailedWritesLeaveNoTemporaryFiles) {
  std::string p = path("kept.bin");
  write_str(p, "original");

  // The writer throws halfway: its exception comes through, the old file is intact.
  EXPECT_THROW(diffuse::write_file_safely(p,
                                          [](FILE* f) {
                                            std::fputs("partial", f);
                                            throw std::runtime_error("generation failed");
                                          }),
               std::runtime_error);
  EXPECT_EQ(read_text(p), "original");
  EXPECT_EQ(listing(), (std::set<std::string>{"kept.bin"}));

  // Missing folder.
  std::string nodir = path("no/such/x.bin");
  expect_error([&] { write_str(nodir, "x"); }, nodir, "cannot write");
  expect_error([&] { write_str(nodir, "x"); }, nodir, "No such file or directory");

  // A folder as the target.
  expect_error([&] { write_str(dir_.string(), "x"); }, dir_.string(), "cannot write");
  EXPECT_EQ(listing(), (std::set<std::string>{"kept.bin"}));

  expect_error([&] { write_str("", "x"); }, "cannot write", "empty");
}

TEST_F(OutputFile, ReadOnlyFolderFailsCleanly) {
  if (::geteuid() == 0) GTEST_SKIP() << "root writes into read-only folders; nothing fails";
  fs::create_directories(dir_ / "ro");
  std::string existing = path("ro/existing.bin");
  write_text(existing, "old");
  ASSERT_EQ(::chmod((dir_ / "ro").c_str(), 0555), 0);
  std::string p = path("ro/new.bin");
  expect_error([&] { write_str(p, "x"); }, p, "cannot write");
  expect_error([&] { write_str(p, "x"); }, p, "Permission denied");
  expect_error([&] { write_str(existing, "new"); }, existing, "cannot write");
  EXPECT_EQ(read_text(existing), "old");
  EXPECT_EQ(listing("ro"), (std::set<std::string>{"existing.bin"}));
  ASSERT_EQ(::chmod((dir_ / "ro").c_str(), 0755), 0);
}

TEST_F(OutputFile, LongNameStillGetsATemporaryFile) {
  std::string name(250, 'n');  // ".<name>.XXXXXX" would pass NAME_MAX: the stem is shortened
  std::string p = path(name);
  write_str(p, "long");
  EXPECT_EQ(read_text(p), "long");
  EXPECT_EQ(listing(), (std::set<std::string>{name}));
}

TEST_F(OutputFile, RelativePathInCurrentFolder) {
  std::error_code ec;
  fs::path old = fs::current_path();
  fs::current_path(dir_);
  write_str("rel.bin", "relative");
  fs::current_path(old, ec);
  EXPECT_EQ(read_text(path("rel.bin")), "relative");
  EXPECT_EQ(listing(), (std::set<std::string>{"rel.bin"}));
}

// ===== check_output_writable ==================================================================

TEST_F(OutputFile, CheckOutputWritable) {
  // Fine: a new file in a writable folder, an existing writable file, /dev/null, a FIFO.
  EXPECT_NO_THROW(diffuse::check_output_writable(path("new.png"), "output image"));
  write_text(path("old.png"), "x");
  EXPECT_NO_THROW(diffuse::check_output_writable(path("old.png"), "output image"));
  EXPECT_NO_THROW(diffuse::check_output_writable("/dev/null", "output image"));
  ASSERT_EQ(::mkfifo(path("pipe").c_str(), 0600), 0);
  EXPECT_NO_THROW(diffuse::check_output_writable(path("pipe"), "output image"));
  ASSERT_EQ(::symlink("gone/x.png", path("dangling").c_str()), 0);

  expect_error([&] { diffuse::check_output_writable("", "output image"); }, "output image", "empty");
  std::string d = dir_.string();
  expect_error([&] { diffuse::check_output_writable(d, "output image"); }, "output image " + d, "is a folder");
  std::string nodir = path("missing/x.png");
  expect_error([&] { diffuse::check_output_writable(nodir, "output image"); }, "output image " + nodir,
               "folder " + path("missing") + " does not exist");
  // A dangling link into a missing folder: the folder named is the link target's.
  expect_error([&] { diffuse::check_output_writable(path("dangling"), "latent file"); },
               "latent file " + path("dangling"), "gone does not exist");
  std::string under_file = path("old.png/x.png");
  expect_error([&] { diffuse::check_output_writable(under_file, "output image"); }, "output image " + under_file,
               "not a folder");
  EXPECT_EQ(listing(), (std::set<std::string>{"old.png", "pipe", "dangling"}));
}

TEST_F(OutputFile, CheckOutputWritablePermissions) {
  if (::geteuid() == 0) GTEST_SKIP() << "root passes every permission check (access() ignores mode bits)";
  std::string ro = path("ro.png");
  write_text(ro, "x");
  ASSERT_EQ(::chmod(ro.c_str(), 0444), 0);
  expect_error([&] { diffuse::check_output_writable(ro, "output image"); }, "output image " + ro, "not writable");

  fs::create_directories(dir_ / "rodir");
  write_text(path("rodir/existing.png"), "x");
  ASSERT_EQ(::chmod((dir_ / "rodir").c_str(), 0555), 0);
  std::string p = path("rodir/new.png");
  expect_error([&] { diffuse::check_output_writable(p, "output image"); }, "output image " + p,
               "folder " + path("rodir") + " is not writable");
  // An existing writable file there cannot be replaced either (the temporary file goes next to it).
  std::string e = path("rodir/existing.png");
  expect_error([&] { diffuse::check_output_writable(e, "output image"); }, "output image " + e, "is not writable");
  ASSERT_EQ(::chmod((dir_ / "rodir").c_str(), 0755), 0);
}

// ===== image encoders ========================================================================

namespace {

diffuse::Image gradient(int w, int h, int c) {
  diffuse::Image im;
  im.width = w;
  im.height = h;
  im.channels = c;
  im.pixels.resize(size_t(w) * h * c);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int k = 0; k < c; ++k) {
        int v = k == 0 ? x * 255 / (w - 1) : k == 1 ? y * 255 / (h - 1) : k == 2 ? (x + y) * 255 / (w + h - 2) : 200;
        im.pixels[(size_t(y) * w + x) * c + k] = uint8_t(v);
      }
  return im;
}

double mean_abs_error(const diffuse::Image& a, const diffuse::Image& b, int channels_a) {
  // Compares b's channels with the first b.channels channels of a (alpha dropped).
  double sum = 0;
  size_t n = size_t(b.width) * b.height;
  for (size_t i = 0; i < n; ++i)
    for (int k = 0; k < b.channels; ++k)
      sum += std::abs(int(a.pixels[i * channels_a + k]) - int(b.pixels[i * b.channels + k]));
  return sum / double(n * b.channels);
}

}  // namespace

TEST_F(OutputFile, JpegRoundTrip) {
  diffuse::Image im = gradient(33, 17, 3);
  Bytes jpg = diffuse::encode_jpeg(im, 95);
  ASSERT_GE(jpg.size(), 3u);
  diffuse::Image back = diffuse::decode_image(jpg.data(), jpg.size(), "mem.jpg");
  EXPECT_EQ(back.format, "jpeg");
  EXPECT_EQ(back.width, 33);
  EXPECT_EQ(back.height, 17);
  ASSERT_EQ(back.channels, 3);
  double err = mean_abs_error(im, back, 3);
  EXPECT_LT(err, 3.0);

  // Lower quality: still decodes, smaller or equal, larger error allowed.
  Bytes low = diffuse::encode_jpeg(im, 20);
  diffuse::Image back_low = diffuse::decode_image(low.data(), low.size(), "low.jpg");
  EXPECT_LE(low.size(), jpg.size());
  EXPECT_EQ(back_low.width, 33);
}

TEST_F(OutputFile, JpegDropsAlphaAndKeepsGrey) {
  diffuse::Image rgba = gradient(20, 10, 4);
  Bytes a = diffuse::encode_jpeg(rgba);
  diffuse::Image back = diffuse::decode_image(a.data(), a.size(), "rgba.jpg");
  EXPECT_EQ(back.channels, 3);
  EXPECT_LT(mean_abs_error(rgba, back, 4), 3.0);

  diffuse::Image grey = gradient(20, 10, 1);
  Bytes g = diffuse::encode_jpeg(grey);
  back = diffuse::decode_image(g.data(), g.size(), "grey.jpg");
  EXPECT_EQ(back.channels, 1);
  EXPECT_LT(mean_abs_error(grey, back, 1), 3.0);

  diffuse::Image grey_alpha = gradient(20, 10, 2);
  Bytes ga = diffuse::encode_jpeg(grey_alpha);
  back = diffuse::decode_image(ga.data(), ga.size(), "ga.jpg");
  EXPECT_EQ(back.channels, 1);
  EXPECT_LT(mean_abs_error(grey_alpha, back, 2), 3.0);
}

TEST_F(OutputFile, WriteJpegWithParametersComment) {
  diffuse::Image im = gradient(16, 16, 3);
  const std::string params = "a cat on a mat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a";
  im.text = {{"prompt", "ignored"}, {"parameters", params}};
  std::string p = path("out.jpg");
  diffuse::write_jpeg(p, im);
  std::string file = read_text(p);
  ASSERT_GE(file.size(), 3u);
  EXPECT_EQ(uint8_t(file[0]), 0xFF);
  EXPECT_EQ(uint8_t(file[1]), 0xD8);
  EXPECT_EQ(uint8_t(file[2]), 0xFF);
  size_t at = file.find(params);
  ASSERT_NE(at, std::string::npos) << "parameters text not in the file";
  ASSERT_GE(at, 4u);
  EXPECT_EQ(uint8_t(file[at - 4]), 0xFF);  // preceded by a COM marker and its length
  EXPECT_EQ(uint8_t(file[at - 3]), 0xFE);
  EXPECT_EQ((uint8_t(file[at - 2]) << 8 | uint8_t(file[at - 1])), int(params.size() + 2));
  EXPECT_EQ(file.find("ignored"), std::string::npos);
  EXPECT_EQ(diffuse::read_image(p).format, "jpeg");
  EXPECT_EQ(mode_of(p), 0666 & ~read_umask());
  EXPECT_EQ(listing(), (std::set<std::string>{"out.jpg"}));

  // A comment longer than one marker holds is split, not refused.
  im.text = {{"parameters", std::string(70000, 'p')}};
  Bytes big = diffuse::encode_jpeg(im);
  diffuse::Image back = diffuse::decode_image(big.data(), big.size(), "big.jpg");
  EXPECT_EQ(back.width, 16);
}

TEST_F(OutputFile, JpegErrors) {
  diffuse::Image im = gradient(4, 4, 3);
  std::string p = path("bad.jpg");
  expect_error([&] { diffuse::write_jpeg(p, im, 0); }, p, "quality");
  expect_error([&] { diffuse::write_jpeg(p, im, 101); }, p, "quality");
  diffuse::Image five = im;
  five.channels = 5;
  expect_error([&] { diffuse::write_jpeg(p, five); }, p, "5 channels");
  diffuse::Image short_px = im;
  short_px.pixels.pop_back();
  expect_error([&] { diffuse::encode_jpeg(short_px); }, "encode_jpeg", "bytes of pixels");
  EXPECT_EQ(listing(), (std::set<std::string>{}));
}

TEST_F(OutputFile, EncodePngMatchesWritePng) {
  diffuse::Image im = gradient(9, 7, 4);
  im.text = {{"parameters", "steps 20"}};
  Bytes mem = diffuse::encode_png(im);
  std::string p = path("x.png");
  diffuse::write_png(p, im);
  std::string file = read_text(p);
  EXPECT_TRUE(Bytes(file.begin(), file.end()) == mem);
  diffuse::Image back = diffuse::decode_image(mem.data(), mem.size(), "mem.png");
  EXPECT_EQ(back.pixels, im.pixels);
  EXPECT_EQ(back.text, im.text);
  diffuse::Image five = im;
  five.channels = 5;
  expect_error([&] { diffuse::encode_png(five); }, "encode_png", "5 channels");
}

TEST_F(OutputFile, ImagesAndSafetensorsFollowSymlinks) {
  std::string real = path("real.png");
  write_text(real, "old");
  ASSERT_EQ(::chmod(real.c_str(), 0640), 0);
  std::string link = path("link.png");
  ASSERT_EQ(::symlink("real.png", link.c_str()), 0);
  diffuse::write_png(link, gradient(5, 5, 3));
  EXPECT_EQ(type_of(link), mode_t(S_IFLNK));
  EXPECT_EQ(diffuse::read_image(real).width, 5);
  EXPECT_EQ(mode_of(real), mode_t(0640));

  std::string st_real = path("real.safetensors");
  std::string st_link = path("link.safetensors");
  ASSERT_EQ(::symlink("real.safetensors", st_link.c_str()), 0);
  diffuse::save_safetensors(st_link, {{"w", diffuse::Tensor::full({2, 3}, 1.5f)}});
  EXPECT_EQ(type_of(st_link), mode_t(S_IFLNK));
  EXPECT_EQ(type_of(st_real), mode_t(S_IFREG));
  diffuse::TensorFile tf = diffuse::load_safetensors(st_real);
  ASSERT_NE(tf.find("w"), nullptr);
  EXPECT_EQ(tf.find("w")->numel(), 6);
  EXPECT_EQ(tf.find("w")->f32()[5], 1.5f);
  EXPECT_EQ(listing(), (std::set<std::string>{"real.png", "link.png", "real.safetensors", "link.safetensors"}));

  // safetensors into a FIFO, streamed in place.
  std::string fifo = path("st.pipe");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  FifoReader reader(fifo);
  diffuse::save_safetensors(fifo, {{"w", diffuse::Tensor::full({2, 3}, 1.5f)}});
  std::string streamed = reader.wait();
  EXPECT_EQ(streamed, read_text(st_real));
  EXPECT_EQ(type_of(fifo), mode_t(S_IFIFO));
}

// Many files, one sync (a generated dataset): the same files and modes, replaced atomically, no
// temporary left; the final sync reports a folder it cannot open.
TEST_F(OutputFile, DeferredSyncWritesTheSameFiles) {
  const std::string a = path("a.bin"), b = path("b.bin");
  write_str(b, "old");
  const std::string data = pattern(5000);
  diffuse::write_file_safely(a, data.data(), data.size(), diffuse::WriteSync::Later);
  diffuse::write_file_safely(b, "new", 3, diffuse::WriteSync::Later);
  diffuse::sync_written_files(dir_.string());
  EXPECT_EQ(read_text(a), data);
  EXPECT_EQ(read_text(b), "new");
  EXPECT_EQ(listing(), (std::set<std::string>{"a.bin", "b.bin"}));
  const std::string missing = path("no/such");
  expect_error([&] { diffuse::sync_written_files(missing); }, missing, "cannot sync");
}
