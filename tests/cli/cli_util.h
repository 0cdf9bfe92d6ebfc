// Helpers for CLI tests: run the built `diffuse` binary, capture exit status, stdout and stderr.
#pragma once
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace clitest {

struct Result {
  int exit_code = -1;   // exit status, or -1 if killed by a signal
  int signal = 0;       // the signal, if killed
  std::string out, err;
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline std::string temp_dir() {
  static std::string dir = [] {
    std::string tmpl = ::testing::TempDir() + "diffuse_cli_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    const char* d = mkdtemp(buf.data());
    return std::string(d ? d : "/tmp");
  }();
  return dir;
}

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

// Starts DIFFUSE_BIN with args, its stdout and stderr written to the files `out` and `err`; a run
// past timeout_s gets SIGALRM (a hang is reported as a failure). Returns the child's pid.
inline pid_t spawn(const std::vector<std::string>& args, const std::string& out, const std::string& err,
                   int timeout_s) {
  pid_t pid = fork();
  if (pid == 0) {
    int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(o, 1);
    dup2(e, 2);
    alarm(unsigned(timeout_s));
    std::vector<char*> argv;
    std::string bin = DIFFUSE_BIN;
    argv.push_back(bin.data());
    std::vector<std::string> copy = args;
    for (std::string& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

// Runs DIFFUSE_BIN with args; stdout/stderr go to files that are read back.
inline Result run(const std::vector<std::string>& args, int timeout_s = 120) {
  std::string out = temp_dir() + "/stdout.txt", err = temp_dir() + "/stderr.txt";
  const pid_t pid = spawn(args, out, err, timeout_s);
  int status = 0;
  waitpid(pid, &status, 0);
  Result r;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

inline std::string first_existing(const std::vector<std::string>& paths) {
  for (const std::string& p : paths)
    if (access(p.c_str(), R_OK) == 0) return p;
  return "";
}

// The tiny SD 1.x fixture model: the shared reference folder's, else the copy in tests/data.
inline std::string tiny_sd1() {
  return first_existing({std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1/model/tiny-sd1.safetensors",
                         std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors"});
}

inline bool contains(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

}  // namespace clitest
