#pragma once

// LoRALayerImpl (layer_base.h), merging: merge, unmerge, unload and the
// checks that keep a merged weight honest.

#include <torchlora/layer_base.h>

namespace torchlora {

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::unmerge() {
  if (!merge_.merged) {
    return;
  }
  check_unmergeable();
  check_no_forward_running("unmerge");
  torch::NoGradGuard no_grad;
  if (merge_.keeps_original) {
    weight.set_data(merge_.original_weight);
  } else {
    detail::add_deltas_in_place(weight, merge_.deltas, -1.0, add_delta());
  }
  merge_.forget();
  refresh_member();
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_mergeable() const {
  if (merge_.merged) {
    check_merged_weight_is_current();
    return;
  }
  if (!adapters_.has_active()) {
    return;
  }
  check_enabled_for_merge();
  derived().check_delta_fits();
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::unload(bool merge_first) {
  if (merge_first) {
    check_mergeable();
  } else {
    check_restorable("unload()");
  }
  check_no_forward_running("unload");
  detail::check_not_routed(
      this, "unload", std::string("this ") + Derived::kName);
  torch::NoGradGuard no_grad;
  if (merge_first && !merge_.merged) {
    weight.set_data(weight_with_adapters());
  } else if (!merge_first && merge_.merged) {
    weight.set_data(weight_before_merge());
  }
  merge_.forget();
  enabled_ = true;
  while (!adapters_.empty()) {
    delete_adapter(adapters_.back().name);
  }
  if (member_.bound) {
    // The member reads the (merged or restored) base weight again.
    Derived::member_weight(*base_) = weight;
    member_ = detail::MemberBinding();
  }
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::merge_keeping_original(
    bool safe,
    bool keep_original) {
  check_mergeable();
  if (merge_.merged || !adapters_.has_active()) {
    return;
  }
  this->check_weight_mergeable();
  check_no_forward_running(keep_original ? "merge" : "merge_in_place");
  if (!keep_original) {
    check_in_place_mergeable();
  }
  torch::NoGradGuard no_grad;
  if (keep_original) {
    auto merged_weight = weight_with_adapters();
    check_safe_merge(safe, merged_weight);
    merge_.original_weight = weight.detach();
    weight.set_data(merged_weight);
  } else {
    if (safe) {
      check_safe_merge(safe, weight_with_adapters());
    }
    detail::add_deltas_in_place(
        weight, adapters_.active_deltas(), 1.0, add_delta());
  }
  merge_.keeps_original = keep_original;
  merge_.merged = true;
  merge_.remember(adapters_, weight);
  refresh_member();
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_safe_merge(
    bool safe,
    const torch::Tensor& merged_weight) const {
  TORCHLORA_CHECK(
      !safe || torch::isfinite(merged_weight).all().item().toBool(),
      "safe merge refused: merging the active adapters (",
      detail::quoted_list(active_adapters()),
      ") gives NaN or Inf weights." TORCHLORA_NOTHING_CHANGED);
}

template <typename Derived, typename BaseImpl>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::weight_before_merge() const {
  if (merge_.keeps_original) {
    return merge_.original_weight;
  }
  return detail::weight_plus(weight, merge_.deltas, -1.0, add_delta());
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_merged_weight_is_current(
    bool in_forward) const {
  const bool values = !in_forward || weight.device().is_cpu();
  TORCHLORA_CHECK(
      !merge_.adapters_changed(adapters_, values),
      "an adapter of this merged layer (",
      detail::quoted_list(active_adapters()),
      ") was changed after merge(), so the merged weight is stale; "
      "unmerge() before changing adapters and merge() again after");
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_weight_unchanged_since_merge(
    const char* what) const {
  TORCHLORA_CHECK(
      merge_.weight_unchanged(weight),
      "the weight of this merged layer was changed after "
      "merge() (an optimizer step or an in-place op on it), so ",
      what,
      " would restore the weight from before merge() and lose that change; "
      "keep it with merge_and_unload(), or train adapters unmerged");
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_no_forward_running(
    const char* operation) const {
  detail::check_no_forward_running(
      running_forwards_.running(),
      operation,
      std::string("this ") + Derived::kName);
  detail::check_no_member_hold(
      member_weight_holds(), operation, std::string("this ") + Derived::kName);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_restorable(
    const char* what) const {
  if (merge_.merged && merge_.keeps_original) {
    check_weight_unchanged_since_merge(what);
  }
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_enabled_for_merge() const {
  TORCHLORA_CHECK(
      enabled_,
      "cannot merge a layer whose adapters are disabled "
      "(DisableAdapters); merge after the guard's scope");
}

template <typename Derived, typename BaseImpl>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::weight_with_adapters(
    double sign) const {
  return detail::weight_plus(
      derived().float_weight(),
      adapters_.active_deltas(),
      sign,
      add_delta(),
      Derived::kMagnitudeAxis);
}

template <typename Derived, typename BaseImpl>
bool LoRALayerImpl<Derived, BaseImpl>::merge_is_finite() const {
  return torch::isfinite(weight_with_adapters()).all().item().toBool();
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_not_merged(
    const char* operation) const {
  TORCHLORA_CHECK(
      !merge_.merged, operation, " on a merged layer; unmerge() it first");
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_unmergeable() const {
  check_restorable("unmerge()");
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::add_delta_weight(
    torch::Tensor& weight,
    const torch::Tensor& A,
    const torch::Tensor& B,
    double s) {
  weight.addmm_(B, A, /*beta=*/1, /*alpha=*/s);
}

} // namespace torchlora
