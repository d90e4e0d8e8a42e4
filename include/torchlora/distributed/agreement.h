#pragma once

// Checking through the store that every rank is about to do the same
// thing (the same tensors, the same options) before a collective that
// would otherwise hang or mix unrelated data: every rank finds the same
// first difference, so all of them fail with the same error.

#include <torchlora/detail/check.h>
#include <torchlora/distributed/world.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace torchlora {
namespace distributed {
namespace detail {

/// "'name' [4, 12] Float" (with " (cuda)" where not on the CPU): what
/// ranks must agree on about one tensor.
inline std::string describe_tensor(
    const std::string& name,
    const at::Tensor& tensor) {
  std::ostringstream text;
  text << "'" << name << "' " << tensor.sizes() << " "
       << c10::toString(tensor.scalar_type());
  if (!tensor.device().is_cpu()) {
    text << " (" << c10::DeviceTypeName(tensor.device().type(), true) << ")";
  }
  return text.str();
}

/// Every rank publishes its `lines` (or, when `problem` is not empty, that
/// it failed and why) in the world's store, under `what` and `generation`
/// (the how-many-th exchange of `what`), then reads every rank's. Returns
/// them by rank. An error names `what` and a rank that failed (with its
/// reason) or did not publish within the timeout. A rank with a `problem`
/// publishes it and returns nothing: it throws its own error.
inline std::vector<std::vector<std::string>> exchange_lines(
    const World& world,
    const std::string& what,
    int64_t generation,
    const std::vector<std::string>& lines,
    const std::string& problem) {
  const auto prefix =
      "torchlora/" + what + "/" + std::to_string(generation) + "/";
  const auto& store = world.store();
  const auto fail = [&](const auto&... reason) {
    TORCHLORA_CHECK(false, what, " on ", world.describe(), reason...);
  };
  std::string mine = problem.empty() ? "" : "!" + problem;
  for (const auto& line : lines) {
    mine += problem.empty() ? line + "\n" : "";
  }
  try {
    store->set(
        prefix + std::to_string(world.rank()),
        std::vector<uint8_t>(mine.begin(), mine.end()));
  } catch (const std::exception& error) {
    fail(" could not reach the store: ", message_of(error));
  }
  std::vector<std::vector<std::string>> all;
  if (!problem.empty()) {
    return all;
  }
  for (int rank = 0; rank < world.world_size(); ++rank) {
    std::vector<uint8_t> bytes;
    try {
      bytes = store->get(prefix + std::to_string(rank));
    } catch (const std::exception& error) {
      fail(
          ": rank ",
          rank,
          " did not describe its model within ",
          world.timeout().count(),
          " ms (it exited, or makes no ",
          what,
          "): ",
          message_of(error));
    }
    const std::string text(bytes.begin(), bytes.end());
    TORCHLORA_CHECK(
        text.empty() || text[0] != '!',
        what,
        " on ",
        world.describe(),
        ": rank ",
        rank,
        " could not make its ",
        what,
        ": ",
        text.substr(std::min<std::size_t>(1, text.size())));
    std::vector<std::string> split;
    std::istringstream stream(text);
    for (std::string line; std::getline(stream, line);) {
      split.push_back(line);
    }
    all.push_back(split);
  }
  return all;
}

/// Compares every rank's lines from `first` on with rank 0's; the first
/// difference is an error saying that the processes' models differ, so
/// that `what` cannot work, and naming `noun` number N on both ranks.
inline void check_same_tensors(
    const std::vector<std::vector<std::string>>& all,
    std::size_t first,
    const std::string& what,
    const std::string& noun) {
  for (std::size_t rank = 1; rank < all.size(); ++rank) {
    const auto& ours = all[0];
    const auto& theirs = all[rank];
    for (std::size_t line = first; line < std::max(ours.size(), theirs.size());
         ++line) {
      const std::string their_line =
          line < theirs.size() ? theirs[line] : "nothing more";
      const std::string our_line =
          line < ours.size() ? ours[line] : "nothing more";
      TORCHLORA_CHECK(
          their_line == our_line,
          "the processes' models differ, so ",
          what,
          ": ",
          noun,
          " ",
          line + 1 - first,
          " is ",
          our_line,
          " on rank 0 and ",
          their_line,
          " on rank ",
          rank,
          " (every process must build, adapt and set up the same model)");
    }
  }
}

/// Each agreement of a process takes the next number; processes make them
/// in the same order, so that their keys in the store match.
inline int64_t next_agreement() {
  static int64_t next = 0;
  return next++;
}

} // namespace detail
} // namespace distributed
} // namespace torchlora
