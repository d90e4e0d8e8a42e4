#pragma once

// Whether a LoRA layer is merged, and what tells that its merge is still
// current: copies of what the merge added, stamps of the adapters and a
// checksum of the merged weight. One concern of `LoRALayerImpl`
// (layer_base.h). Not part of the API.

#include <torchlora/detail/check.h>
#include <torchlora/detail/dora.h>
#include <torchlora/detail/tensor_bits.h>
#include <torchlora/layer/adapter_set.h>

#include <torch/types.h>
#include <torch/utils.h>

#include <cstdint>
#include <vector>

namespace torchlora {
namespace detail {

/// `weight` plus `sign` times each of `deltas` (`add_delta(weight, A, B, s)`
/// adds one), computed in fp32 for fp16/bf16 weights (in the weight's dtype
/// otherwise), returned in the weight's dtype. `weight` is not changed.
/// A DoRA delta (sign 1 only) adds `g (W + s B A) - W`, `g` its magnitude
/// over the channel norms of `W + s B A` along `magnitude_axis`.
template <typename AddDelta>
torch::Tensor weight_plus(
    const torch::Tensor& weight,
    const std::vector<Delta>& deltas,
    double sign,
    const AddDelta& add_delta,
    int64_t magnitude_axis = 0) {
  torch::NoGradGuard no_grad;
  const auto dtype = weight.scalar_type();
  const bool half = dtype == torch::kHalf || dtype == torch::kBFloat16;
  const auto compute = half ? torch::kFloat : dtype;
  auto result =
      weight.detach().to(compute, /*non_blocking=*/false, /*copy=*/true);
  // The weight before any delta, copied only where a DoRA delta needs it.
  torch::Tensor base;
  for (const auto& delta : deltas) {
    const auto A = delta.A.to(compute);
    const auto B = delta.B.to(compute);
    if (!delta.magnitude.defined()) {
      add_delta(result, A, B, sign * delta.s);
      continue;
    }
    TORCHLORA_INTERNAL_ASSERT(sign == 1.0, "a DoRA delta cannot be removed");
    if (!base.defined()) {
      base = weight.detach().to(compute, /*non_blocking=*/false, /*copy=*/true);
    }
    auto adapted = base.clone();
    add_delta(adapted, A, B, delta.s);
    const auto factor = delta.magnitude.reshape(-1).to(compute) /
        channel_norms(adapted, magnitude_axis);
    result.add_(adapted.mul_(along(factor, magnitude_axis, adapted.dim())))
        .sub_(base);
  }
  return result.to(dtype);
}

/// `weight += sign * s * delta` for each of `deltas`, in the weight's own
/// memory. fp16/bf16 weights are computed in fp32 and rounded once (a
/// passing fp32 copy), as `weight_plus` does, so both merges agree.
template <typename AddDelta>
void add_deltas_in_place(
    const torch::Tensor& weight,
    const std::vector<Delta>& deltas,
    double sign,
    const AddDelta& add_delta) {
  torch::NoGradGuard no_grad;
  auto target = weight.detach();
  const auto dtype = target.scalar_type();
  if (dtype == torch::kHalf || dtype == torch::kBFloat16) {
    target.copy_(weight_plus(weight, deltas, sign, add_delta));
    return;
  }
  for (const auto& delta : deltas) {
    add_delta(target, delta.A.to(dtype), delta.B.to(dtype), sign * delta.s);
  }
}

/// Two sums of a weight in float64 (plain and weighted by position): what
/// tells a merged weight changed through `.data()`, which no version counter
/// sees, without a copy of the weight.
inline torch::Tensor weight_checksum(const torch::Tensor& weight) {
  torch::NoGradGuard no_grad;
  const auto flat = weight.detach().reshape(-1).to(torch::kDouble);
  const auto positions =
      torch::arange(1, flat.numel() + 1, flat.options().dtype(torch::kDouble));
  return torch::stack({flat.sum(), flat.mul(positions).sum()});
}

/// The merge of a layer: whether it is merged, how, and what it added.
struct MergeState {
  bool merged = false;
  /// Whether the merge kept `original_weight` (`merge`), or merged in place
  /// (`merge_in_place`).
  bool keeps_original = true;
  /// The weight before `merge`, kept for an exact `unmerge`.
  torch::Tensor original_weight;
  /// What `merge` added: copies of the active adapters' matrices and their
  /// scales (adapter-sized).
  std::vector<Delta> deltas;
  /// The active adapters' stamps at `merge`.
  std::vector<Stamp> stamps;
  /// The weight's version right after `merge`.
  int64_t weight_version = 0;
  /// `weight_checksum` right after a `merge` that kept the original.
  torch::Tensor checksum;

  bool in_place() const {
    return merged && !keeps_original;
  }

  /// Records what the merge just added to `weight`: copies of the active
  /// adapters' matrices with their scales, their stamps, and the merged
  /// weight's version (and checksum, when the original is kept).
  void remember(const AdapterSet& adapters, const torch::Tensor& weight) {
    deltas.clear();
    for (const auto& delta : adapters.active_deltas()) {
      deltas.push_back(Delta{
          delta.A.clone(),
          delta.B.clone(),
          delta.s,
          delta.magnitude.defined() ? delta.magnitude.clone()
                                    : torch::Tensor()});
    }
    stamps = adapters.active_stamps();
    weight_version = weight._version();
    if (keeps_original) {
      checksum = weight_checksum(weight);
    }
  }

  /// Back to unmerged: nothing kept.
  void forget() {
    original_weight = torch::Tensor();
    checksum = torch::Tensor();
    deltas.clear();
    stamps.clear();
    merged = false;
  }

  /// True when the active adapters differ from what `merge` added: other
  /// adapters or scales, or other values. Values are compared (a step
  /// through `.data()`, as LibTorch 1.13's SGD takes it, changes no version
  /// counter) unless `values` is false: then only the stamps (version
  /// counters and memory).
  bool adapters_changed(const AdapterSet& adapters, bool values) const {
    if (!values) {
      return deltas.size() != adapters.active_deltas().size() ||
          !(adapters.active_stamps() == stamps);
    }
    // Straight over the adapters: this runs in every forward of a merged
    // layer.
    size_t i = 0;
    for (const auto& adapter : adapters.all()) {
      if (!adapter.active) {
        continue;
      }
      if (i == deltas.size()) {
        return true;
      }
      const auto& then = deltas[i++];
      if (adapter.effective_scaling() != then.s ||
          !same_bits(adapter.A, then.A) || !same_bits(adapter.B, then.B) ||
          adapter.is_dora() != then.magnitude.defined() ||
          (adapter.is_dora() &&
           !same_bits(adapter.magnitude, then.magnitude))) {
        return true;
      }
    }
    return i != deltas.size();
  }

  /// True when `weight` is still the merged weight `merge` left.
  bool weight_unchanged(const torch::Tensor& weight) const {
    return weight._version() == weight_version &&
        same_bits(weight_checksum(weight), checksum);
  }

  /// Keeps the weight saved for `unmerge` on `weight`'s device and dtype,
  /// and the stamps and copies of a merge on the adapters' new memory (a
  /// move is not a change; a change made before the move still shows in the
  /// versions).
  void follow(const torch::Tensor& weight, const AdapterSet& adapters) {
    if (merged && keeps_original) {
      original_weight =
          original_weight.to(weight.device(), weight.scalar_type());
      // A conversion changes the merged weight's values: not a change.
      checksum = weight_checksum(weight);
    }
    if (merged) {
      const auto moved = adapters.active_stamps();
      for (size_t i = 0; i < moved.size() && i < stamps.size(); ++i) {
        stamps[i].data = moved[i].data;
      }
      const auto now = adapters.active_deltas();
      for (size_t i = 0; i < now.size() && i < deltas.size(); ++i) {
        auto& then = deltas[i];
        then.A = then.A.to(now[i].A.device(), now[i].A.scalar_type());
        then.B = then.B.to(now[i].B.device(), now[i].B.scalar_type());
        if (then.magnitude.defined()) {
          then.magnitude = then.magnitude.to(
              now[i].magnitude.device(), now[i].magnitude.scalar_type());
        }
      }
    }
  }
};

} // namespace detail
} // namespace torchlora
