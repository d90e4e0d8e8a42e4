#pragma once

// LoRALayerImpl (layer_base.h), the member of a LibTorch module bound to the
// layer (MemberBindable) and the adapted weight it holds.

#include <torchlora/layer_base.h>

namespace torchlora {

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::bind_member(const std::string& where) {
  check_not_merged("bind_member");
  for (const auto& adapter : adapters_.all()) {
    member_.check_options(adapter.name, adapter.options, where);
  }
  member_.bound = true;
  member_.where = where;
  refresh_member();
}

template <typename Derived, typename BaseImpl>
int64_t LoRALayerImpl<Derived, BaseImpl>::hold_member_weight() {
  TORCHLORA_CHECK(
      member_.bound,
      "hold_member_weight on a ",
      Derived::kName,
      " that no LibTorch module reads through a member");
  if (merge_.merged) {
    check_merged_weight_is_current();
  }
  // Computed now, in this scope's grad mode; an inner scope's weight
  // never replaces an outer one's for good.
  const auto token = member_.hold(merge_.merged ? weight : adapted_weight());
  refresh_member();
  return token;
}

template <typename Derived, typename BaseImpl>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::adapted_weight() const {
  if (merge_.merged) {
    check_merged_weight_is_current(/*in_forward=*/true);
    return weight;
  }
  if (!enabled_ || !adapters_.has_active()) {
    return weight;
  }
  if (!adapters_.records_gradients()) {
    return weight_with_adapters();
  }
  auto adapted = weight;
  const auto where =
      member_.bound ? member_.where : std::string("this ") + Derived::kName;
  for (const auto& adapter : adapters_.all()) {
    if (!adapter.active) {
      continue;
    }
    if (adapter.is_dora()) {
      // + g (W + s B A) - W, g = m / norms differentiable in m.
      const auto scaled = detail::DoraScaleFunction::apply(
          derived().add_recorded_delta(weight, adapter, where),
          adapter.magnitude,
          dora_norms(adapter).to(adapter.magnitude.scalar_type()),
          Derived::kMagnitudeAxis,
          where);
      adapted = adapted + (scaled - weight);
    } else {
      adapted = derived().add_recorded_delta(adapted, adapter, where);
    }
  }
  return adapted;
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::refresh_member(bool recompute_held) {
  if (!member_.bound) {
    return;
  }
  if (recompute_held) {
    // After a move, a conversion or re-enabling: the held weights,
    // computed anew, each in its scope's grad mode.
    for (auto& hold : member_.holds) {
      const at::AutoGradMode grad_mode(hold.grad);
      hold.weight = merge_.merged ? weight : adapted_weight();
    }
  }
  auto& member = Derived::member_weight(*base_);
  if (merge_.merged) {
    member = weight;
  } else if (!member_.holds.empty()) {
    member = member_.holds.back().weight;
  } else {
    member = detail::member_sentinel(weight, member_.sentinel_message());
  }
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::set_adapters_enabled(bool enabled) {
  TORCHLORA_CHECK(
      enabled || !merge_.merged,
      "cannot disable the adapters of a merged layer; unmerge() "
      "it first (torchlora::DisableAdapters does both)");
  if (enabled && !enabled_ && member_weight_holds() > 0) {
    // A DisableAdapters that ends before an AdaptedWeights made inside
    // it: the held weights take the adapters again.
    detail::check_no_forward_running(
        running_forwards_.running(),
        "set_adapters_enabled",
        std::string("this ") + Derived::kName);
    enabled_ = true;
    refresh_member(/*recompute_held=*/true);
    return;
  }
  check_no_forward_running("set_adapters_enabled");
  enabled_ = enabled;
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::release_member_weight(int64_t token) {
  if (member_.release(token)) {
    refresh_member();
  }
}

template <typename Derived, typename BaseImpl>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::add_recorded_delta(
    const torch::Tensor& weight,
    const detail::Adapter& adapter,
    const std::string& where) const {
  return detail::AdaptedWeightFunction::apply(
      weight, adapter.A, adapter.B, adapter.effective_scaling(), where);
}

} // namespace torchlora
