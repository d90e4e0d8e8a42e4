#pragma once

// Comparing tensors bit for bit: whether adapters changed since a merge or
// since an AdaptedWeights computed with them. A comparison of values would
// call NaN adapters changed forever (NaN != NaN). Not part of the API.

#include <torch/types.h>

#include <cstring>

namespace torchlora {
namespace detail {

/// True when `a` and `b` have the same shape, dtype and device and every
/// element the same bits (NaN equals the same NaN; -0 differs from 0). Two
/// undefined tensors are the same.
inline bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.defined() || !b.defined()) {
    return a.defined() == b.defined();
  }
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type() ||
      a.device() != b.device()) {
    return false;
  }
  if (a.device().is_cpu() && a.is_contiguous() && b.is_contiguous()) {
    // No dispatch: this runs in every forward of a merged layer.
    return a.nbytes() == 0 ||
        std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
  }
  const auto size = a.element_size();
  const auto bits = size == 8 ? torch::kLong
      : size == 4             ? torch::kInt
      : size == 2             ? torch::kShort
                              : torch::kByte;
  return torch::equal(a.contiguous().view(bits), b.contiguous().view(bits));
}

} // namespace detail
} // namespace torchlora
