#pragma once

// How many forwards run through a LoRA layer right now, so that changing the
// layer's adapters or weights meanwhile (from another thread) is refused
// instead of racing.

#include <torchlora/detail/check.h>

#include <c10/util/Exception.h>

#include <atomic>
#include <string>

namespace torchlora::detail {

/// A count of running forwards. A copy starts at 0: a cloned layer runs no
/// forward yet.
class ForwardCount {
 public:
  ForwardCount() = default;
  ForwardCount(const ForwardCount& /*other*/) {}
  ForwardCount& operator=(const ForwardCount& /*other*/) {
    return *this;
  }

  /// Counts one forward while it lives.
  class Scope {
   public:
    explicit Scope(const ForwardCount& count) : count_(count) {
      count_.running_.fetch_add(1, std::memory_order_relaxed);
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    ~Scope() {
      count_.running_.fetch_sub(1, std::memory_order_relaxed);
    }

   private:
    const ForwardCount& count_;
  };

  /// The forwards running now (on any thread).
  int running() const {
    return running_.load(std::memory_order_relaxed);
  }

 private:
  mutable std::atomic<int> running_{0};
};

/// Refuses `operation` while `running` forwards run through `layer` (a
/// description: "'0'", "this LoRALinear"): changing its adapters or weights
/// under them would race.
inline void check_no_forward_running(
    int running,
    const char* operation,
    const std::string& layer) {
  TORCHLORA_CHECK(
      running == 0,
      operation,
      " while ",
      running,
      " forward(s) of ",
      layer,
      " are running on other threads; change adapters or merge only while "
      "no forward runs." TORCHLORA_NOTHING_CHANGED);
}

/// Refuses `operation` while `holds` torchlora::AdaptedWeights scopes hold
/// the weight `layer` computes into a LibTorch module's member: the member
/// would keep the adapters from before the change.
inline void check_no_member_hold(
    int holds,
    const char* operation,
    const std::string& layer) {
  TORCHLORA_CHECK(
      holds == 0,
      operation,
      " while a torchlora::AdaptedWeights holds the weight computed for ",
      layer,
      " (",
      holds,
      " scope(s)); change adapters, scales, DisableAdapters or merges before "
      "making the AdaptedWeights or after it ends." TORCHLORA_NOTHING_CHANGED);
}

} // namespace torchlora::detail
