// Helpers for the server tests: start `diffuse serve` on a free loopback port with a models folder
// holding the tiny SD 1.x model, talk to it with cpp-httplib's client, stop it with SIGTERM.
#pragma once
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "io/image.h"
#include "server/request.h"

namespace servertest {

namespace fs = std::filesystem;
using json = nlohmann::json;

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline std::string tiny_model() { return std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors"; }

inline std::string make_temp_dir(const std::string& tag) {
  std::string tmpl = ::testing::TempDir() + "diffuse_srv_" + tag + "_XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  const char* d = mkdtemp(buf.data());
  return d ? d : "/tmp";
}

// A models folder with the tiny model under two names (to switch between), a LoRA folder with
// the tiny LoRA fixture.
struct Folders {
  std::string root, models, loras;
  explicit Folders(const std::string& tag) {
    root = make_temp_dir(tag);
    models = root + "/models";
    loras = root + "/loras";
    fs::create_directories(models + "/sub");
    fs::create_directories(loras);
    fs::copy_file(tiny_model(), models + "/tiny.safetensors");
    fs::copy_file(tiny_model(), models + "/sub/other.safetensors");
    fs::copy_file(std::string(DIFFUSE_TEST_DATA) + "/sd1-lora/lora-kohya.safetensors", loras + "/style.safetensors");
    // A ControlNet (diffusers folder) where the server looks by default: MODELS/ControlNet.
    fs::create_directories(models + "/ControlNet");
    fs::copy(std::string(DIFFUSE_TEST_DATA) + "/sd1-controlnet/model/diffusers-controlnet",
             models + "/ControlNet/diffusers-controlnet", fs::copy_options::recursive);
  }
};

// `diffuse serve` in a child process; stderr goes to a file the test can read.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> args, const std::string& tag = "srv") {
    log_ = make_temp_dir(tag + "_log") + "/serve.log";
    args.insert(args.begin(), {"serve", "--port", "0"});
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ == 0) {
      // A suite's shared server is never destroyed: SIGTERM it when the test process ends, or it
      // idles until the alarm and its sanitizer exit checks never run.
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(127);
      int e = open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(e, 2);
      dup2(e, 1);
      alarm(1500);  // a hung server is killed rather than holding the test run
      std::vector<char*> argv;
      std::string bin = DIFFUSE_BIN;
      argv.push_back(bin.data());
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(bin.c_str(), argv.data());
      _exit(127);
    }
    const std::regex re("listening on http://[0-9.]+:([0-9]+)");
    for (int i = 0; i < 600 && port_ < 0; ++i) {
      std::smatch m;
      const std::string s = slurp(log_);
      if (std::regex_search(s, m, re)) port_ = std::stoi(m[1]);
      else if (exited()) break;
      else std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  ~ServerProcess() { stop(); }

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string log() const { return slurp(log_); }

  httplib::Client client(int read_timeout_s = 300) const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(read_timeout_s, 0);
    c.set_connection_timeout(10, 0);
    return c;
  }

  // SIGTERM, then the exit status (0: a clean exit); -1 when it had to be killed.
  int stop(int wait_s = 60) {
    if (pid_ <= 0) return status_;
    kill(pid_, SIGTERM);
    for (int i = 0; i < wait_s * 20; ++i) {
      if (exited()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
      status_ = -1;
    }
    return status_;
  }

  // Resident memory of the server process, bytes.
  size_t rss_bytes() const {
    std::ifstream f("/proc/" + std::to_string(pid_) + "/status");
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("VmRSS:", 0) == 0) return size_t(std::stoull(line.substr(6))) * 1024;
    return 0;
  }

 private:
  bool exited() {
    int st = 0;
    if (pid_ > 0 && waitpid(pid_, &st, WNOHANG) == pid_) {
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      pid_ = -1;
      return true;
    }
    return pid_ <= 0;
  }
  pid_t pid_ = -1;
  int port_ = -1;
  int status_ = -1;
  std::string log_;
};

// A finished exchange that can be stored and copied (httplib::Result cannot be default-made).
struct Reply {
  bool ok = false;
  int status = 0;
  std::string body;
  std::string error;  // why there was no answer (httplib's words), when ok is false
  explicit operator bool() const { return ok; }
  const Reply* operator->() const { return this; }
};

inline Reply reply(const httplib::Result& r) {
  Reply out;
  if (r) {
    out.ok = true;
    out.status = r->status;
    out.body = r->body;
  } else {
    out.error = httplib::to_string(r.error());
  }
  return out;
}

inline json parse(const httplib::Result& r) {
  if (!r) return json();
  return json::parse(r->body, nullptr, false);
}

// POST a JSON body; the result (null on a connection failure).
inline httplib::Result post(httplib::Client& c, const std::string& path, const json& body,
                            const httplib::Headers& h = {}) {
  return c.Post(path.c_str(), h, body.dump(), "application/json");
}

inline diffuse::Image decode_b64_png(const std::string& b64) {
  std::vector<uint8_t> bytes = diffuse::server::base64_decode(b64, "test");
  return diffuse::decode_image(bytes.data(), bytes.size(), "response image");
}

inline std::string png_b64(const diffuse::Image& im) {
  std::vector<uint8_t> png = diffuse::encode_png(im);
  return diffuse::server::base64_encode(png.data(), png.size());
}

inline std::string text_of(const diffuse::Image& im, const std::string& key) {
  for (const auto& [k, v] : im.text)
    if (k == key) return v;
  return "";
}

}  // namespace servertest
