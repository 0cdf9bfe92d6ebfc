// Telling whether an HTTP client is still there while its request waits for a job.
// cpp-httplib 0.11 (Debian 12) gives a handler no access to its socket, so the socket is found
// by its addresses: among this process's descriptors, the TCP socket whose local and peer
// addresses are the request's. The handler's thread owns that descriptor while it waits, so it
// cannot be closed and reused meanwhile.
#pragma once
#include <string>

namespace diffuse::server {

// The descriptor of the connection (local_addr:local_port ↔ remote_addr:remote_port); -1 when
// none matches (then the client is treated as present).
int find_client_socket(const std::string& local_addr, int local_port, const std::string& remote_addr,
                       int remote_port);

// False once the peer has closed or reset the connection (data it has already sent is left
// unread: a pipelined next request does not count as leaving).
bool client_connected(int fd);

}  // namespace diffuse::server
