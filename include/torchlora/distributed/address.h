#pragma once

// Which local address a process's Gloo device listens on and tells its
// peers: the one that reaches the others, found without a setting.

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace torchlora {
namespace distributed {
namespace detail {

/// Whether `address` (a name or a numeric address) is this machine's
/// loopback: "localhost", 127.x.y.z, ::1 or ::ffff:127.x.y.z.
inline bool is_loopback_address(const std::string& address) {
  return address == "localhost" || address.rfind("127.", 0) == 0 ||
      address == "::1" || address.rfind("::ffff:127.", 0) == 0;
}

/// The local address the kernel sends from towards `host`:`port` (found
/// with a UDP socket connected there, which sends nothing), in numeric
/// form; "" with `why` saying what failed when there is none.
inline std::string route_source(
    const std::string& host,
    int port,
    std::string* why) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  const int resolved =
      ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (resolved != 0) {
    *why = "cannot resolve " + host + ": " + ::gai_strerror(resolved);
    return "";
  }
  std::string source;
  for (const addrinfo* entry = found; entry != nullptr && source.empty();
       entry = entry->ai_next) {
    const int fd = ::socket(entry->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      *why = std::string("no socket: ") + std::strerror(errno);
      continue;
    }
    sockaddr_storage local{};
    socklen_t length = sizeof(local);
    char text[NI_MAXHOST] = {};
    if (::connect(fd, entry->ai_addr, entry->ai_addrlen) != 0) {
      *why = "no route to " + host + ": " + std::strerror(errno);
    } else if (
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) == 0 &&
        ::getnameinfo(
            reinterpret_cast<sockaddr*>(&local),
            length,
            text,
            sizeof(text),
            nullptr,
            0,
            NI_NUMERICHOST) == 0) {
      source = text;
    }
    ::close(fd);
  }
  ::freeaddrinfo(found);
  return source;
}

} // namespace detail
} // namespace distributed
} // namespace torchlora
