// What wraps the routes: listening, HTTP Basic / Bearer auth, CORS, body limits, request logs,
// errors for paths and methods no route takes, and an orderly stop (server.h).
#include "server/server.h"

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "core/error.h"
#include "server/routes.h"
#include "server/thread_pool.h"

namespace diffuse::server {

using json = nlohmann::json;

struct Server::Impl {
  explicit Impl(const ServerOptions& o) : st(o) {}
  ServerState st;
  httplib::Server svr;
  int port = -1;
};

namespace {

// cpp-httplib listens with a backlog of 5, fixed when Debian compiled libcpp-httplib. A burst of
// clients arriving while the accept loop is busy or starved of CPU then has its SYNs dropped past
// the sixth and waits 1, 3, 7 s for retransmits (past a client's 10 s connect timeout on a loaded
// machine). listen() on a listening socket sets a new backlog (capped by net.core.somaxconn), so
// find the socket httplib bound, among this process's descriptors, and widen it. False when no
// listening socket on `port` was found.
bool widen_listen_backlog(int port, int backlog) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd", ec)) {
    int fd = -1;
    try {
      fd = std::stoi(e.path().filename().string());
    } catch (const std::exception&) {
      continue;
    }
    int listening = 0;
    socklen_t len = sizeof listening;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) continue;
    sockaddr_storage a{};
    len = sizeof a;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) continue;
    int p = -1;
    if (a.ss_family == AF_INET) p = ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
    if (a.ss_family == AF_INET6) p = ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port);
    if (p == port && ::listen(fd, backlog) == 0) return true;
  }
  return false;
}

// Comparison whose time does not depend on where the strings differ.
bool same_secret(const std::string& a, const std::string& b) {
  unsigned diff = unsigned(a.size() ^ b.size());
  for (size_t i = 0; i < a.size(); ++i) diff |= unsigned(uint8_t(a[i]) ^ uint8_t(i < b.size() ? b[i] : 0));
  return diff == 0;
}

bool is_openai_path(const std::string& path) { return path.rfind("/v1/", 0) == 0; }

// Credentials in an Authorization header: "Basic base64(user:pass)" → (user, pass); "Bearer K" → ("", K).
bool basic_ok(const ServerOptions& o, const std::string& header) {
  if (header.rfind("Basic ", 0) != 0) return false;
  std::string decoded;
  try {
    std::vector<uint8_t> b = base64_decode(header.substr(6), "Authorization");
    decoded.assign(b.begin(), b.end());
  } catch (const RequestError&) {
    return false;
  }
  bool ok = false;
  for (const auto& [u, p] : o.basic_auth) ok |= same_secret(decoded, u + ":" + p);
  return ok;
}

bool bearer_ok(const ServerOptions& o, const std::string& header) {
  if (header.rfind("Bearer ", 0) != 0) return false;
  const std::string key = header.substr(7);
  bool ok = !o.api_key.empty() && same_secret(key, o.api_key);
  for (const auto& [u, p] : o.basic_auth) ok |= same_secret(key, u + ":" + p);  // OpenAI clients send only bearer keys
  return ok;
}

// Whether the request may go on; when it may not, `res` holds the 401. With no auth configured
// the Authorization header is not looked at (clients send empty or garbage ones).
bool authorized(const ServerOptions& o, const httplib::Request& req, httplib::Response& res) {
  const bool openai = is_openai_path(req.path);
  const bool needed = !o.basic_auth.empty() || (openai && !o.api_key.empty());
  if (!needed) return true;
  const std::string h = req.get_header_value("Authorization");
  if (openai ? (bearer_ok(o, h) || basic_ok(o, h)) : basic_ok(o, h)) return true;
  res.status = 401;
  if (openai) {
    res.set_content(json{{"error", {{"message", h.empty() ? "no API key given (Authorization: Bearer KEY)" : "incorrect API key"},
                                    {"type", "authentication_error"},
                                    {"param", json()},
                                    {"code", "invalid_api_key"}}}}
                        .dump(),
                    "application/json");
  } else {
    res.set_header("WWW-Authenticate", "Basic realm=\"diffuse\"");
    const std::string msg = h.empty() ? "Not authenticated" : "Incorrect username or password";
    res.set_content(json{{"error", "HTTPException"}, {"detail", msg}, {"body", ""}, {"errors", msg}}.dump(),
                    "application/json");
  }
  return false;
}

// The Origin to echo when CORS allows it ("" when not).
std::string allowed_origin(const ServerOptions& o, const httplib::Request& req) {
  const std::string origin = req.get_header_value("Origin");
  if (origin.empty()) return "";
  for (const std::string& a : o.cors_origins)
    if (a == "*" || a == origin) return origin;
  return "";
}

void add_cors(const std::string& origin, httplib::Response& res) {
  res.set_header("Access-Control-Allow-Origin", origin);
  res.set_header("Access-Control-Allow-Credentials", "true");
  res.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
  res.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type");
  res.set_header("Vary", "Origin");
}

}  // namespace

Server::Server(ServerOptions o) : impl_(std::make_unique<Impl>(o)) {
  Impl& im = *impl_;
  const ServerOptions& opts = im.st.opts;
  httplib::Server& svr = im.svr;
  // Every waiting request holds a thread: enough for the queue, plus room for progress/interrupt.
  const size_t threads = size_t(opts.workers) + opts.max_queue + 8;
  svr.new_task_queue = [threads] { return new LifoThreadPool(threads); };
  svr.set_payload_max_length(opts.limits.max_body_bytes);
  svr.set_read_timeout(60, 0);
  svr.set_write_timeout(60, 0);
  svr.set_keep_alive_timeout(5);

  svr.set_pre_routing_handler([&im](const httplib::Request& req, httplib::Response& res) {
    const ServerOptions& o = im.st.opts;
    const std::string origin = o.cors_origins.empty() ? "" : allowed_origin(o, req);
    if (req.method == "OPTIONS") {  // CORS preflight: answered before auth (browsers send no credentials)
      if (!origin.empty()) add_cors(origin, res);
      res.status = origin.empty() ? 405 : 204;
      return httplib::Server::HandlerResponse::Handled;
    }
    if (!authorized(o, req, res)) {
      if (!origin.empty()) add_cors(origin, res);
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  svr.set_post_routing_handler([&im](const httplib::Request& req, httplib::Response& res) {
    const ServerOptions& o = im.st.opts;
    if (!o.cors_origins.empty()) {
      const std::string origin = allowed_origin(o, req);
      if (!origin.empty()) add_cors(origin, res);
    }
  });
  // Statuses no handler wrote a body for (unknown path 404, 413 body too large, 400 bad HTTP).
  svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string msg = res.status == 404 ? "Not Found"
                      : res.status == 413 ? "the request body is larger than the server's limit (--max-body-mb)"
                      : res.status == 400 ? "malformed HTTP request"
                                          : "HTTP " + std::to_string(res.status);
    if (is_openai_path(req.path))
      res.set_content(json{{"error", {{"message", msg}, {"type", "invalid_request_error"}, {"param", json()}, {"code", json()}}}}.dump(),
                      "application/json");
    else
      res.set_content(json{{"detail", msg}}.dump(), "application/json");
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string msg = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      msg = e.what();
    } catch (...) {
    }
    res.status = 500;
    res.set_content(json{{"error", "Exception"}, {"detail", ""}, {"body", ""}, {"errors", msg}}.dump(), "application/json");
  });
  if (opts.log_requests)
    svr.set_logger([](const httplib::Request& req, const httplib::Response& res) {
      if (req.path == "/sdapi/v1/progress") return;  // polled every few hundred ms by UIs
      std::fprintf(stderr, "diffuse serve: %s %s -> %d\n", req.method.c_str(), req.path.c_str(), res.status);
    });

  register_routes(svr, im.st);

  // The checkpoint current at start: --model, else the first one found; loaded in the
  // background (the first request waits for it in queue order).
  auto models = im.st.registry.models();
  if (!models.empty()) {
    const ModelInfo& first = models.front();
    im.st.queue.set_current_model(first);
    auto job = std::make_shared<Job>();
    job->kind = Job::Kind::LoadModel;
    job->model = first;
    im.st.queue.submit(job);
  }
}

Server::~Server() { stop(); }

int Server::bind() {
  Impl& im = *impl_;
  const ServerOptions& o = im.st.opts;
  im.port = o.port == 0 ? im.svr.bind_to_any_port(o.host) : (im.svr.bind_to_port(o.host, o.port) ? o.port : -1);
  DF_CHECK(im.port > 0, "--host ", o.host, " --port ", o.port, ": cannot listen there (in use, or not an address of this machine)");
  if (!widen_listen_backlog(im.port, 1024))
    std::fprintf(stderr, "warning: could not widen the listen backlog; bursts of connections may wait\n");
  return im.port;
}

void Server::run() { impl_->svr.listen_after_bind(); }

void Server::stop() {
  impl_->st.queue.shutdown(true);
  impl_->svr.stop();
}

}  // namespace diffuse::server
