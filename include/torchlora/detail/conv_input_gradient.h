#pragma once

// Convolutions whose input gradient is right on every LibTorch build.
//
// Debian 13's LibTorch 2.6 (built with Debian's oneDNN 3.7) returns a wrong
// input gradient from float32 CPU convolutions whose out_channels is not a
// multiple of 16 (kernels larger than 1, with or without stride and
// padding): off by up to 90%, and NaN when the memory it reads uninitialized
// held NaN. A LoRA A convolution has r out_channels (4, 8, ...), so every
// layer below an adapted convolution would train on wrong gradients. With
// its out_channels padded by zero filters to a multiple of 16, the same
// LibTorch is right. torchlora's convolution layers take that padded form,
// only where it matters: a CPU input that needs its gradient, on a LibTorch
// whose convolution fails a small float32 check against float64.

#include <torch/enum.h>
#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/padding.h>
#include <torch/types.h>

#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace torchlora::detail {

/// Whether this LibTorch's float32 CPU convolution (3 -> 3 channels, 3x3
/// kernel, padding 1) returns an input gradient that differs from float64's.
/// Checked once per process, with fixed values (no random numbers drawn).
inline bool cpu_conv_input_gradient_is_wrong() {
  static const bool wrong = [] {
    // Autograd on, also when first asked inside an InferenceMode scope.
    const c10::InferenceMode not_inference(false);
    const at::AutoGradMode grad_mode(true);
    const auto values =
        torch::arange(2 * 3 * 8 * 8, torch::kFloat64).sin().view({2, 3, 8, 8});
    const auto weight =
        torch::arange(3 * 3 * 3 * 3, torch::kFloat64).cos().view({3, 3, 3, 3});
    const auto output_gradient = torch::arange(2 * 3 * 8 * 8, torch::kFloat64)
                                     .mul(0.7)
                                     .sin()
                                     .view({2, 3, 8, 8});
    const auto input_gradient = [&](torch::Dtype dtype) {
      const auto input = values.to(dtype).clone().requires_grad_(true);
      const auto output = torch::conv2d(input, weight.to(dtype), {}, 1, 1);
      output.backward(output_gradient.to(dtype));
      return input.grad().to(torch::kFloat64);
    };
    return !torch::allclose(
        input_gradient(torch::kFloat32),
        input_gradient(torch::kFloat64),
        1e-4,
        1e-4);
  }();
  return wrong;
}

/// LibTorch keeps a convolution's explicit padding (for padding modes other
/// than zeros) protected; a derived class may name it.
template <typename ConvImpl>
struct ConvPaddingAccess : ConvImpl {
  static const std::vector<int64_t>& of(const ConvImpl& conv) {
    return conv.*(&ConvPaddingAccess::_reversed_padding_repeated_twice);
  }
};

/// What `conv.forward(input)` computes, with `weight` and `bias` in place of
/// the module's: the same stride, padding, dilation, groups, padding mode.
template <size_t D, typename ConvImpl>
torch::Tensor convolve_like(
    const ConvImpl& conv,
    const torch::Tensor& input,
    const torch::Tensor& weight,
    const torch::Tensor& bias) {
  namespace F = torch::nn::functional;
  const auto& o = conv.options;
  const auto run = [&](const torch::Tensor& x, const auto& padding) {
    if constexpr (D == 1) {
      return F::detail::conv1d(
          x, weight, bias, o.stride(), padding, o.dilation(), o.groups());
    } else if constexpr (D == 2) {
      return F::detail::conv2d(
          x, weight, bias, o.stride(), padding, o.dilation(), o.groups());
    } else {
      return F::detail::conv3d(
          x, weight, bias, o.stride(), padding, o.dilation(), o.groups());
    }
  };
  const std::string mode = torch::enumtype::get_enum_name(o.padding_mode());
  if (mode == "kZeros") {
    return run(input, o.padding());
  }
  auto pad = F::PadFuncOptions(ConvPaddingAccess<ConvImpl>::of(conv));
  if (mode == "kReflect") {
    pad.mode(torch::kReflect);
  } else if (mode == "kReplicate") {
    pad.mode(torch::kReplicate);
  } else {
    pad.mode(torch::kCircular);
  }
  using Padding = torch::nn::detail::conv_padding_t<D>;
  return run(F::pad(input, pad), Padding(torch::ExpandingArray<D>(0)));
}

constexpr int64_t kConvFilterBlock = 16;

/// What `conv.forward(input)` computes, through its weight (and bias) padded
/// with zero filters to a multiple of 16 out_channels, the extra outputs
/// dropped, contiguous in the input's suggested memory format (as the
/// module's output). Not for grouped convolutions (the padding cannot keep
/// groups).
template <size_t D, typename ConvImpl>
torch::Tensor convolve_padded_to_block(
    ConvImpl& conv,
    const torch::Tensor& input) {
  const int64_t out = conv.options.out_channels();
  auto padding_shape = conv.weight.sizes().vec();
  padding_shape[0] =
      (kConvFilterBlock - out % kConvFilterBlock) % kConvFilterBlock;
  const auto weight =
      torch::cat({conv.weight, conv.weight.new_zeros(padding_shape)});
  auto bias = conv.bias;
  if (bias.defined()) {
    bias = torch::cat({bias, bias.new_zeros({padding_shape[0]})});
  }
  const auto output = convolve_like<D>(conv, input, weight, bias);
  const auto channels = output.dim() - static_cast<int64_t>(D) - 1;
  return output.narrow(channels, 0, out)
      .contiguous(input.suggest_memory_format());
}

/// `conv.forward(input)`; where this LibTorch would get the input's gradient
/// wrong (see above), `convolve_padded_to_block`, which it gets right.
/// Grouped convolutions are left as they are.
template <size_t D, typename ConvImpl>
torch::Tensor convolve(ConvImpl& conv, const torch::Tensor& input) {
  if (conv.options.out_channels() % kConvFilterBlock == 0 ||
      conv.options.groups() != 1 || !input.requires_grad() ||
      !at::GradMode::is_enabled() || !input.device().is_cpu() ||
      input.scalar_type() == torch::kFloat64 ||
      !cpu_conv_input_gradient_is_wrong()) {
    return conv.forward(input);
  }
  return convolve_padded_to_block<D>(conv, input);
}

} // namespace torchlora::detail
