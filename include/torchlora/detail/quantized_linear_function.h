#pragma once

// The forward of a frozen quantized Linear as a custom autograd Function:
// the weight is dequantized for the product and again for the input's
// gradient, so no float copy of it lives between forward and backward (the
// point of storing it quantized). Not part of the API.

#include <torchlora/detail/quantized_codes.h>

#include <torch/autograd.h>
#include <torch/types.h>

#include <cstdint>

namespace torchlora {
namespace detail {

/// y = x W^T + b for a 2-D x, W the weight `ref` stands for; `b` is an
/// empty tensor without bias. The backward gives x's gradient (`g W`,
/// dequantizing W again) and b's when it is trainable; the quantized tensors
/// get none. Under `create_graph` the input gradient is a differentiable
/// product of `g`, so higher-order gradients through the layer are exact.
struct QuantizedLinearFunction
    : torch::autograd::Function<QuantizedLinearFunction> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      const torch::Tensor& b,
      const QuantizedWeightRef& ref) {
    // The quantized tensors are kept, never a float copy of the weight;
    // saved as variables, so that changing them in place before the
    // backward is LibTorch's error, not a silently wrong gradient.
    ctx->save_for_backward(ref.tensors);
    ctx->saved_data["format"] = static_cast<int64_t>(ref.format);
    ctx->saved_data["out"] = ref.out;
    ctx->saved_data["in"] = ref.in;
    ctx->saved_data["block_size"] = ref.block_size;
    return compute(x, b, ref);
  }

  /// The forward's values, without autograd (also called directly where no
  /// gradient is needed).
  static torch::Tensor compute(
      const torch::Tensor& x,
      const torch::Tensor& b,
      const QuantizedWeightRef& ref) {
    const auto W = dequantize(ref);
    return b.numel() > 0 ? torch::addmm(b, x, W.t()) : x.mm(W.t());
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    const auto& g = grad_outputs[0];
    torch::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      const QuantizedWeightRef ref{
          static_cast<QuantizedFormat>(ctx->saved_data["format"].toInt()),
          ctx->saved_data["out"].toInt(),
          ctx->saved_data["in"].toInt(),
          ctx->saved_data["block_size"].toInt(),
          ctx->get_saved_variables()};
      grad_x = g.mm(dequantize(ref));
    }
    const auto grad_b = ctx->needs_input_grad(1) ? g.sum(0) : torch::Tensor();
    return {grad_x, grad_b, torch::Tensor()};
  }
};

} // namespace detail
} // namespace torchlora
