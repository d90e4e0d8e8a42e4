#pragma once

// The c10d pieces torchlora's distributed code stands on, the same on
// LibTorch 1.x and 2.x, and the one place where a failed collective becomes
// a `torchlora:` error that says which rank and what happened.

#include <torchlora/detail/check.h>

#include <c10/util/Exception.h>
#include <torch/version.h>

#if !defined(USE_C10D_GLOO)
#error \
    "torchlora/distributed.h needs LibTorch's c10d with Gloo: link the imported target `torch` (its TorchConfig defines USE_C10D_GLOO) and install Gloo's headers (Debian: libgloo-dev)"
#endif

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <chrono>
#include <exception>
#include <string>

namespace torchlora {
namespace distributed {

#if TORCH_VERSION_MAJOR >= 2
/// The c10d process group type: `c10d::Backend` on LibTorch 2.x (Gloo and
/// NCCL derive from it), `c10d::ProcessGroup` on 1.x.
using ProcessGroup = c10d::Backend;
#else
/// The c10d process group type: `c10d::Backend` on LibTorch 2.x (Gloo and
/// NCCL derive from it), `c10d::ProcessGroup` on 1.x.
using ProcessGroup = c10d::ProcessGroup;
#endif

namespace detail {

/// An exception's message, without the C++ backtrace c10 appends.
inline std::string message_of(const std::exception& error) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&error)) {
    return c10_error->what_without_backtrace();
  }
  return error.what();
}

/// Starts a collective with `start` and waits for it. A failure (a peer that
/// exited or stopped answering within the timeout) is a `torchlora:` error
/// naming this rank, the operation and what c10d reported.
template <typename Start>
void run_collective(
    const c10::intrusive_ptr<ProcessGroup>& group,
    const std::string& rank,
    std::chrono::milliseconds timeout,
    const char* operation,
    Start&& start) {
  TORCHLORA_CHECK(group, operation, " needs a process group; there is none");
  try {
    auto work = start();
    work->wait(timeout);
  } catch (const std::exception& error) {
    TORCHLORA_CHECK(
        false,
        operation,
        " failed on ",
        rank,
        ": a peer process exited or did not answer within ",
        timeout.count(),
        " ms (",
        message_of(error),
        ")");
  }
}

} // namespace detail
} // namespace distributed
} // namespace torchlora
