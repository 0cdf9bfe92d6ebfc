// The job queue as clients see it: progress with live previews during a long job, interrupt
// (within 2 steps, answering with how far it got), a client that closes its socket freeing the
// worker, and SIGTERM during a job.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <set>

#include "../common/taesd_files.h"
#include "io/tensor_file.h"
#include "server_util.h"

using namespace servertest;

namespace {

using Clock = std::chrono::steady_clock;

json long_job(int steps, int seed = 1, int size = 512) {
  return {{"prompt", "a lighthouse"}, {"width", size}, {"height", size}, {"steps", steps}, {"cfg_scale", 7},
          {"seed", seed}, {"sampler_name", "Euler"}, {"override_settings", {{"show_progress_every_n_steps", 2}}}};
}

json progress(const ServerProcess& srv) {
  auto c = srv.client(10);
  return parse(c.Get("/sdapi/v1/progress"));
}

// Polls progress until `pred` holds (true) or `timeout_s` passes (false).
template <typename Pred>
bool wait_progress(const ServerProcess& srv, Pred pred, double timeout_s, json* last = nullptr) {
  const auto t0 = Clock::now();
  while (std::chrono::duration<double>(Clock::now() - t0).count() < timeout_s) {
    json p = progress(srv);
    if (last) *last = p;
    if (p.is_object() && pred(p)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

int step_of(const json& p) { return p["state"]["sampling_step"].get<int>(); }
bool busy(const json& p) { return p["state"]["job_count"].get<int>() > 0; }

// Sends a request on a raw socket and returns the descriptor (the caller closes it).
int send_raw(int port, const std::string& path, const std::string& body) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return -1;
  const std::string req = "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " +
                          std::to_string(body.size()) + "\r\n\r\n" + body;
  if (::send(fd, req.data(), req.size(), 0) != ssize_t(req.size())) return -1;
  return fd;
}

struct JobsServer {
  Folders dirs{"jobs"};
  ServerProcess srv{{"--models-dir", dirs.models, "--max-steps", "2000"}, "jobs"};
};

JobsServer& shared() {
  static JobsServer* s = new JobsServer();
  return *s;
}

}  // namespace

// Seconds per sampling step at 512² on this machine: two short jobs, so the decode cancels out;
// measured once per process (the tests share one server).
double seconds_per_step(const ServerProcess& srv) {
  static double measured = 0;
  if (measured > 0) return measured;
  auto c = srv.client();
  auto timed = [&](int steps) {
    const auto t0 = Clock::now();
    auto r = post(c, "/sdapi/v1/txt2img", long_job(steps, 7));
    EXPECT_TRUE(r && r->status == 200);
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  timed(2);  // loads the model
  const double a = timed(2), b = timed(8);
  measured = std::max(1e-3, (b - a) / 6);
  return measured;
}

TEST(ServerJobs, ProgressAndPreviewDuringALongJob) {
  JobsServer& s = shared();
  ASSERT_GT(s.srv.port(), 0) << s.srv.log();
  // A job of at least 5 s whatever the machine's speed: about 7 s of steps.
  const int steps = std::clamp(int(7.0 / seconds_per_step(s.srv)) + 1, 10, 2000);
  std::atomic<bool> done{false};
  Reply res;
  const auto t0 = Clock::now();
  std::thread client([&] {
    auto c = s.srv.client();
    res = reply(post(c, "/sdapi/v1/txt2img", long_job(steps, 1)));
    done = true;
  });
  std::set<double> values;
  std::string preview;
  while (!done) {
    json p = progress(s.srv);
    if (p.is_object() && busy(p)) {
      values.insert(p["progress"].get<double>());
      if (p["current_image"].is_string()) preview = p["current_image"];
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  client.join();
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  EXPECT_GE(secs, 5.0) << "the job should take 5 s or more for this check to mean anything";
  EXPECT_GE(values.size(), 2u);
  ASSERT_FALSE(preview.empty()) << "no current_image during the job";
  const diffuse::Image im = decode_b64_png(preview);
  EXPECT_EQ(im.width, 64);  // the latent's size: 512 / 8
  json idle = progress(s.srv);
  EXPECT_EQ(idle["progress"], 0.0);
  EXPECT_EQ(idle["state"]["job_count"], 0);
  std::printf("job: %d steps at 512x512, %.1f s, %zu distinct progress values, previews seen\n", steps, secs,
              values.size());
}

TEST(ServerJobs, InterruptEndsTheJobWithinTwoStepsAndSaysHowFarItGot) {
  JobsServer& s = shared();
  Reply res;
  std::thread client([&] {
    auto c = s.srv.client();
    res = reply(post(c, "/sdapi/v1/txt2img", long_job(60, 2)));
  });
  json p;
  ASSERT_TRUE(wait_progress(s.srv, [](const json& q) { return busy(q) && step_of(q) >= 3; }, 120, &p));
  const int at = step_of(p);
  auto c = s.srv.client();
  ASSERT_EQ(c.Post("/sdapi/v1/interrupt")->status, 200);
  client.join();
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  json j = json::parse(res->body);
  json info = json::parse(j["info"].get<std::string>());
  EXPECT_TRUE(info["interrupted"].get<bool>());
  const int ran = info["steps_run"];
  EXPECT_GE(ran, at);
  EXPECT_LE(ran, at + 2) << "interrupt at step " << at;
  EXPECT_LT(ran, 60);
  std::printf("interrupted at step %d, the reply says %d steps ran, %zu image(s)\n", at, ran, j["images"].size());
}

TEST(ServerJobs, SkipAbandonsTheCurrentBatchAndGoesOn) {
  JobsServer& s = shared();
  Reply res;
  // Batches of about 4 s whatever the machine's speed (at least 8 steps): the skip must reach the
  // server while batch 2 runs, and with 8 fixed steps a loaded machine (ctest -j2) could finish
  // batch 2's last 6 steps before the skip request was read, and skip batch 3 instead.
  const int steps = std::clamp(int(4.0 / seconds_per_step(s.srv)) + 1, 8, 2000);
  json body = long_job(steps, 100);
  body["n_iter"] = 3;
  std::thread client([&] {
    auto c = s.srv.client();
    res = reply(post(c, "/sdapi/v1/txt2img", body));
  });
  ASSERT_TRUE(wait_progress(s.srv, [](const json& q) { return busy(q) && q["state"]["job_no"] == 1 && step_of(q) >= 2; }, 120));
  auto c = s.srv.client();
  ASSERT_EQ(c.Post("/sdapi/v1/skip")->status, 200);
  client.join();
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  json info = json::parse(json::parse(res->body)["info"].get<std::string>());
  EXPECT_EQ(info["all_seeds"], json({100, 102}));  // batch 2 (seed 101) was skipped, batch 3 ran
  EXPECT_FALSE(info["interrupted"].get<bool>());
}

TEST(ServerJobs, AClientThatClosesItsSocketFreesTheWorkerWithinTwoSteps) {
  JobsServer& s = shared();
  const int fd = send_raw(s.srv.port(), "/sdapi/v1/txt2img", long_job(60, 3).dump());
  ASSERT_GE(fd, 0);
  json p;
  ASSERT_TRUE(wait_progress(s.srv, [](const json& q) { return busy(q) && step_of(q) >= 3; }, 120, &p));
  const int at = step_of(p);
  ::close(fd);
  int last = at;
  ASSERT_TRUE(wait_progress(s.srv, [&](const json& q) {
    if (busy(q)) last = std::max(last, step_of(q));
    return !busy(q);
  }, 60));
  EXPECT_LE(last, at + 2) << "closed at step " << at;
  // The worker takes the next job at once.
  auto c = s.srv.client();
  auto r = post(c, "/sdapi/v1/txt2img", {{"prompt", "x"}, {"width", 64}, {"height", 64}, {"steps", 2}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  std::printf("closed at step %d, the job stopped by step %d\n", at, last);
}

TEST(ServerJobs, AQueuedJobWhoseClientLeavesNeverRuns) {
  JobsServer& s = shared();
  Reply first;
  std::thread a([&] {
    auto c = s.srv.client();
    first = reply(post(c, "/sdapi/v1/txt2img", long_job(200, 4)));
  });
  ASSERT_TRUE(wait_progress(s.srv, [](const json& q) { return busy(q); }, 60));
  const int fd = send_raw(s.srv.port(), "/sdapi/v1/txt2img", long_job(12, 5, 256).dump());
  ASSERT_TRUE(wait_progress(s.srv, [](const json& q) { return q["state"]["queued"].get<int>() == 1; }, 30));
  ::close(fd);
  EXPECT_TRUE(wait_progress(s.srv, [](const json& q) { return q["state"]["queued"].get<int>() == 0 && busy(q); }, 5));
  auto c = s.srv.client();
  ASSERT_EQ(c.Post("/sdapi/v1/interrupt")->status, 200);  // the first job has been watched long enough
  a.join();
  ASSERT_TRUE(first);
  EXPECT_EQ(first->status, 200);
  EXPECT_TRUE(wait_progress(s.srv, [](const json& q) { return !busy(q); }, 5));  // nothing else ran
}

TEST(ServerJobs, SigtermFinishesTheRunningJobAndExitsCleanly) {
  Folders dirs("term");
  ServerProcess srv({"--models-dir", dirs.models}, "term");
  ASSERT_GT(srv.port(), 0) << srv.log();
  Reply res;
  std::thread client([&] {
    auto c = srv.client();
    res = reply(post(c, "/sdapi/v1/txt2img", long_job(60, 6)));
  });
  ASSERT_TRUE(wait_progress(srv, [](const json& q) { return busy(q) && step_of(q) >= 2; }, 120));
  const auto t0 = Clock::now();
  EXPECT_EQ(srv.stop(), 0) << srv.log();
  client.join();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 30.0);
  ASSERT_TRUE(res) << "the running job's client got no answer";
  EXPECT_EQ(res->status, 200) << res->body;
  EXPECT_TRUE(json::parse(json::parse(res->body)["info"].get<std::string>())["interrupted"].get<bool>());
  EXPECT_NE(srv.log().find("stopped"), std::string::npos);
}

// --taesd: progress's current_image is the TAESD decode at the output size (the cheap preview is
// the latent's, 1/8); a file that is not a TAESD leaves the cheap previews and says so in the job's
// info; a path that does not exist is refused at start.
TEST(ServerJobs, TaesdPreviewsAreFullSize) {
  Folders dirs("taesd");
  const std::string taesd_dir = dirs.root + "/taesd";
  fs::create_directories(taesd_dir);
  taesd_files::Named n;
  taesd_files::add_decoder(n, taesd_files::make_decoder(41), "", 1);
  diffuse::save_safetensors(taesd_dir + "/taesd_decoder.safetensors", n);
  for (const std::string& taesd : {taesd_dir, tiny_model()}) {
    const bool good = taesd == taesd_dir;
    SCOPED_TRACE(taesd);
    ServerProcess srv({"--models-dir", dirs.models, "--taesd", taesd, "--max-steps", "2000"}, "taesd");
    ASSERT_GT(srv.port(), 0) << srv.log();
    json body = long_job(40, 3, 64);
    body["override_settings"]["show_progress_every_n_steps"] = 1;
    std::atomic<bool> done{false};
    Reply res;
    std::thread client([&] {
      auto c = srv.client();
      res = reply(post(c, "/sdapi/v1/txt2img", body));
      done = true;
    });
    std::string preview;
    while (!done) {
      json p = progress(srv);
      if (p.is_object() && busy(p) && p["current_image"].is_string()) preview = p["current_image"];
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    client.join();
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    ASSERT_FALSE(preview.empty()) << "no current_image during the job";
    const diffuse::Image im = decode_b64_png(preview);
    EXPECT_EQ(im.width, good ? 64 : 8);
    EXPECT_EQ(im.height, good ? 64 : 8);
    const std::string warnings = json::parse(json::parse(res->body)["info"].get<std::string>())["warnings"].dump();
    if (good) {
      EXPECT_EQ(warnings.find("--taesd"), std::string::npos) << warnings;
      EXPECT_NE(srv.log().find("TAESD previews for sd1: " + taesd_dir + "/taesd_decoder.safetensors"), std::string::npos)
          << srv.log();
    } else {
      EXPECT_NE(warnings.find("--taesd: " + tiny_model() + ": not a TAESD"), std::string::npos) << warnings;
    }
  }
  ServerProcess missing({"--models-dir", dirs.models, "--taesd", dirs.root + "/nope"}, "taesd_missing");
  EXPECT_LT(missing.port(), 0);
  EXPECT_NE(missing.log().find("--taesd " + dirs.root + "/nope: no such file or folder"), std::string::npos)
      << missing.log();
  EXPECT_EQ(missing.stop(), 1);
}
