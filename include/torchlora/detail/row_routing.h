#pragma once

// The per-thread state behind `torchlora::AdapterRouting`: which adapter each
// row of a batch uses, grouped once, and which layers it applies to.

#include <torch/types.h>

#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
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

/// Rows of a batch grouped by adapter: the routed rows (those not
/// `"__base__"`) in one order, each adapter's rows one contiguous run of it,
/// rows of an adapter in their batch order (a stable grouping).
class RowGroups {
 public:
  explicit RowGroups(const std::vector<std::string>& names)
      : rows_(static_cast<int64_t>(names.size())) {
    std::map<std::string, std::vector<int64_t>> by_adapter;
    for (size_t row = 0; row < names.size(); ++row) {
      if (names[row] != base_row_name()) {
        by_adapter[names[row]].push_back(static_cast<int64_t>(row));
      }
    }
    std::vector<int64_t> order;
    for (auto& [name, rows] : by_adapter) {
      groups_.push_back(
          Group{name, static_cast<int64_t>(order.size()), rows.size()});
      order.insert(order.end(), rows.begin(), rows.end());
    }
    order_ = torch::tensor(order, torch::kLong);
  }

  /// One adapter's rows: `count` entries of the order from `offset`.
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

  /// The routed rows' indices, grouped by adapter: each of the
  /// `positions_per_row` positions of a row (the flattened leading
  /// dimensions after the first) in turn, on `device`. Built once per
  /// device and count, then reused.
  const torch::Tensor& order(torch::Device device, int64_t positions_per_row)
      const {
    const auto key = std::make_pair(device.str(), positions_per_row);
    auto found = orders_.find(key);
    if (found == orders_.end()) {
      auto order = order_;
      if (positions_per_row != 1) {
        order = (order.unsqueeze(1) * positions_per_row +
                 torch::arange(positions_per_row, torch::kLong))
                    .flatten();
      }
      found = orders_.emplace(key, order.to(device)).first;
    }
    return found->second;
  }

 private:
  int64_t rows_;
  std::vector<Group> groups_;
  torch::Tensor order_;
  /// Only the thread that owns the routing reads it, so the cache needs no
  /// lock.
  mutable std::map<std::pair<std::string, int64_t>, torch::Tensor> orders_;
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

} // namespace detail
} // namespace torchlora
