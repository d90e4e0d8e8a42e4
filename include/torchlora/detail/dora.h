#pragma once

// DoRA's arithmetic, shared by every layer kind: the norm of an adapted
// weight per output channel, and a per-channel vector laid along one
// dimension of a weight or an output. Not part of the API.

#include <torch/linalg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdint>
#include <ostream>
#include <tuple>
#include <utility>
#include <vector>

namespace torchlora {
namespace detail {

/// `vector` (n elements) reshaped to broadcast along dimension `axis` of a
/// tensor with `dims` dimensions: size n there, 1 elsewhere.
inline torch::Tensor along(
    const torch::Tensor& vector,
    int64_t axis,
    int64_t dims) {
  std::vector<int64_t> shape(static_cast<size_t>(dims), 1);
  shape[static_cast<size_t>(axis)] = vector.numel();
  return vector.reshape(shape);
}

/// The 2-norm of `weight` over every dimension but `axis`: one value per
/// index of `axis`, as a vector.
inline torch::Tensor channel_norms(const torch::Tensor& weight, int64_t axis) {
  return weight.transpose(0, axis)
      .reshape({weight.size(axis), -1})
      .norm(2, /*dim=*/{1});
}

/// The dtype DoRA's norms and PiSSA/OLoRA's factorizations run in:
/// float32, or float64 for a float64 weight.
inline torch::Dtype factorization_dtype(torch::Dtype weight) {
  return weight == torch::kDouble ? torch::kDouble : torch::kFloat;
}

/// A randomized SVD of the matrix `W` of rank `rank` (Halko et al.: a
/// Gaussian sketch, `iterations` subspace iterations, each re-orthonormalized,
/// then the SVD of the small projection): `U [m, rank]`, `S [rank]`,
/// `Vh [rank, n]`, `W ~ U diag(S) Vh`. Draws from LibTorch's generator.
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> randomized_svd(
    const torch::Tensor& W,
    int64_t rank,
    int64_t iterations) {
  const auto orthonormal = [](const torch::Tensor& Y) {
    return std::get<0>(torch::linalg_qr(Y, "reduced"));
  };
  auto Q = orthonormal(W.mm(torch::randn({W.size(1), rank}, W.options())));
  for (int64_t i = 0; i < iterations; ++i) {
    Q = orthonormal(W.mm(orthonormal(W.t().mm(Q))));
  }
  auto [U_small, S, Vh] =
      torch::linalg_svd(Q.t().mm(W), /*full_matrices=*/false);
  return {Q.mm(U_small), S, Vh};
}

/// Holds one DoRA magnitude as its `weight`, so that the layer's state dict
/// has peft's in-memory key `lora_magnitude_vector.<adapter>.weight`.
class LoRAMagnitudeImpl : public torch::nn::Cloneable<LoRAMagnitudeImpl> {
 public:
  explicit LoRAMagnitudeImpl(const torch::Tensor& magnitude)
      : torch::nn::Cloneable<LoRAMagnitudeImpl>("torchlora::LoRAMagnitude"),
        weight(magnitude) {
    reset();
    torch::NoGradGuard no_grad;
    weight.copy_(magnitude);
  }

  /// Registers a `weight` of its own (shape, dtype, device and trainable
  /// flag of the current one), so that a clone never shares it.
  void reset() override {
    weight = register_parameter(
        "weight", torch::empty_like(weight), weight.requires_grad());
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "torchlora::LoRAMagnitude(" << weight.numel() << ")";
  }

  torch::Tensor weight;
};

} // namespace detail
} // namespace torchlora
