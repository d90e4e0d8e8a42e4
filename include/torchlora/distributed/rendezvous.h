#pragma once

// How init_from_env's processes find each other through the store before
// their process group exists, so that a rank that fails, dies or never
// comes is noticed by the others soon, with its reason, instead of when
// the whole timeout has passed.

#include <torchlora/detail/check.h>
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
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace torchlora {
namespace distributed {
namespace detail {

/// A rank that joined and then showed no sign of life for this long has
/// exited or is stopped: the others give up on it. A store operation that
/// gets no answer for this long means the same of rank 0, which serves it.
constexpr std::chrono::seconds kSilenceLimit{10};

/// How often a waiting rank beats and looks at the others.
constexpr std::chrono::milliseconds kPoll{50};

/// Runs `work` (which must own everything it uses) on a detached thread
/// and returns its result or rethrows its error. While it runs, `each_poll`
/// is called every kPoll; when that throws, the error goes to the caller
/// and `work` is left to end on its own (c10d's constructors and a
/// TCPStore's reads cannot be interrupted).
template <typename Result>
Result run_detached(
    std::function<Result()> work,
    const std::function<void()>& each_poll) {
  struct Outcome {
    std::mutex mutex;
    std::condition_variable finished;
    bool done = false;
    std::optional<Result> value;
    std::exception_ptr error;
  };
  auto outcome = std::make_shared<Outcome>();
  std::thread([outcome, work = std::move(work)] {
    std::optional<Result> value;
    std::exception_ptr error;
    try {
      value = work();
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
        return std::move(*outcome->value);
      }
    }
    each_poll();
  }
}

/// One run of init_from_env's meeting in the store. Every rank claims its
/// rank number (a number claimed twice is an error), publishes that it
/// joined (with its WORLD_SIZE and the address it communicates from), then
/// keeps a heartbeat while it waits, first for every rank to join, then
/// for its process group to form. Meanwhile it watches for a failure that
/// another rank published, for a joined rank whose heartbeat stopped, for
/// a store that stopped answering, and for the deadline, at which it names
/// the ranks that never joined. Every store operation is bounded in time.
class InitRendezvous {
 public:
  using Clock = std::chrono::steady_clock;

  /// `who` is "rank 1 of 2"; `store_name` is where rank 0 serves the store;
  /// every rank must have joined by `deadline` (`timeout` after the start).
  InitRendezvous(
      c10::intrusive_ptr<c10d::Store> store,
      int rank,
      int world_size,
      std::chrono::milliseconds timeout,
      Clock::time_point deadline,
      std::string who,
      std::string store_name)
      : store_(std::move(store)),
        rank_(rank),
        world_size_(world_size),
        timeout_(timeout),
        deadline_(deadline),
        who_(std::move(who)),
        store_name_(std::move(store_name)),
        beats_(static_cast<std::size_t>(world_size), -1),
        changed_(static_cast<std::size_t>(world_size), Clock::now()) {}

  /// Publishes `value` as this rank's, then waits until every rank has
  /// joined and returns their values, by rank.
  std::vector<std::string> join(const std::string& value) {
    fail_unless(
        add(key("claim", rank_), 1, "claim its rank") == 1,
        "rank " + std::to_string(rank_) +
            " was started twice: two processes have RANK=" +
            std::to_string(rank_) +
            " (each needs its own, from 0 to WORLD_SIZE - 1; with "
            "scripts/launch.sh, give every machine the same N and its own "
            "--node-rank)");
    set(key("joined", rank_), std::to_string(world_size_) + " " + value);
    add(key("beat", rank_), 1, "join");
    add(kCount, 1, "join");
    joined_ = true;
    int64_t joined = 0;
    while ((joined = add(kCount, 0, "count the joined ranks")) < world_size_) {
      TORCHLORA_CHECK(
          Clock::now() < deadline_,
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
    fail_unless(
        joined == world_size_,
        std::to_string(joined) + " processes joined a run of WORLD_SIZE " +
            std::to_string(world_size_) +
            ": the processes were given different WORLD_SIZEs (or another "
            "run uses the same MASTER_PORT)");
    std::vector<std::string> values;
    for (int rank = 0; rank < world_size_; ++rank) {
      const auto text = get(key("joined", rank), "read the joined ranks");
      const auto space = text.find(' ');
      const auto size = text.substr(0, space);
      fail_unless(
          size == std::to_string(world_size_),
          "WORLD_SIZE is " + std::to_string(world_size_) + " here and " + size +
              " on rank " + std::to_string(rank) +
              " (every process must be given the same)");
      values.push_back(
          space == std::string::npos ? "" : text.substr(space + 1));
    }
    return values;
  }

  /// Runs `make` (which must own what it uses) on a thread of its own and
  /// returns its result, while this rank keeps its heartbeat and watches
  /// the others. When another rank fails or falls silent first, this
  /// throws and leaves `make` to end on its own, at its timeout.
  template <typename Result>
  Result while_watching(std::function<Result()> make) {
    return run_detached<Result>(std::move(make), [this] { watch(); });
  }

  /// Tells the others that this rank is done with the meeting. Never
  /// throws: this rank's group is made, and a rank 0 that has already
  /// exited (a short program) is no failure of this one.
  void finish() noexcept {
    try {
      set(key("formed", rank_), "1");
    } catch (...) {
    }
  }

  /// Tells the others why this rank failed (unless a failure is already
  /// published: the first one is the cause). Rank 0, whose process serves
  /// the store, then waits up to 2 s for the others to read it. Never
  /// throws.
  void publish_failure(const std::string& reason) noexcept {
    if (store_silent_) {
      return; // nobody would read it
    }
    try {
      if (!has(kFailed, "publish its failure")) {
        set(kFailed, "rank " + std::to_string(rank_) + " failed: " + reason);
      }
      // Only joined ranks count as knowing: rank 0 waits for as many as
      // joined.
      if (!knows_of_failure_ && joined_) {
        knows_of_failure_ = true;
        add(kSeen, 1, "publish its failure");
      }
      const auto deadline = Clock::now() + std::chrono::seconds(2);
      while (rank_ == 0 && Clock::now() < deadline &&
             add(kSeen, 0, "wait") < add(kCount, 0, "wait")) {
        std::this_thread::sleep_for(kPoll);
      }
    } catch (...) {
      // The store is gone too: the others notice that by themselves.
    }
  }

 private:
  static constexpr const char* kFailed = "torchlora/init/failed";
  /// How many ranks joined, and how many know of the published failure.
  static constexpr const char* kCount = "torchlora/init/count";
  static constexpr const char* kSeen = "torchlora/init/seen";

  static std::string key(const char* what, int rank) {
    return std::string("torchlora/init/") + what + "/" + std::to_string(rank);
  }

  /// Unless `ok`: publishes `problem` as this rank's failure and throws it.
  void fail_unless(bool ok, const std::string& problem) {
    if (!ok) {
      const auto message = TORCHLORA_PREFIX + who_ +
          " could not make its process group: " + problem;
      publish_failure(message);
      TORCH_CHECK(false, message);
    }
  }

  /// Runs a store operation, bounded in time: a store that is gone (rank 0
  /// exited) or gives no answer for kSilenceLimit (rank 0 is stopped, or
  /// the network is down) is a `torchlora:` error.
  template <typename Result>
  Result store_call(const char* what, std::function<Result()> operation) {
    const auto limit = Clock::now() + kSilenceLimit;
    bool silent = false;
    try {
      return run_detached<Result>(std::move(operation), [&] {
        if (Clock::now() >= limit) {
          silent = true;
          store_silent_ = true;
          throw std::runtime_error("no answer");
        }
      });
    } catch (const std::exception& error) {
      TORCHLORA_CHECK(
          !silent,
          who_,
          " could not make its process group: rank 0, which serves the store "
          "at ",
          store_name_,
          ", gave no answer for ",
          kSilenceLimit.count(),
          " s when this rank tried to ",
          what,
          " (it is stopped, or the network between them is down)");
      TORCHLORA_CHECK(
          false,
          who_,
          " could not make its process group: it lost the store at ",
          store_name_,
          " when it tried to ",
          what,
          " (rank 0, which serves it, exited or stopped answering): ",
          message_of(error));
    }
  }
  int64_t add(const std::string& name, int64_t amount, const char* what) {
    auto store = store_;
    return store_call<int64_t>(
        what, [store, name, amount] { return store->add(name, amount); });
  }
  bool has(const std::string& name, const char* what) {
    auto store = store_;
    return store_call<bool>(
        what, [store, name] { return store->check({name}); });
  }
  std::string get(const std::string& name, const char* what) {
    auto store = store_;
    const auto bytes = store_call<std::vector<uint8_t>>(
        what, [store, name] { return store->get(name); });
    return std::string(bytes.begin(), bytes.end());
  }
  void set(const std::string& name, const std::string& text) {
    auto store = store_;
    store_call<bool>("publish", [store, name, text] {
      store->set(name, std::vector<uint8_t>(text.begin(), text.end()));
      return true;
    });
  }

  /// One heartbeat; an error when another rank published a failure or,
  /// checked once a second, when a joined rank fell silent.
  void watch() {
    add(key("beat", rank_), 1, "keep its heartbeat");
    if (has(kFailed, "look for failures")) {
      const auto reason = get(kFailed, "read a failure");
      knows_of_failure_ = true;
      add(kSeen, 1, "read a failure");
      TORCHLORA_CHECK(
          false, who_, " could not make its process group because ", reason);
    }
    const auto now = Clock::now();
    if (now - last_check_ < std::chrono::seconds(1)) {
      return;
    }
    last_check_ = now;
    for (int rank = 0; rank < world_size_; ++rank) {
      const auto index = static_cast<std::size_t>(rank);
      const bool watched = rank != rank_ &&
          has(key("joined", rank), "watch the others") &&
          !has(key("formed", rank), "watch the others");
      if (!watched) {
        changed_[index] = now;
        continue;
      }
      const auto beats = add(key("beat", rank), 0, "watch the others");
      if (beats != beats_[index]) {
        beats_[index] = beats;
        changed_[index] = now;
        continue;
      }
      TORCHLORA_CHECK(
          now - changed_[index] < kSilenceLimit,
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
      if (!has(key("joined", rank), "list the missing ranks")) {
        missing.push_back(rank);
      }
    }
    if (missing.empty()) {
      return "not every rank joined";
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
  Clock::time_point deadline_;
  std::string who_;
  std::string store_name_;
  std::vector<int64_t> beats_;
  std::vector<Clock::time_point> changed_;
  Clock::time_point last_check_ = Clock::now();
  bool knows_of_failure_ = false;
  bool store_silent_ = false;
  bool joined_ = false;
};

} // namespace detail
} // namespace distributed
} // namespace torchlora
