// Load and faults: 32 concurrent txt2img clients each get their own image (equal to the CLI's for
// the same settings); memory after 200 requests stays within 5% of after 20; hostile requests and
// clients that vanish mid-job get their 4xx (or are cancelled) while the server keeps serving.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "server_util.h"

using namespace servertest;

namespace {

json small_job(int i, int steps = 2) {
  return {{"prompt", "object number " + std::to_string(i)}, {"width", 64}, {"height", 64}, {"steps", steps},
          {"cfg_scale", 6}, {"seed", 1000 + i}, {"sampler_name", "Euler"}};
}

// Connects, sends `raw` (any bytes) and closes without reading.
void send_and_close(int port, const std::string& raw) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) (void)::send(fd, raw.data(), raw.size(), MSG_NOSIGNAL);
  ::close(fd);
}

std::string http_post(const std::string& path, const std::string& body) {
  return "POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

}  // namespace

TEST(ServerLoad, ThirtyTwoConcurrentClientsGetTheirOwnImages) {
  Folders dirs("load32");
  ServerProcess srv({"--models-dir", dirs.models}, "load32");
  ASSERT_GT(srv.port(), 0) << srv.log();
  constexpr int kClients = 32;
  std::vector<Reply> results(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i)
    threads.emplace_back([&, i] {
      auto c = srv.client();
      results[size_t(i)] = reply(post(c, "/sdapi/v1/txt2img", small_job(i)));
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) {
    const auto& r = results[size_t(i)];
    ASSERT_TRUE(r) << "client " << i << ": no answer (" << r.error << ")";
    ASSERT_EQ(r->status, 200) << "client " << i << ": " << r->body;
    json j = json::parse(r->body);
    json info = json::parse(j["info"].get<std::string>());
    EXPECT_EQ(info["seed"], 1000 + i);
    EXPECT_EQ(info["prompt"], "object number " + std::to_string(i));
    const diffuse::Image im = decode_b64_png(j["images"][0]);
    const std::string params = text_of(im, "parameters");
    EXPECT_NE(params.find("Seed: " + std::to_string(1000 + i)), std::string::npos) << params;
    // The CLI with the same settings draws the same pixels (every 4th client: the CLI loads the
    // model each time).
    if (i % 4 == 0) {
      const std::string out = dirs.root + "/cli_" + std::to_string(i) + ".png";
      const std::string cmd = std::string(DIFFUSE_BIN) + " generate -q -m " + dirs.models + "/sub/other.safetensors" +
                              " -p 'object number " + std::to_string(i) + "' -W 64 -H 64 --steps 2 --cfg-scale 6 -s " +
                              std::to_string(1000 + i) + " --sampler euler -o " + out;
      ASSERT_EQ(std::system(cmd.c_str()), 0);
      EXPECT_EQ(diffuse::read_image(out).pixels, im.pixels) << "client " << i;
    }
  }
  EXPECT_EQ(srv.stop(), 0) << srv.log();
}

// A burst of clients is taken in by the kernel while the server's accept loop is not running (here:
// stopped; in real life: busy or starved of CPU). With cpp-httplib's default listen backlog of 5,
// the connections past the sixth had their SYNs dropped and waited for retransmits 1, 3, 7 s later:
// on a loaded 2-core machine a 32-client burst ran into its 10 s connect timeout.
TEST(ServerLoad, ABurstOfConnectionsIsTakenInWhileTheAcceptLoopIsStopped) {
  Folders dirs("burst");
  ServerProcess srv({"--models-dir", dirs.models}, "burst");
  ASSERT_GT(srv.port(), 0) << srv.log();
  ASSERT_EQ(kill(srv.pid(), SIGSTOP), 0);
  constexpr int kConns = 64;
  std::vector<pollfd> fds;
  for (int i = 0; i < kConns; ++i) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(uint16_t(srv.port()));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const int rc = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ASSERT_TRUE(rc == 0 || errno == EINPROGRESS) << "connection " << i << ": " << strerror(errno);
    fds.push_back({fd, POLLOUT, 0});
  }
  // Loopback handshakes complete in microseconds; a dropped SYN would wait a second for its retransmit.
  int connected = 0;
  for (int waited_ms = 0; waited_ms < 500; waited_ms += 10) {
    connected = 0;
    for (pollfd& p : fds) {
      p.revents = 0;
      (void)poll(&p, 1, 0);
      int err = 0;
      socklen_t len = sizeof err;
      if ((p.revents & POLLOUT) && getsockopt(p.fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) ++connected;
    }
    if (connected == kConns) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (pollfd& p : fds) ::close(p.fd);
  ASSERT_EQ(kill(srv.pid(), SIGCONT), 0);
  EXPECT_EQ(connected, kConns) << "connections the kernel completed while the server was stopped";
  // The server goes on serving after the burst.
  auto c = srv.client();
  auto r = reply(post(c, "/sdapi/v1/txt2img", small_job(0, 1)));
  ASSERT_TRUE(r) << r.error;
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(srv.stop(), 0) << srv.log();
}

// Two workers run jobs side by side (each with its own engine run state) and draw what one draws.
TEST(ServerLoad, TwoWorkersDrawWhatOneDraws) {
  Folders dirs("workers");
  std::vector<std::vector<uint8_t>> pixels[2];
  for (int workers : {1, 2}) {
    ServerProcess srv({"--models-dir", dirs.models, "--workers", std::to_string(workers)}, "workers");
    ASSERT_GT(srv.port(), 0) << srv.log();
    std::vector<Reply> results(6);
    std::vector<std::thread> threads;
    for (int i = 0; i < 6; ++i)
      threads.emplace_back([&, i] {
        auto c = srv.client();
        json b = small_job(i, 3);
        if (i % 2) b["init_images"] = {png_b64(diffuse::read_image(std::string(DIFFUSE_TEST_DATA) + "/sd1/init.png"))};
        results[size_t(i)] = reply(post(c, i % 2 ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img", b));
      });
    for (auto& t : threads) t.join();
    for (int i = 0; i < 6; ++i) {
      ASSERT_TRUE(results[size_t(i)]);
      ASSERT_EQ(results[size_t(i)]->status, 200) << results[size_t(i)]->body;
      pixels[workers - 1].push_back(decode_b64_png(json::parse(results[size_t(i)]->body)["images"][0]).pixels);
    }
    EXPECT_EQ(srv.stop(), 0) << srv.log();
  }
  for (int i = 0; i < 6; ++i) EXPECT_EQ(pixels[0][size_t(i)], pixels[1][size_t(i)]) << "request " << i;
}

TEST(ServerLoad, MemoryAfter200RequestsStaysWithin5PercentOfAfter20) {
  Folders dirs("rss");
  ServerProcess srv({"--models-dir", dirs.models}, "rss");
  ASSERT_GT(srv.port(), 0) << srv.log();
  auto c = srv.client();
  diffuse::Image init;
  init.width = init.height = 64;
  init.channels = 3;
  init.pixels.assign(64 * 64 * 3, 100);
  const std::string init_b64 = png_b64(init);
  // A mix: txt2img, img2img, a malformed body, and a client that leaves before its answer.
  auto one = [&](int i) {
    switch (i % 5) {
      case 0: case 1: {
        auto r = post(c, "/sdapi/v1/txt2img", small_job(i, 1));
        ASSERT_TRUE(r && r->status == 200) << i;
        break;
      }
      case 2: {
        json b = small_job(i, 2);
        b["init_images"] = {init_b64};
        auto r = post(c, "/sdapi/v1/img2img", b);
        ASSERT_TRUE(r && r->status == 200) << i;
        break;
      }
      case 3: {
        auto r = c.Post("/sdapi/v1/txt2img", "{\"prompt\": [1,", "application/json");
        ASSERT_TRUE(r && r->status == 400) << i;
        break;
      }
      default:
        send_and_close(srv.port(), http_post("/sdapi/v1/txt2img", small_job(i, 1).dump()));
    }
  };
  for (int i = 0; i < 20; ++i) one(i);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const size_t rss20 = srv.rss_bytes();
  for (int i = 20; i < 200; ++i) one(i);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const size_t rss200 = srv.rss_bytes();
  ASSERT_GT(rss20, 0u);
  const double ratio = double(rss200) / double(rss20);
  std::printf("RSS after 20 requests %.1f MiB, after 200 %.1f MiB (ratio %.3f)\n", rss20 / 1048576.0, rss200 / 1048576.0,
              ratio);
  EXPECT_LE(ratio, 1.05);
  EXPECT_EQ(srv.stop(), 0) << srv.log();
}

TEST(ServerLoad, HostileRequestsDuringLoadGetTheir4xxAndServingGoesOn) {
  Folders dirs("faults");
  ServerProcess srv({"--models-dir", dirs.models, "--max-body-mb", "4"}, "faults");
  ASSERT_GT(srv.port(), 0) << srv.log();
  std::atomic<int> ok{0};
  std::vector<std::thread> load;
  for (int i = 0; i < 4; ++i)
    load.emplace_back([&, i] {
      auto c = srv.client();
      for (int k = 0; k < 3; ++k) {
        auto r = post(c, "/sdapi/v1/txt2img", small_job(i * 10 + k, 2));
        if (r && r->status == 200) ++ok;
      }
    });
  auto c = srv.client();
  struct Case {
    std::string path, body;
    int status;
    std::string needle;
  };
  json neg = small_job(0);
  neg["width"] = -64;
  json huge = small_job(0);
  huge["width"] = 10000;
  huge["height"] = 10000;  // 100 megapixels
  json bad64 = small_job(0);
  bad64["init_images"] = {"@@@@"};
  json badpng = small_job(0);
  badpng["init_images"] = {"iVBORw0KGgoAAAANSUhEUgAA//8AAP//CAIAAAA="};  // PNG header declaring 65535x65535
  const std::vector<Case> cases = {
      {"/sdapi/v1/txt2img", "{not json", 400, ""},
      {"/sdapi/v1/txt2img", neg.dump(), 422, "width"},
      {"/sdapi/v1/txt2img", huge.dump(), 422, "width"},
      {"/sdapi/v1/img2img", bad64.dump(), 400, "init_images"},
      {"/sdapi/v1/img2img", badpng.dump(), 400, "init_images"},
      {"/v1/images/generations", json{{"prompt", "x"}, {"size", "-5x64"}}.dump(), 400, "size"},
      {"/v1/images/generations", json{{"prompt", "x"}, {"size", "10000x10000"}}.dump(), 400, "size"},
      {"/sdapi/v1/txt2img", std::string(5u << 20, ' '), 413, ""},
  };
  for (const Case& k : cases) {
    auto r = c.Post(k.path.c_str(), k.body, "application/json");
    ASSERT_TRUE(r) << k.path << " " << k.body.substr(0, 80);
    EXPECT_EQ(r->status, k.status) << k.body.substr(0, 80) << " -> " << r->body;
    if (!k.needle.empty()) {
      EXPECT_NE(r->body.find(k.needle), std::string::npos) << r->body;
    }
  }
  // Clients that vanish mid-request (half a body, or a whole one) and garbage bytes.
  send_and_close(srv.port(), "POST /sdapi/v1/txt2img HTTP/1.1\r\nContent-Length: 500\r\n\r\n{\"prompt\":");
  send_and_close(srv.port(), http_post("/sdapi/v1/txt2img", small_job(99, 2).dump()));
  // The bytes hold a NUL, so the length comes from sizeof (a hand-counted 20 read past the literal).
  static const char kGarbage[] = "\x16\x03\x01\x02\x00garbage\r\n\r\n";
  send_and_close(srv.port(), std::string(kGarbage, sizeof kGarbage - 1));
  for (auto& t : load) t.join();
  EXPECT_EQ(ok.load(), 12);
  auto r = post(c, "/sdapi/v1/txt2img", small_job(5));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(srv.stop(), 0) << srv.log();
}
