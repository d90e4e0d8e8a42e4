#pragma once

// The processes of a data-parallel run, joined the torchrun way: the
// variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, a
// c10d TCPStore on rank 0, and a c10d process group (Gloo for CPU tensors,
// NCCL for CUDA tensors where LibTorch has it).

#include <torchlora/detail/check.h>
#include <torchlora/distributed/address.h>
#include <torchlora/distributed/collective.h>
#include <torchlora/distributed/gloo_address.h>
#include <torchlora/distributed/rendezvous.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/types.h>
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

/// How `init_from_env` joins the processes.
struct InitOptions {
  /// How long any rendezvous or collective may wait for a peer before it
  /// fails with a `torchlora:` error (the store's and the group's timeout):
  /// how long a rank that never starts is waited for, and how long a
  /// collective waits on a peer that is alive but stopped answering. A
  /// peer that exits or fails is noticed sooner: while the group forms, by
  /// its published reason or within 10 s of its last heartbeat (rank 0:
  /// of its store's last answer); afterwards, by its closed connections. 5
  /// minutes by default: longer than any pause between two steps of one rank (a
  /// checkpoint written by rank 0, an evaluation), short enough not to hold a
  /// machine for long. Raise it when one rank works alone for longer while the
  /// others wait.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::minutes(5);
  /// Where the tensors to communicate live: CPU tensors use Gloo, CUDA
  /// tensors NCCL (an error where this LibTorch was built without NCCL).
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);
};

class World;
World init_from_env(const InitOptions& options);

/// This process's place among the processes of a run: its rank, their
/// number, and (when there are several) the c10d store and process group
/// that join them. A default-constructed World is a single process: every
/// collective is then a no-op. Copies share the same group.
class World {
 public:
  World() = default;

  /// This process's rank, 0 to world_size() - 1.
  int rank() const {
    return rank_;
  }
  /// How many processes the run has.
  int world_size() const {
    return world_size_;
  }
  /// This process's rank on its machine (LOCAL_RANK): the GPU to use.
  int local_rank() const {
    return local_rank_;
  }
  /// Whether this is rank 0, the one process that writes files.
  bool is_main() const {
    return rank_ == 0;
  }
  /// Whether there are several processes (and so a group).
  bool is_distributed() const {
    return world_size_ > 1;
  }
  /// The timeout of the store and of every collective.
  std::chrono::milliseconds timeout() const {
    return timeout_;
  }
  /// The c10d store of the rendezvous (null for a single process).
  const c10::intrusive_ptr<c10d::Store>& store() const {
    return store_;
  }
  /// The c10d process group, for collectives of your own (null for a single
  /// process). `c10d::ProcessGroup` on LibTorch 1.x, `c10d::Backend` on 2.x.
  const c10::intrusive_ptr<ProcessGroup>& group() const {
    return group_;
  }
  /// "rank 1 of 2", as errors say it.
  std::string describe() const {
    return "rank " + std::to_string(rank_) + " of " +
        std::to_string(world_size_);
  }
  /// Waits until every process reaches it (no-op for a single process).
  void barrier() const {
    if (!is_distributed()) {
      return;
    }
    detail::run_collective(group_, describe(), timeout_, "a barrier", [&] {
      return group_->barrier();
    });
  }

 private:
  friend World init_from_env(const InitOptions& options);

  int rank_ = 0;
  int world_size_ = 1;
  int local_rank_ = 0;
  std::chrono::milliseconds timeout_ = std::chrono::minutes(5);
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<ProcessGroup> group_;
};

namespace detail {

/// The integer in the variable `name`, within [low, high]; an error that
/// names the variable, the range and the text received otherwise.
inline int integer_variable(
    const char* name,
    const std::string& text,
    int low,
    int high,
    const std::string& why = "") {
  std::size_t used = 0;
  long value = 0;
  bool parsed = !text.empty();
  try {
    value = parsed ? std::stol(text, &used, 10) : 0;
  } catch (const std::exception&) {
    parsed = false;
  }
  parsed = parsed && used == text.size();
  TORCHLORA_CHECK(
      parsed && value >= low && value <= high,
      name,
      " must be an integer from ",
      low,
      " to ",
      high,
      why,
      ", got '",
      text,
      "'");
  return static_cast<int>(value);
}

/// Options of the TCPStore: rank 0 serves it; the ranks then meet through
/// an InitRendezvous, which names the missing ones.
inline c10d::TCPStoreOptions store_options(
    int rank,
    int world_size,
    int port,
    std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(port);
  options.isServer = rank == 0;
  options.numWorkers = static_cast<std::size_t>(world_size);
  options.waitWorkers = false;
  options.timeout = timeout;
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  // From 2.4 the store defaults to libuv, which Debian's LibTorch lacks;
  // the classic server does the same job.
  options.useLibUV = false;
#endif
  return options;
}

} // namespace detail

/// Joins the processes of a run started the torchrun way
/// (`torchrun --no-python --nproc-per-node 2 program ...`, or
/// `scripts/launch.sh 2 program ...`): reads RANK, WORLD_SIZE, LOCAL_RANK,
/// MASTER_ADDR and MASTER_PORT, makes the store (served by rank 0) and the
/// process group. WORLD_SIZE unset or 1 is a single process that never
/// communicates. A peer that does not arrive within the timeout is a
/// `torchlora:` error, as is a variable that is missing or out of range.
///
/// The store trusts whoever connects to it. With MASTER_ADDR on the
/// loopback (127.0.0.1, localhost) nothing leaves the machine (LibTorch 2.4
/// and later also bind the store to the loopback; 1.x's store listens on
/// every interface, so keep the port behind a firewall there). Across
/// machines, run on a network you trust.
inline World init_from_env(const InitOptions& options = {}) {
  TORCHLORA_CHECK(
      options.timeout().count() > 0,
      "InitOptions timeout must be positive, got ",
      options.timeout().count(),
      " ms");
  constexpr int kMaxProcesses = 1 << 20;
  const auto start = std::chrono::steady_clock::now();
  World world;
  world.timeout_ = options.timeout();
  const auto size_text = detail::environment_variable("WORLD_SIZE");
  world.world_size_ = size_text
      ? detail::integer_variable("WORLD_SIZE", *size_text, 1, kMaxProcesses)
      : 1;
  const auto rank_text = detail::environment_variable("RANK");
  TORCHLORA_CHECK(
      rank_text || world.world_size_ == 1,
      "RANK is not set but WORLD_SIZE is ",
      world.world_size_,
      ": start the processes with torchrun or scripts/launch.sh");
  const std::string of_size =
      " (WORLD_SIZE is " + std::to_string(world.world_size_) + ")";
  world.rank_ = rank_text
      ? detail::integer_variable(
            "RANK", *rank_text, 0, world.world_size_ - 1, of_size)
      : 0;
  const auto local_text = detail::environment_variable("LOCAL_RANK");
  world.local_rank_ = local_text
      ? detail::integer_variable("LOCAL_RANK", *local_text, 0, kMaxProcesses)
      : world.rank_;
  const bool cuda = options.device().is_cuda();
  TORCHLORA_CHECK(
      cuda || options.device().is_cpu(),
      "init_from_env communicates CPU tensors (Gloo) or CUDA "
      "tensors (NCCL), got device ",
      options.device().str());
  if (!world.is_distributed()) {
    return world;
  }
#if !defined(USE_C10D_NCCL)
  TORCHLORA_CHECK(
      !cuda,
      "device ",
      options.device().str(),
      " needs NCCL, and this LibTorch was built without it "
      "(USE_C10D_NCCL is not defined); communicate CPU tensors with Gloo "
      "(InitOptions().device(torch::kCPU)) or use a CUDA build of LibTorch");
#endif
  const auto address = detail::environment_variable("MASTER_ADDR");
  TORCHLORA_CHECK(
      address && !address->empty(),
      "MASTER_ADDR is not set",
      of_size,
      ": set it to rank 0's address, as torchrun does");
  std::string unresolved;
  TORCHLORA_CHECK(
      !detail::route_source(*address, 1, &unresolved).empty() ||
          unresolved.rfind("cannot resolve", 0) != 0,
      "MASTER_ADDR '",
      *address,
      "' is not an address this machine can resolve (",
      unresolved,
      "): set it to rank 0's address");
  const auto port_text = detail::environment_variable("MASTER_PORT");
  TORCHLORA_CHECK(
      port_text,
      "MASTER_PORT is not set",
      of_size,
      ": set it to a free port on rank 0's machine, as torchrun does");
  const int port =
      detail::integer_variable("MASTER_PORT", *port_text, 1, 65535);

  auto store_options = detail::store_options(
      world.rank_, world.world_size_, port, world.timeout_);
#if TORCH_VERSION_MAJOR > 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  if (world.rank_ == 0 && detail::is_loopback_address(*address)) {
    store_options.masterListenFd =
        detail::loopback_listening_socket(*address, port);
  }
#endif
  // Two connections to the store: the group's (the World's), and one for
  // the meeting, so that its heartbeats go on while c10d's constructor
  // waits on the other (a TCPStore serves one operation at a time).
  c10::intrusive_ptr<c10d::Store> meeting_store;
  try {
    world.store_ = c10::make_intrusive<c10d::TCPStore>(*address, store_options);
    auto client_options = detail::store_options(
        /*rank=*/1, world.world_size_, port, world.timeout_);
    meeting_store =
        c10::make_intrusive<c10d::TCPStore>(*address, client_options);
  } catch (const std::exception& error) {
    TORCHLORA_CHECK(
        false,
        world.describe(),
        " could not ",
        world.rank_ == 0 ? "serve" : "join",
        " the store at ",
        *address,
        ":",
        port,
        ": ",
        detail::message_of(error),
        " (rank 0 serves it there and must be able to listen on that port; "
        "the others wait for it up to the InitOptions timeout, ",
        world.timeout_.count(),
        " ms)");
  }
  const std::string store_name = *address + ":" + std::to_string(port);
  detail::InitRendezvous rendezvous(
      meeting_store,
      world.rank_,
      world.world_size_,
      world.timeout_,
      start + world.timeout_,
      world.describe(),
      store_name);
  std::string advertised = "its NCCL address";
  std::vector<std::string> joined; // what every rank communicates from
  try {
    const auto store = world.store_;
    const int rank = world.rank_;
    const int size = world.world_size_;
    const auto timeout = world.timeout_;
    if (cuda) {
#if defined(USE_C10D_NCCL)
      rendezvous.join("nccl");
      world.group_ =
          rendezvous.while_watching<c10::intrusive_ptr<ProcessGroup>>(
              [store, rank, size, timeout] {
                auto nccl = c10d::ProcessGroupNCCL::Options::create();
                nccl->timeout = timeout;
                return c10::intrusive_ptr<ProcessGroup>(
                    c10::make_intrusive<c10d::ProcessGroupNCCL>(
                        store, rank, size, nccl));
              });
#endif
    } else {
      auto chosen = detail::choose_gloo_address(*address, port);
      advertised = chosen.describe();
      // A bad GLOO_SOCKET_IFNAME fails here, before the others wait on it.
      auto device =
          chosen.interface.empty() ? nullptr : detail::gloo_device(chosen);
      joined = rendezvous.join(
          chosen.interface.empty() ? "host " + chosen.host
                                   : "interface " + chosen.interface);
      detail::reach_the_others(chosen, joined, port);
      advertised = chosen.describe();
      if (!device) {
        device = detail::gloo_device(chosen);
      }
      std::clog << TORCHLORA_PREFIX << world.describe() << " communicates from "
                << advertised << "\n";
      world.group_ =
          rendezvous.while_watching<c10::intrusive_ptr<ProcessGroup>>(
              [store, rank, size, timeout, device] {
                auto gloo = c10d::ProcessGroupGloo::Options::create(timeout);
                gloo->devices.push_back(device);
                return c10::intrusive_ptr<ProcessGroup>(
                    c10::make_intrusive<c10d::ProcessGroupGloo>(
                        store, rank, size, gloo));
              });
    }
    rendezvous.finish(); // best effort: this rank's group is made
  } catch (const std::exception& error) {
    auto message = detail::message_of(error);
    if (message.rfind(TORCHLORA_PREFIX, 0) != 0) {
      message = TORCHLORA_PREFIX + world.describe() +
          " could not make its process group: " + message +
          " (this rank communicates from " + advertised + ";" +
          detail::list_addresses(joined) +
          (detail::mentions_loopback(advertised, joined)
               ? " a rank on another machine cannot reach a loopback "
                 "address: set GLOO_SOCKET_IFNAME to the network interface "
                 "that reaches the other ranks, or unset it to use the "
                 "address that routes to MASTER_ADDR)"
               : " GLOO_SOCKET_IFNAME chooses the network interface)");
    }
    rendezvous.publish_failure(message);
    TORCH_CHECK(false, message);
  }
  return world;
}

} // namespace distributed
} // namespace torchlora
