#pragma once

// The adapted weight W + s B A as an autograd Function, for layers whose
// weight LibTorch's own modules read directly (AdaptedWeights). Unlike
// `torch::addmm(W, B, A)`, its backward can run more than once (gradient
// accumulation over several forwards of one scope) and it refuses, with a
// torchlora: message, when A or B changed after the weight was computed (an
// optimizer step inside the scope): a gradient for an old weight would
// otherwise be applied to the new adapters in silence. Not part of the API.

#include <torchlora/detail/check.h>
#include <torchlora/detail/tensor_bits.h>

#include <torch/autograd.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <string>

namespace torchlora {
namespace detail {

/// The values of W + s B A, computed in fp32 for fp16/bf16 weights and
/// rounded once (as `merge` does), in W's dtype otherwise.
inline torch::Tensor add_low_rank(
    const torch::Tensor& W,
    const torch::Tensor& A,
    const torch::Tensor& B,
    double s) {
  const auto dtype = W.scalar_type();
  const bool half = dtype == torch::kHalf || dtype == torch::kBFloat16;
  const auto compute = half ? torch::kFloat : dtype;
  return torch::addmm(
             W.to(compute),
             B.to(compute),
             A.to(compute),
             /*beta=*/1,
             /*alpha=*/s)
      .to(dtype);
}

/// W + s B A, differentiable in W, A and B (to any order). `where` names the
/// layer in the error of a stale backward.
struct AdaptedWeightFunction
    : torch::autograd::Function<AdaptedWeightFunction> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& W,
      const torch::Tensor& A,
      const torch::Tensor& B,
      double s,
      const std::string& where) {
    // Kept as values (not saved variables), so that a second backward
    // through the same weight works. A copy of their values tells a later
    // change: LibTorch's optimizers step through `.data()`, which version
    // counters do not see. (The copies are adapter-sized.)
    ctx->saved_data["A"] = A;
    ctx->saved_data["B"] = B;
    ctx->saved_data["A_values"] = A.detach().clone();
    ctx->saved_data["B_values"] = B.detach().clone();
    ctx->saved_data["s"] = s;
    ctx->saved_data["where"] = where;
    return add_low_rank(W, A, B, s);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    const auto A = ctx->saved_data["A"].toTensor();
    const auto B = ctx->saved_data["B"].toTensor();
    TORCHLORA_CHECK(
        same_bits(A.detach(), ctx->saved_data["A_values"].toTensor()) &&
            same_bits(B.detach(), ctx->saved_data["B_values"].toTensor()),
        "the weight of ",
        ctx->saved_data["where"].toStringRef(),
        " was computed by a torchlora::AdaptedWeights before its adapters "
        "changed (an optimizer step, or an in-place change of lora_A/lora_B), "
        "so this gradient belongs to the old adapters. Make a new "
        "AdaptedWeights after every optimizer step: one per training step, "
        "inside the loop");
    const double s = ctx->saved_data["s"].toDouble();
    const auto& g = grads[0];
    const auto g_A = g.to(A.scalar_type());
    const auto g_B = g.to(B.scalar_type());
    return {
        g,
        B.to(A.scalar_type()).t().mm(g_A).mul(s),
        g_B.mm(A.to(B.scalar_type()).t()).mul(s),
        torch::Tensor(),
        torch::Tensor()};
  }
};

} // namespace detail
} // namespace torchlora
