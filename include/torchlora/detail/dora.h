#pragma once

// DoRA's arithmetic, shared by every layer kind: the norm of an adapted
// weight per output channel, and a per-channel vector laid along one
// dimension of a weight or an output. Not part of the API.

#include <torchlora/detail/check.h>
#include <torchlora/detail/tensor_bits.h>

#include <torch/autograd.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdint>
#include <ostream>
#include <string>
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

/// `(magnitude / norms) * adapted` along `axis`: DoRA's rescaling of an
/// adapted weight `W + s B A`, the norms constant. Differentiable in both
/// inputs to any order; like `AdaptedWeightFunction`, its backward can run
/// more than once (gradient accumulation in one `AdaptedWeights` scope) and
/// refuses, naming `where`, when the magnitude changed since.
struct DoraScaleFunction : torch::autograd::Function<DoraScaleFunction> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& adapted,
      const torch::Tensor& magnitude,
      const torch::Tensor& norms,
      int64_t axis,
      const std::string& where) {
    // Values, not saved variables: a second backward works.
    ctx->saved_data["adapted"] = adapted;
    ctx->saved_data["magnitude"] = magnitude;
    ctx->saved_data["magnitude_values"] = magnitude.detach().clone();
    ctx->saved_data["norms"] = norms;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["where"] = where;
    return adapted *
        along(magnitude.reshape(-1) / norms, axis, adapted.dim())
            .to(adapted.scalar_type());
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    const auto adapted = ctx->saved_data["adapted"].toTensor();
    const auto magnitude = ctx->saved_data["magnitude"].toTensor();
    const auto norms = ctx->saved_data["norms"].toTensor();
    const auto axis = ctx->saved_data["axis"].toInt();
    TORCHLORA_CHECK(
        same_bits(
            magnitude.detach(), ctx->saved_data["magnitude_values"].toTensor()),
        "the weight of ",
        ctx->saved_data["where"].toStringRef(),
        " was computed by a torchlora::AdaptedWeights before its DoRA "
        "magnitude changed (an optimizer step), so this gradient belongs to "
        "the old magnitude. Make a new AdaptedWeights after every optimizer "
        "step: one per training step, inside the loop");
    const auto& g = grads[0];
    const auto scale = along(magnitude.reshape(-1) / norms, axis, adapted.dim())
                           .to(adapted.scalar_type());
    const auto per_channel = (g * adapted)
                                 .transpose(0, axis)
                                 .reshape({adapted.size(axis), -1})
                                 .sum(1)
                                 .to(magnitude.scalar_type());
    return {
        g * scale,
        (per_channel / norms.to(magnitude.scalar_type()))
            .reshape(magnitude.sizes()),
        torch::Tensor(),
        torch::Tensor(),
        torch::Tensor()};
  }
};

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
