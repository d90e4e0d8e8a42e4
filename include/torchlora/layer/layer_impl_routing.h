#pragma once

// LoRALayerImpl (layer_base.h), per-row routing (AdapterRouting): the
// routed forward and the checks of its input.

#include <torchlora/layer_base.h>

namespace torchlora {

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_routed_input(
    const detail::RowGroups& routing,
    const torch::Tensor& input,
    int64_t min_dim,
    const char* what) const {
  TORCHLORA_CHECK(
      !merge_.merged,
      "AdapterRouting: this ",
      Derived::kName,
      " is merged, so its adapters cannot be applied per row; unmerge() "
      "the model first");
  TORCHLORA_CHECK(
      !adapters_.has_dora(),
      "AdapterRouting: this ",
      Derived::kName,
      " has DoRA adapters, whose rescaling of the whole layer cannot be "
      "applied per row (peft refuses DoRA in mixed batches too); route "
      "rows on a model without use_dora");
  TORCHLORA_CHECK(
      enabled_,
      "AdapterRouting: the adapters of this ",
      Derived::kName,
      " are disabled (DisableAdapters); route rows outside that scope");
  TORCHLORA_CHECK(
      input.dim() >= min_dim,
      "AdapterRouting: ",
      Derived::kName,
      " needs ",
      what,
      " (rows in the first dimension) to route rows, got an input of "
      "shape ",
      input.sizes());
  TORCHLORA_CHECK(
      input.size(0) == routing.rows(),
      "AdapterRouting was made for ",
      routing.rows(),
      " rows, but this ",
      Derived::kName,
      "'s input has ",
      input.size(0),
      " in its first dimension (shape ",
      input.sizes(),
      ")");
}

template <typename Derived, typename BaseImpl>
template <typename BaseForward>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::routed_forward(
    const detail::RowGroups& routing,
    const torch::Tensor& x,
    int64_t positions_per_row,
    const BaseForward& base) const {
  const bool grouped = routing.keeps_order();
  const auto rows = grouped
      ? x
      : x.index_select(0, routing.permutation(x.device(), positions_per_row));
  auto y = base(rows);
  for (const auto& group : routing.groups()) {
    const auto* adapter = adapters_.or_null(group.adapter);
    if (adapter == nullptr) {
      continue;
    }
    const auto start = group.offset * positions_per_row;
    const auto length = static_cast<int64_t>(group.count) * positions_per_row;
    auto y_rows = y.narrow(0, start, length);
    derived().add_adapter_output(
        *adapter,
        derived().adapter_input(*adapter, rows.narrow(0, start, length)),
        y_rows);
  }
  return grouped
      ? y
      : y.index_select(0, routing.inverse(y.device(), positions_per_row));
}

template <typename Derived, typename BaseImpl>
const detail::RowGroups* LoRALayerImpl<Derived, BaseImpl>::row_routing() const {
  if (detail::current_routing() == nullptr) {
    return nullptr;
  }
  return detail::routing_for(this);
}

} // namespace torchlora
