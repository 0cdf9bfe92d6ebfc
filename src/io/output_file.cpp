// Safe output file writing: see output_file.h for the rules.
#include "io/output_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace diffuse {
namespace {

constexpr int kMaxLinkHops = 40;         // like the kernel's MAXSYMLINKS
constexpr size_t kMaxTempStem = 200;     // ".<stem>.XXXXXX" stays under NAME_MAX (255)

// Folder part of a path: "a/b/c" -> "a/b", "c" -> ".", "/c" -> "/" (trailing slashes ignored).
std::string dir_of(const std::string& p) {
  size_t end = p.find_last_not_of('/');
  if (end == std::string::npos) return "/";
  size_t slash = p.rfind('/', end);
  if (slash == std::string::npos) return ".";
  size_t d = p.find_last_not_of('/', slash);
  if (d == std::string::npos) return "/";
  return p.substr(0, d + 1);
}

// Last component of a path, trailing slashes ignored ("" for "/" or "").
std::string base_of(const std::string& p) {
  size_t end = p.find_last_not_of('/');
  if (end == std::string::npos) return "";
  size_t slash = p.rfind('/', end);
  size_t start = slash == std::string::npos ? 0 : slash + 1;
  return p.substr(start, end - start + 1);
}

std::string join(const std::string& dir, const std::string& name) {
  return dir == "/" ? "/" + name : dir + "/" + name;
}

// The file that writing `path` should affect: the canonical path when it exists (symlinks
// followed), else the end of the path's symlink chain (a dangling link names the file to
// create), else the path itself.
std::string resolve_target(const std::string& path) {
  if (char* r = ::realpath(path.c_str(), nullptr)) {
    std::string s(r);
    std::free(r);
    return s;
  }
  std::string p = path;
  for (int hop = 0; hop < kMaxLinkHops; ++hop) {
    struct stat st {};
    if (::lstat(p.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return p;
    std::vector<char> buf(size_t(st.st_size > 0 ? st.st_size : PATH_MAX) + 1);
    ssize_t n = ::readlink(p.c_str(), buf.data(), buf.size());
    if (n < 0 || size_t(n) >= buf.size()) return p;  // vanished or changed under us: let open fail
    std::string link(buf.data(), size_t(n));
    p = (!link.empty() && link[0] == '/') ? link : join(dir_of(p), link);
  }
  return p;  // a link loop: the write fails with ELOOP
}

// The process umask without changing it for other threads (Linux >= 4.7 reports it in
// /proc/self/status); falls back to the set-and-restore trick.
mode_t current_umask() {
  if (FILE* f = std::fopen("/proc/self/status", "re")) {
    char line[256];
    unsigned mask = 0;
    bool found = false;
    while (!found && std::fgets(line, sizeof line, f))
      found = std::sscanf(line, "Umask: %o", &mask) == 1;
    std::fclose(f);
    if (found) return mode_t(mask & 0777);
  }
  mode_t old = ::umask(022);
  ::umask(old);
  return old;
}

[[noreturn]] void fail_write(const std::string& path, int err) {
  fail(path, ": cannot write: ", std::strerror(err ? err : EIO));
}

// Runs the writer and collects the first stdio error (0 when everything reached the kernel).
int run_writer(FILE* f, const std::function<void(FILE*)>& writer) {
  errno = 0;
  writer(f);
  int err = 0;
  if (std::ferror(f)) err = errno ? errno : EIO;
  if (std::fflush(f) != 0 && !err) err = errno ? errno : EIO;
  return err;
}

struct FileCloser {
  FILE* f = nullptr;
  ~FileCloser() {
    if (f) std::fclose(f);
  }
  // Closes now; returns errno of a failed close (0 on success).
  int close() {
    FILE* g = f;
    f = nullptr;
    return std::fclose(g) == 0 ? 0 : (errno ? errno : EIO);
  }
};

// A device, FIFO or socket: written where it is, never truncated or replaced.
void write_in_place(const std::string& path, const std::string& target,
                    const std::function<void(FILE*)>& writer) {
  int fd;
  do {
    fd = ::open(target.c_str(), O_WRONLY | O_CLOEXEC | O_NOCTTY);
  } while (fd < 0 && errno == EINTR);  // opening a FIFO waits for a reader
  if (fd < 0) fail_write(path, errno);
  FileCloser file{::fdopen(fd, "w")};  // "w" on an fd does not truncate
  if (!file.f) {
    int e = errno;
    ::close(fd);
    fail_write(path, e);
  }
  int err = run_writer(file.f, writer);
  int close_err = file.close();
  if (!err) err = close_err;
  if (err) fail_write(path, err);
}

// The temporary file being written, for the signal handlers (install_output_cleanup): a fixed
// buffer and a flag, so the handler only reads memory and calls unlink (async-signal-safe).
char g_pending[PATH_MAX + 1];
std::atomic<bool> g_pending_set{false};

void set_pending(const std::string& name) {
  if (name.size() > PATH_MAX) return;
  std::memcpy(g_pending, name.c_str(), name.size() + 1);
  g_pending_set.store(true);
}

void clear_pending() { g_pending_set.store(false); }

extern "C" void cleanup_and_reraise(int sig) {
  if (g_pending_set.load()) ::unlink(g_pending);
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

struct TempFile {
  std::string name;
  FileCloser file;
  bool keep = false;
  ~TempFile() {
    if (file.f) {
      std::fclose(file.f);
      file.f = nullptr;
    }
    if (!keep && !name.empty()) ::unlink(name.c_str());
    clear_pending();
  }
};

// A regular or new file: temporary file in the same folder, then rename over the target.
void replace_atomically(const std::string& path, const std::string& target, const struct stat* old,
                        const std::function<void(FILE*)>& writer, WriteSync sync) {
  std::string dir = dir_of(target), base = base_of(target);
  if (base.empty() || target.back() == '/') fail_write(path, EISDIR);  // "name/" that does not exist

  std::string name = ".";
  name.append(base, 0, kMaxTempStem);
  name += ".XXXXXX";
  std::string tmpl = join(dir, name);
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  int fd = ::mkostemp(buf.data(), O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    fail(path, ": cannot write: cannot create a temporary file in ", dir, ": ", std::strerror(e));
  }
  TempFile tmp;
  tmp.name = buf.data();
  set_pending(tmp.name);  // a SIGINT/SIGTERM from here on removes it (install_output_cleanup)

  // Permissions: the replaced file's (and its owner where the process may), else the default
  // for a new file. fchown first: it may clear set-id bits that fchmod then restores.
  mode_t mode = old ? (old->st_mode & 07777) : (0666 & ~current_umask());
  if (old && (old->st_uid != ::geteuid() || old->st_gid != ::getegid())) {
    if (::fchown(fd, old->st_uid, old->st_gid) != 0) (void)!::fchown(fd, uid_t(-1), old->st_gid);
  }
  if (::fchmod(fd, mode) != 0 && errno != EPERM && errno != ENOTSUP && errno != EOPNOTSUPP) {
    int e = errno;
    ::close(fd);
    fail_write(path, e);
  }

  tmp.file.f = ::fdopen(fd, "w");
  if (!tmp.file.f) {
    int e = errno;
    ::close(fd);
    fail_write(path, e);
  }
  int err = run_writer(tmp.file.f, writer);
  if (!err && sync == WriteSync::Each && ::fsync(::fileno(tmp.file.f)) != 0 && errno != EINVAL && errno != EROFS)
    err = errno;
  int close_err = tmp.file.close();
  if (!err) err = close_err;
  if (!err && std::rename(tmp.name.c_str(), target.c_str()) != 0) err = errno;
  if (err) fail_write(path, err);  // ~TempFile removes the temporary file
  tmp.keep = true;
  clear_pending();

  // Make the rename itself durable (best effort: some file systems refuse fsync on folders).
  if (sync == WriteSync::Later) return;
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace

namespace {

void write_safely(const std::string& path, const std::function<void(FILE*)>& writer, WriteSync sync) {
  DF_CHECK(!path.empty(), "cannot write: no file name given (the path is empty)");
  // A device or FIFO is opened through the path as given: the kernel follows every link,
  // including /proc "magic" links such as /dev/stdout -> /proc/self/fd/1 -> pipe:[1234], which
  // name no file that realpath could return.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    write_in_place(path, path, writer);
    return;
  }
  const std::string target = resolve_target(path);
  bool exists = ::stat(target.c_str(), &st) == 0;
  if (exists && !S_ISREG(st.st_mode)) {  // changed under us
    write_in_place(path, target, writer);
    return;
  }
  replace_atomically(path, target, exists ? &st : nullptr, writer, sync);
}

}  // namespace

void write_file_safely(const std::string& path, const std::function<void(FILE*)>& writer) {
  write_safely(path, writer, WriteSync::Each);
}

void write_file_safely(const std::string& path, const void* data, size_t size) {
  write_file_safely(path, data, size, WriteSync::Each);
}

void write_file_safely(const std::string& path, const void* data, size_t size, WriteSync sync) {
  write_safely(
      path,
      [&](FILE* f) {
        if (size > 0) std::fwrite(data, 1, size, f);
      },
      sync);
}

void sync_written_files(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail(dir, ": cannot sync: ", std::strerror(errno));
  const int r = ::syncfs(fd), e = errno;
  ::close(fd);
  if (r != 0) fail(dir, ": cannot sync: ", std::strerror(e));
}

void check_output_writable(const std::string& path, const std::string& what) {
  const std::string who = what.empty() ? path : what + " " + path;
  DF_CHECK(!path.empty(), what.empty() ? "output" : what, ": no file name given (the path is empty)");
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    DF_CHECK(!S_ISDIR(st.st_mode), who, ": is a folder");
    if (::access(path.c_str(), W_OK) != 0) {
      int e = errno;
      fail(who, ": not writable (", std::strerror(e), ")");
    }
    if (!S_ISREG(st.st_mode)) return;  // written in place
    // A regular file is replaced through a temporary file created next to it.
    std::string dir = dir_of(resolve_target(path));
    DF_CHECK(::access(dir.c_str(), W_OK | X_OK) == 0, who, ": folder ", dir,
             " is not writable (the file is replaced through a temporary file there)");
    return;
  }
  int e = errno;  // why stat(path) failed (ENOENT for a new file or a dangling link)
  const std::string target = resolve_target(path);
  DF_CHECK(path.back() != '/', who, ": names a folder that does not exist");
  std::string dir = dir_of(target);
  struct stat ds {};
  if (::stat(dir.c_str(), &ds) != 0) {
    int de = errno;
    if (de == ENOENT) fail(who, ": folder ", dir, " does not exist");
    if (de == ENOTDIR) fail(who, ": folder ", dir, " does not exist (part of it is not a folder)");
    fail(who, ": cannot access folder ", dir, ": ", std::strerror(de));
  }
  DF_CHECK(S_ISDIR(ds.st_mode), who, ": ", dir, " is not a folder");
  if (e != ENOENT) fail(who, ": ", std::strerror(e));
  DF_CHECK(::access(dir.c_str(), W_OK | X_OK) == 0, who, ": folder ", dir, " is not writable");
}

bool is_special_output(const std::string& path) {
  struct stat st {};
  return !path.empty() && ::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode);
}

void check_input_file(const std::string& path, const std::string& what, bool folder_ok) {
  struct stat st {};
  if (path.empty()) fail(what, ": empty path");
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) throw FileError(cat(what, " ", path, ": no such file", folder_ok ? " or folder" : ""));
    throw FileError(cat(what, " ", path, ": ", std::strerror(errno)));
  }
  if (S_ISREG(st.st_mode) || (folder_ok && S_ISDIR(st.st_mode))) return;
  const char* kind = S_ISDIR(st.st_mode) ? "a folder" : S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode) ? "a character device"
                     : S_ISBLK(st.st_mode) ? "a block device" : S_ISSOCK(st.st_mode) ? "a socket" : "not a regular file";
  throw FileError(cat(what, " ", path, ": is ", kind, "; give a regular file", folder_ok ? " or a folder" : ""));
}

void install_output_cleanup() {
  struct sigaction sa {};
  sa.sa_handler = cleanup_and_reraise;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) ::sigaction(sig, &sa, nullptr);
}

}  // namespace diffuse
