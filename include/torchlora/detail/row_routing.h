#pragma once

// The per-thread state behind `torchlora::AdapterRouting`: which adapter each
// row of a batch uses, grouped once, and which layers it applies to.

#include <torchlora/detail/check.h>

#include <torch/types.h>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace torchlora {

class LoRALayer;

namespace detail {

/// The name that routes a row to no adapter (the base layer only), as peft.
inline const std::string& base_row_name() {
  static const std::string name = "__base__";
  return name;
}

/// Rows of a batch grouped by adapter: a permutation of the rows that puts
/// each adapter's rows in one contiguous run (in their batch order: a stable
/// grouping), adapters by name, then the `"__base__"` rows.
class RowGroups {
 public:
  explicit RowGroups(const std::vector<std::string>& names)
      : rows_(static_cast<int64_t>(names.size())) {
    std::map<std::string, std::vector<int64_t>> by_adapter;
    std::vector<int64_t> base_rows;
    for (size_t row = 0; row < names.size(); ++row) {
      if (names[row] == base_row_name()) {
        base_rows.push_back(static_cast<int64_t>(row));
      } else {
        by_adapter[names[row]].push_back(static_cast<int64_t>(row));
      }
    }
    std::vector<int64_t> order;
    for (auto& [name, rows] : by_adapter) {
      groups_.push_back(
          Group{name, static_cast<int64_t>(order.size()), rows.size()});
      order.insert(order.end(), rows.begin(), rows.end());
    }
    order.insert(order.end(), base_rows.begin(), base_rows.end());
    keeps_order_ = true;
    for (size_t i = 0; i < order.size(); ++i) {
      keeps_order_ = keeps_order_ && order[i] == static_cast<int64_t>(i);
    }
    permutation_ = torch::tensor(order, torch::kLong);
    inverse_ = torch::empty_like(permutation_);
    inverse_.index_put_({permutation_}, torch::arange(rows_, torch::kLong));
  }

  /// One adapter's rows: `count` rows of the grouped order from `offset`.
  struct Group {
    std::string adapter;
    int64_t offset;
    size_t count;
  };

  /// The number of rows (the batch size the routing was made for).
  int64_t rows() const {
    return rows_;
  }

  /// The routed adapters' groups, by adapter name.
  const std::vector<Group>& groups() const {
    return groups_;
  }

  /// True when the rows are grouped already (batch order is the grouped
  /// order): nothing to permute.
  bool keeps_order() const {
    return keeps_order_;
  }

  /// Batch rows in grouped order: row `i` of the grouped batch is batch row
  /// `permutation[i]`; each of the `positions_per_row` positions of a row
  /// (the flattened leading dimensions after the first) in turn. On
  /// `device`, built once per device and count.
  const torch::Tensor& permutation(
      torch::Device device,
      int64_t positions_per_row) const {
    return expanded(permutation_, device, positions_per_row, 0);
  }

  /// The inverse: grouped rows back in batch order.
  const torch::Tensor& inverse(torch::Device device, int64_t positions_per_row)
      const {
    return expanded(inverse_, device, positions_per_row, 1);
  }

 private:
  const torch::Tensor& expanded(
      const torch::Tensor& rows,
      torch::Device device,
      int64_t positions_per_row,
      int which) const {
    const auto key = std::make_tuple(device.str(), positions_per_row, which);
    auto found = cache_.find(key);
    if (found == cache_.end()) {
      auto index = rows;
      if (positions_per_row != 1) {
        index = (rows.unsqueeze(1) * positions_per_row +
                 torch::arange(positions_per_row, torch::kLong))
                    .flatten();
      }
      found = cache_.emplace(key, index.to(device)).first;
    }
    return found->second;
  }

  int64_t rows_;
  std::vector<Group> groups_;
  bool keeps_order_ = true;
  torch::Tensor permutation_;
  torch::Tensor inverse_;
  /// Only the thread that owns the routing reads it, so the cache needs no
  /// lock.
  mutable std::map<std::tuple<std::string, int64_t, int>, torch::Tensor> cache_;
};

/// A routing in force on this thread: its groups and the layers (of the
/// routed model) it applies to. Routings nest; the innermost applies.
struct ActiveRouting {
  const RowGroups* groups;
  const std::unordered_set<const LoRALayer*>* layers;
  ActiveRouting* outer;
};

/// This thread's innermost routing, or null.
inline ActiveRouting*& current_routing() {
  thread_local ActiveRouting* current = nullptr;
  return current;
}

/// The routing that applies to `layer` on this thread, or null: the
/// innermost one whose model holds the layer.
inline const RowGroups* routing_for(const LoRALayer* layer) {
  for (const auto* routing = current_routing(); routing != nullptr;
       routing = routing->outer) {
    if (routing->layers->count(layer) > 0) {
      return routing->groups;
    }
  }
  return nullptr;
}

/// How many live `AdapterRouting`s (on any thread) were made for each
/// layer: they route rows to its adapters by name, so removing an adapter
/// or the layer meanwhile would send rows to nothing in silence.
class RoutedLayers {
 public:
  static RoutedLayers& instance() {
    static RoutedLayers routed;
    return routed;
  }

  void add(const LoRALayer* layer) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++counts_[layer];
  }

  void remove(const LoRALayer* layer) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = counts_.find(layer);
    if (found != counts_.end() && --found->second == 0) {
      counts_.erase(found);
    }
  }

  int count(const LoRALayer* layer) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = counts_.find(layer);
    return found == counts_.end() ? 0 : found->second;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<const LoRALayer*, int> counts_;
};

/// Refuses `operation` on `layer` (described by `name`: "'0'", "this
/// LoRALinear") while a routing made for it lives.
inline void check_not_routed(
    const LoRALayer* layer,
    const char* operation,
    const std::string& name) {
  const int routings = RoutedLayers::instance().count(layer);
  TORCHLORA_CHECK(
      routings == 0,
      operation,
      " while a torchlora::AdapterRouting made for ",
      name,
      " lives (",
      routings,
      " routing(s)): it routes rows to this layer's adapters by name, and "
      "would send them to nothing. End the routing's scope first. Nothing "
      "was changed");
}

} // namespace detail
} // namespace torchlora
