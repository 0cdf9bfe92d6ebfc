// Finding a request's socket by its addresses and polling it for a hang-up (client_socket.h).
#include "server/client_socket.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstdlib>
#include <cstring>

namespace diffuse::server {
namespace {

// "a.b.c.d" / "::1" and a port → whether the sockaddr is that address.
bool same_endpoint(const sockaddr_storage& sa, const std::string& addr, int port) {
  char buf[INET6_ADDRSTRLEN] = {};
  int p = -1;
  if (sa.ss_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(&sa);
    inet_ntop(AF_INET, &in->sin_addr, buf, sizeof buf);
    p = ntohs(in->sin_port);
  } else if (sa.ss_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(&sa);
    inet_ntop(AF_INET6, &in6->sin6_addr, buf, sizeof buf);
    p = ntohs(in6->sin6_port);
    // An IPv4 peer on a dual-stack socket reads "::ffff:a.b.c.d".
    if (addr == buf + (std::strncmp(buf, "::ffff:", 7) == 0 ? 7 : 0) && p == port) return true;
  } else {
    return false;
  }
  return addr == buf && p == port;
}

}  // namespace

int find_client_socket(const std::string& local_addr, int local_port, const std::string& remote_addr,
                       int remote_port) {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return -1;
  int found = -1;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end) continue;
    sockaddr_storage peer{}, self{};
    socklen_t pl = sizeof peer, sl = sizeof self;
    if (getpeername(int(fd), reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    if (getsockname(int(fd), reinterpret_cast<sockaddr*>(&self), &sl) != 0) continue;
    if (same_endpoint(peer, remote_addr, remote_port) && same_endpoint(self, local_addr, local_port)) {
      found = int(fd);
      break;
    }
  }
  closedir(d);
  return found;
}

bool client_connected(int fd) {
  if (fd < 0) return true;
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return true;  // nothing happened
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return false;
  if (p.revents & POLLIN) {  // readable: either more data (still there) or end of stream
    char c;
    const ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n != 0;
  }
  return true;
}

}  // namespace diffuse::server
