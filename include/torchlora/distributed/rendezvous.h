#pragma once

// How init_from_env's processes find each other through the store before
// their process group exists, so that a rank that fails, dies or never
// comes is noticed by the others soon, with its reason, instead of when
// the whole timeout has passed.

#include <torchlora/distributed/collective.h>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace torchlora {
namespace distributed {
namespace detail {

/// A rank that joined and then showed no sign of life for this long has
/// exited or is stopped: the others give up on it.
constexpr std::chrono::seconds kSilenceLimit{10};

/// One run of init_from_env's meeting in the store. Every rank publishes
/// that it joined (with a value: the address it communicates from), then
/// keeps a heartbeat while it waits, first for every rank to join, then
/// for its process group to form. Meanwhile it watches for a failure that
/// another rank published, for a joined rank whose heartbeat stopped, and
/// for the timeout, which names the ranks that never joined.
class InitRendezvous {
 public:
  using Clock = std::chrono::steady_clock;

  /// `who` is "rank 1 of 2"; `store_name` is where rank 0 serves the store.
  InitRendezvous(
      c10::intrusive_ptr<c10d::Store> store,
      int rank,
      int world_size,
      std::chrono::milliseconds timeout,
      std::string who,
      std::string store_name)
      : store_(std::move(store)),
        rank_(rank),
        world_size_(world_size),
        timeout_(timeout),
        who_(std::move(who)),
        store_name_(std::move(store_name)),
        beats_(static_cast<std::size_t>(world_size), -1),
        changed_(static_cast<std::size_t>(world_size), Clock::now()) {}

  /// Publishes `value` as this rank's, then waits until every rank has
  /// joined and returns their values, by rank.
  std::vector<std::string> join(const std::string& value) {
    store_call("join", [&] {
      store_->set(key("joined", rank_), bytes(value));
      store_->add(key("beat", rank_), 1);
      store_->add(kCount, 1);
    });
    const auto deadline = Clock::now() + timeout_;
    while (store_call("count the joined ranks", [&] {
             return store_->add(kCount, 0);
           }) < world_size_) {
      TORCH_CHECK(
          Clock::now() < deadline,
          "torchlora: ",
          who_,
          " could not make its process group: ",
          missing_ranks(),
          " within ",
          timeout_.count(),
          " ms (InitOptions timeout); start every process, with the same "
          "MASTER_ADDR, MASTER_PORT and WORLD_SIZE");
      std::this_thread::sleep_for(kPoll);
      watch();
    }
    std::vector<std::string> values;
    for (int rank = 0; rank < world_size_; ++rank) {
      const auto value = store_call("read the joined ranks", [&] {
        return store_->get(key("joined", rank));
      });
      values.emplace_back(value.begin(), value.end());
    }
    return values;
  }

  /// Runs `make` (which must own what it uses) on a thread of its own and
  /// returns its result, while this rank keeps its heartbeat and watches
  /// the others. When another rank fails or falls silent first, this
  /// throws and leaves `make` to end on its own (c10d's constructors cannot
  /// be interrupted; they end at their timeout).
  template <typename Result>
  Result while_watching(std::function<Result()> make) {
    struct Outcome {
      std::mutex mutex;
      std::condition_variable finished;
      bool done = false;
      Result value;
      std::exception_ptr error;
    };
    auto outcome = std::make_shared<Outcome>();
    std::thread([outcome, make = std::move(make)] {
      Result value;
      std::exception_ptr error;
      try {
        value = make();
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(outcome->mutex);
      outcome->value = std::move(value);
      outcome->error = error;
      outcome->done = true;
      outcome->finished.notify_all();
    }).detach();
    while (true) {
      {
        std::unique_lock<std::mutex> lock(outcome->mutex);
        if (outcome->finished.wait_for(
                lock, kPoll, [&] { return outcome->done; })) {
          if (outcome->error) {
            std::rethrow_exception(outcome->error);
          }
          return std::move(outcome->value);
        }
      }
      watch();
    }
  }

  /// Tells the others that this rank is done with the meeting.
  void finish() {
    store_call(
        "finish", [&] { store_->set(key("formed", rank_), bytes("1")); });
  }

  /// Tells the others why this rank failed (unless a failure is already
  /// published: the first one is the cause). Rank 0, whose process serves
  /// the store, then waits up to 2 s for the others to read it. Never
  /// throws.
  void publish_failure(const std::string& reason) noexcept {
    try {
      if (!store_->check({kFailed})) {
        store_->set(
            kFailed,
            bytes("rank " + std::to_string(rank_) + " failed: " + reason));
      }
      if (!knows_of_failure_) {
        knows_of_failure_ = true;
        store_->add(kSeen, 1);
      }
      const auto deadline = Clock::now() + std::chrono::seconds(2);
      while (rank_ == 0 && Clock::now() < deadline &&
             store_->add(kSeen, 0) < store_->add(kCount, 0)) {
        std::this_thread::sleep_for(kPoll);
      }
    } catch (...) {
      // The store is gone too: the others notice that by themselves.
    }
  }

 private:
  static constexpr std::chrono::milliseconds kPoll{50};
  static constexpr const char* kFailed = "torchlora/init/failed";
  /// How many ranks joined, and how many know of the published failure.
  static constexpr const char* kCount = "torchlora/init/count";
  static constexpr const char* kSeen = "torchlora/init/seen";

  static std::string key(const char* what, int rank) {
    return std::string("torchlora/init/") + what + "/" + std::to_string(rank);
  }
  static std::vector<uint8_t> bytes(const std::string& text) {
    return std::vector<uint8_t>(text.begin(), text.end());
  }

  /// Runs a store operation; the store's failure (its server, rank 0, is
  /// gone) becomes a `torchlora:` error.
  template <typename Operation>
  auto store_call(const char* what, Operation&& operation)
      -> decltype(operation()) {
    try {
      return operation();
    } catch (const std::exception& error) {
      TORCH_CHECK(
          false,
          "torchlora: ",
          who_,
          " could not make its process group: it lost the store at ",
          store_name_,
          " while it tried to ",
          what,
          " (rank 0, which serves it, exited or stopped answering): ",
          message_of(error));
    }
  }

  /// One heartbeat; an error when another rank published a failure or,
  /// checked once a second, when a joined rank fell silent.
  void watch() {
    store_call(
        "keep its heartbeat", [&] { store_->add(key("beat", rank_), 1); });
    const bool failed = store_call(
        "look for failures", [&] { return store_->check({kFailed}); });
    if (failed) {
      const auto reason =
          store_call("read a failure", [&] { return store_->get(kFailed); });
      knows_of_failure_ = true;
      store_call("read a failure", [&] { return store_->add(kSeen, 1); });
      TORCH_CHECK(
          false,
          "torchlora: ",
          who_,
          " could not make its process group because ",
          std::string(reason.begin(), reason.end()));
    }
    const auto now = Clock::now();
    if (now - last_check_ < std::chrono::seconds(1)) {
      return;
    }
    last_check_ = now;
    for (int rank = 0; rank < world_size_; ++rank) {
      const auto index = static_cast<std::size_t>(rank);
      const bool watched = rank != rank_ && store_call("watch the others", [&] {
                             return store_->check({key("joined", rank)}) &&
                                 !store_->check({key("formed", rank)});
                           });
      if (!watched) {
        changed_[index] = now;
        continue;
      }
      const auto beats = store_call("watch the others", [&] {
        return store_->add(key("beat", rank), 0);
      });
      if (beats != beats_[index]) {
        beats_[index] = beats;
        changed_[index] = now;
        continue;
      }
      TORCH_CHECK(
          now - changed_[index] < kSilenceLimit,
          "torchlora: ",
          who_,
          " could not make its process group: rank ",
          rank,
          " joined and then gave no sign of life for ",
          kSilenceLimit.count(),
          " s (it exited, was killed or is stopped)");
    }
  }

  /// "rank 2 did not join" or "ranks 1, 3 did not join" (at most 16 named).
  std::string missing_ranks() {
    std::vector<int> missing;
    for (int rank = 0; rank < world_size_; ++rank) {
      const bool joined = store_call("list the missing ranks", [&] {
        return store_->check({key("joined", rank)});
      });
      if (!joined) {
        missing.push_back(rank);
      }
    }
    std::string text = missing.size() == 1 ? "rank " : "ranks ";
    for (std::size_t i = 0; i < missing.size() && i < 16; ++i) {
      text += (i == 0 ? "" : ", ") + std::to_string(missing[i]);
    }
    if (missing.size() > 16) {
      text += " and " + std::to_string(missing.size() - 16) + " more";
    }
    return text + " did not join";
  }

  c10::intrusive_ptr<c10d::Store> store_;
  int rank_;
  int world_size_;
  std::chrono::milliseconds timeout_;
  std::string who_;
  std::string store_name_;
  std::vector<int64_t> beats_;
  std::vector<Clock::time_point> changed_;
  Clock::time_point last_check_ = Clock::now();
  bool knows_of_failure_ = false;
};

} // namespace detail
} // namespace distributed
} // namespace torchlora
