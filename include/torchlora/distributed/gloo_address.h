#pragma once

// Which address the Gloo transport of each rank uses (GLOO_SOCKET_IFNAME,
// or the address it joined with) and the loopback listening socket of a
// local run's store. Not part of the API.

#include <torchlora/detail/check.h>
#include <torchlora/distributed/address.h>
#include <torchlora/distributed/collective.h>
#include <torchlora/distributed/rendezvous.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/version.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#if defined(USE_C10D_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace distributed {
namespace detail {

inline std::optional<std::string> environment_variable(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) {
    return std::nullopt;
  }
  return std::string(value);
}

#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
/// A listening socket on `host` (a loopback address) at `port`, handed to
/// the store so that a
/// local run is not reachable from other machines (LibTorch 1.x's store
/// listens on every interface and has no option for it).
inline int loopback_listening_socket(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int resolved =
      ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  TORCHLORA_CHECK(
      resolved == 0 && found != nullptr,
      "rank 0 could not resolve MASTER_ADDR '",
      host,
      "' to listen on for the store: ",
      ::gai_strerror(resolved));
  // The address clients will connect to: the first one the name gives.
  const int fd = ::socket(
      found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, found->ai_protocol);
  std::string reason = fd < 0 ? std::strerror(errno) : "";
  if (fd >= 0) {
    const int yes = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    if (::bind(fd, found->ai_addr, found->ai_addrlen) != 0 ||
        ::listen(fd, 128) != 0) {
      reason = std::strerror(errno);
      ::close(fd);
    }
  }
  ::freeaddrinfo(found);
  TORCHLORA_CHECK(
      reason.empty(),
      "rank 0 could not listen on ",
      host,
      ":",
      port,
      " (MASTER_ADDR:MASTER_PORT) for the store: ",
      reason);
  return fd;
}
#endif

/// Where this rank's Gloo device listens, and why: the interface
/// GLOO_SOCKET_IFNAME names, else the local address that routes to
/// MASTER_ADDR (the loopback when MASTER_ADDR is on it).
struct GlooAddress {
  std::string interface; ///< GLOO_SOCKET_IFNAME, if set
  std::string host; ///< otherwise: the numeric address to listen on
  std::string why; ///< how it was chosen, for the log and errors

  std::string describe() const {
    return (interface.empty() ? host : "interface " + interface) + " (" + why +
        ")";
  }
};

inline GlooAddress choose_gloo_address(
    const std::string& master_address,
    int master_port) {
  GlooAddress chosen;
  if (const auto interface = environment_variable("GLOO_SOCKET_IFNAME")) {
    chosen.interface = *interface;
    chosen.why = "GLOO_SOCKET_IFNAME";
    return chosen;
  }
  std::string failure;
  chosen.host = route_source(master_address, master_port, &failure);
  TORCHLORA_CHECK(
      !chosen.host.empty(),
      "found no local address that reaches MASTER_ADDR ",
      master_address,
      " (",
      failure,
      "); set GLOO_SOCKET_IFNAME to the network interface to use");
  chosen.why = "the local address that routes to MASTER_ADDR " +
      master_address + "; GLOO_SOCKET_IFNAME overrides it";
  return chosen;
}

/// Rank 0 runs where MASTER_ADDR is, so its route there may be the
/// loopback (a host name that resolves to 127.0.1.1 on its own machine)
/// even when the others are elsewhere: it then takes the route towards
/// the first rank that is not on the loopback.
inline void reach_the_others(
    GlooAddress& chosen,
    const std::vector<std::string>& joined,
    int port) {
  if (!chosen.interface.empty() || !is_loopback_address(chosen.host)) {
    return;
  }
  for (std::size_t rank = 0; rank < joined.size(); ++rank) {
    const auto& other = joined[rank];
    if (other.rfind("host ", 0) != 0 || is_loopback_address(other.substr(5))) {
      continue;
    }
    std::string failure;
    const auto source = route_source(other.substr(5), port, &failure);
    if (!source.empty() && !is_loopback_address(source)) {
      chosen.why = "the local address that routes to rank " +
          std::to_string(rank) + " at " + other.substr(5) +
          ", as MASTER_ADDR is on the loopback here; GLOO_SOCKET_IFNAME "
          "overrides it";
      chosen.host = source;
    }
    return;
  }
}

/// " rank 0 from host 10.0.0.1, rank 1 from interface lo;" (the first
/// 8 ranks), or "" before the ranks have met.
inline std::string list_addresses(const std::vector<std::string>& joined) {
  std::string text;
  for (std::size_t rank = 0; rank < joined.size() && rank < 8; ++rank) {
    text += (rank == 0 ? " rank 0 from "
                       : ", rank " + std::to_string(rank) + " from ") +
        joined[rank];
  }
  return text.empty() ? text : text + ";";
}

/// Whether this rank's or any joined rank's address is on the loopback
/// (a host 127.x or ::1, or the interface "lo").
inline bool mentions_loopback(
    const std::string& advertised,
    const std::vector<std::string>& joined) {
  auto loopback = [](const std::string& text) {
    return text.rfind("interface lo", 0) == 0 ||
        (text.rfind("host ", 0) == 0 && is_loopback_address(text.substr(5))) ||
        is_loopback_address(text);
  };
  return loopback(advertised) ||
      std::any_of(joined.begin(), joined.end(), loopback);
}

inline std::shared_ptr<::gloo::transport::Device> gloo_device(
    const GlooAddress& chosen) {
  if (!chosen.interface.empty()) {
    return c10d::ProcessGroupGloo::createDeviceForInterface(chosen.interface);
  }
  return c10d::ProcessGroupGloo::createDeviceForHostname(chosen.host);
}

} // namespace detail
} // namespace distributed
} // namespace torchlora
