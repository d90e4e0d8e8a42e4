#pragma once

#include <torchlora/detail/adapted_weight_function.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/conv_input_gradient.h>
#include <torchlora/detail/matrix_dicts.h>
#include <torchlora/layer_base.h>
#include <torchlora/options.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/options/conv.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace torchlora {

/// A convolution with LoRA adapters: `y = conv(x) + sum over adapters of
/// scaling * B(A(dropout(x)))`, where `conv` is the frozen base layer, A a
/// convolution `in_channels -> r` with the base's kernel size, stride,
/// padding, dilation and padding mode (peft forgets the last two), and B a
/// 1x1 convolution `r -> out_channels` with the base's groups. Keys:
/// `lora_A.<name>.weight` `[r, in_channels, k...]` and
/// `lora_B.<name>.weight` `[out_channels, r / groups, 1...]`, as in peft.
///
/// Grouped base convolutions (`groups > 1`) need a rank divisible by the
/// groups and run correctly; merging them is refused when the adapter
/// connects channels across groups (it does as soon as it is trained), since
/// a grouped weight `[out, in / groups, k...]` cannot hold that.
///
/// Built from `ConvOptions` it is a plain, trainable convolution until
/// `add_adapter` attaches an adapter. `D` is 1, 2 or 3; use `LoRAConv1d`,
/// `LoRAConv2d` or `LoRAConv3d`.
///
/// Example:
/// ```
/// torchlora::LoRAConv2d conv(
///     torch::nn::Conv2d(torch::nn::Conv2dOptions(64, 128, 3).padding(1)),
///     torchlora::LoRAOptions(4));
/// torch::Tensor y = conv(torch::randn({2, 64, 16, 16}));  // [2, 128, 16, 16]
/// ```
template <size_t D, typename BaseImpl>
class LoRAConvImplT final
    : public LoRALayerImpl<LoRAConvImplT<D, BaseImpl>, BaseImpl> {
  using Base = LoRALayerImpl<LoRAConvImplT<D, BaseImpl>, BaseImpl>;
  friend Base;

 public:
  using typename Base::BaseHolder;
  static constexpr const char* kName = D == 1 ? "LoRAConv1d"
      : D == 2                                ? "LoRAConv2d"
                                              : "LoRAConv3d";
  static constexpr const char* kBaseName = D == 1 ? "Conv1d"
      : D == 2                                    ? "Conv2d"
                                                  : "Conv3d";

  /// A plain, trainable convolution; attach adapters with `add_adapter`.
  explicit LoRAConvImplT(const torch::nn::ConvOptions<D>& options_)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name())
            Base(BaseHolder(std::make_shared<BaseImpl>(options_))) {}

  /// A plain, trainable convolution of `in -> out` channels.
  LoRAConvImplT(
      int64_t in_channels,
      int64_t out_channels,
      torch::ExpandingArray<D> kernel_size)
      : LoRAConvImplT(
            torch::nn::ConvOptions<D>(in_channels, out_channels, kernel_size)) {
  }

  /// Adopts `base` (sharing its tensors) with no adapter and without changing
  /// which of its tensors are trainable.
  explicit LoRAConvImplT(const BaseHolder& base)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(base) {}

  /// Wraps `base` (sharing its tensors), freezes it and attaches the adapter
  /// "default". With rank 0 it is the frozen base with no adapter.
  LoRAConvImplT(const BaseHolder& base, const LoRAOptions& lora)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(base) {
    this->wrap_with(lora);
  }

  /// The base convolution of `input` (`[N, C_in, ...]`, or `[C_in, ...]`
  /// unbatched) plus each active adapter's scaled output.
  torch::Tensor forward(const torch::Tensor& input) {
    const auto running = this->forward_scope();
    const auto& o = this->options;
    TORCHLORA_CHECK(
        (input.dim() == D + 1 || input.dim() == D + 2) &&
            input.size(input.dim() - static_cast<int64_t>(D) - 1) ==
                o.in_channels(),
        kName,
        " expects an input of shape [N, ",
        o.in_channels(),
        ", ",
        D == 1       ? "L"
            : D == 2 ? "H, W"
                     : "D, H, W",
        "] or [",
        o.in_channels(),
        ", ",
        D == 1       ? "L"
            : D == 2 ? "H, W"
                     : "D, H, W",
        "] (in_channels = ",
        o.in_channels(),
        "), got an input of shape ",
        input.sizes());
    if (const auto* routing = this->row_routing()) {
      this->check_routed_input(
          *routing, input, D + 2, "a batched input [N, C, ...]");
      return this->routed_forward(
          *routing, input, 1, [this](const torch::Tensor& grouped) {
            return detail::convolve<D>(*this->base_, grouped);
          });
    }
    auto y = detail::convolve<D>(*this->base_, input);
    if (this->adapters_in_use()) {
      if (this->dora_in_use()) {
        return this->forward_with_dora(input, without_bias(y));
      }
      this->add_adapter_outputs(input, y);
    }
    return y;
  }

  /// The A convolutions by adapter name; empty holder until the first one.
  torch::nn::ModuleDict lora_A{nullptr};

  /// The B convolutions by adapter name; empty holder until the first one.
  torch::nn::ModuleDict lora_B{nullptr};

 private:
  /// The channels of an output `[N, C, ...]` or `[C, ...]`.
  static int64_t output_channel_axis(const torch::Tensor& y) {
    return y.dim() - static_cast<int64_t>(D) - 1;
  }

  /// `y` (the base's output) less its bias.
  torch::Tensor without_bias(const torch::Tensor& y) const {
    if (!this->bias.defined()) {
      return y;
    }
    return y - detail::along(this->bias, output_channel_axis(y), y.dim());
  }

  /// The base's output without its bias (DoRA rescales it).
  torch::Tensor base_output(const torch::Tensor& input) const {
    return without_bias(detail::convolve<D>(*this->base_, input));
  }

  void check_adapter_options(const std::string& name, const LoRAOptions& lora)
      const {
    const auto groups = this->options.groups();
    TORCHLORA_CHECK(
        !lora.use_dora() || groups == 1,
        "adapter \"",
        name,
        "\" asks for DoRA on a grouped convolution (groups = ",
        groups,
        "), whose weight cannot hold the adapted weight DoRA normalizes; "
        "use use_dora(false)");
    TORCHLORA_CHECK(
        lora.rank() % groups == 0,
        "adapter \"",
        name,
        "\" on a grouped convolution (groups = ",
        groups,
        ") needs a rank divisible by the groups, got rank ",
        lora.rank(),
        " (as in peft: B is a grouped 1x1 convolution)");
  }

  std::pair<torch::Tensor, torch::Tensor> create_matrices(
      const std::string& name,
      int64_t rank,
      torch::Device device,
      torch::Dtype dtype) {
    const auto& o = this->options;
    // A sees what the base sees: the same kernel, stride, padding,
    // dilation and padding mode.
    auto A = std::make_shared<BaseImpl>(
        torch::nn::ConvOptions<D>(o.in_channels(), rank, o.kernel_size())
            .stride(o.stride())
            .padding(o.padding())
            .dilation(o.dilation())
            .padding_mode(o.padding_mode())
            .bias(false));
    auto B = std::make_shared<BaseImpl>(
        torch::nn::ConvOptions<D>(rank, o.out_channels(), 1)
            .groups(o.groups())
            .bias(false));
    A->to(device, dtype);
    B->to(device, dtype);
    detail::add_matrix_modules(*this, lora_A, lora_B, name, A, B);
    return {A->weight, B->weight};
  }

  void remove_matrices(const std::string& name, bool last) {
    detail::remove_matrix_modules(*this, lora_A, lora_B, name, last);
  }

  /// `B(A(x))` in A's dtype, through the adapter's own convolutions.
  torch::Tensor adapter_product(
      const detail::Adapter& adapter,
      const torch::Tensor& input) const {
    const auto& A = (*lora_A)[adapter.name];
    const auto& B = (*lora_B)[adapter.name];
    return B->as<BaseImpl>()->forward(detail::convolve<D>(
        *A->as<BaseImpl>(), input.to(adapter.A.scalar_type())));
  }

  /// For groups > 1: the delta as the base's weight `[out, in / groups,
  /// k...]` (its blocks within each group), and the largest magnitude of
  /// what it puts across groups, which that weight cannot hold.
  std::pair<torch::Tensor, double> grouped_delta(
      const torch::Tensor& A,
      const torch::Tensor& B) const {
    const auto& o = this->options;
    const int64_t groups = o.groups();
    const int64_t out_g = o.out_channels() / groups;
    const int64_t in_g = o.in_channels() / groups;
    const int64_t r_g = A.size(0) / groups;
    const int64_t taps = A[0][0].numel();
    // full[g, j, h, i, k]: output j of group g from input i of group h.
    const torch::Tensor full =
        torch::bmm(
            B.reshape({groups, out_g, r_g}),
            A.reshape({groups, r_g, o.in_channels() * taps}))
            .view({groups, out_g, groups, in_g, taps});
    const torch::Tensor same_group =
        torch::eye(groups, torch::TensorOptions().dtype(torch::kBool))
            .to(full.device())
            .view({groups, 1, groups, 1, 1});
    const double across =
        full.masked_fill(same_group, 0).abs().max().item<double>();
    const torch::Tensor within = full.diagonal(0, 0, 2).permute({3, 0, 1, 2});
    return {within.reshape(this->weight.sizes()), across};
  }

  /// `weight + s delta(A, B)`, differentiable in A and B (see
  /// `LoRALayerImpl`); refused for a grouped base when the delta joins
  /// channels across groups, as `merge` is.
  torch::Tensor add_recorded_delta(
      const torch::Tensor& weight,
      const detail::Adapter& adapter,
      const std::string& where) const {
    const double s = adapter.effective_scaling();
    if (this->options.groups() == 1) {
      const auto out = weight.size(0);
      const auto rank = adapter.A.size(0);
      return detail::AdaptedWeightFunction::apply(
                 weight.reshape({out, -1}),
                 adapter.A.reshape({rank, -1}),
                 adapter.B.reshape({out, rank}),
                 s,
                 where)
          .view(weight.sizes());
    }
    const auto [within, across] = grouped_delta(adapter.A, adapter.B);
    check_within_groups(across, s);
    return weight + within * s;
  }

  /// `weight += s delta(A, B)`: `delta[o, i, k] = sum_r B[o, r] A[r, i, k]`.
  void add_delta_weight(
      torch::Tensor& weight,
      const torch::Tensor& A,
      const torch::Tensor& B,
      double s) const {
    if (this->options.groups() == 1) {
      const auto out = weight.size(0);
      const auto rank = A.size(0);
      const auto B_matrix = B.reshape({out, rank});
      const auto A_matrix = A.reshape({rank, -1});
      if (weight.is_contiguous()) {
        weight.view({out, -1}).addmm_(B_matrix, A_matrix, 1, s);
      } else { // channels_last and other layouts: not viewable as a matrix
        weight.add_(B_matrix.mm(A_matrix).view(weight.sizes()), s);
      }
      return;
    }
    const auto [within, across] = grouped_delta(A, B);
    check_within_groups(across, s);
    weight.add_(within, s);
  }

  void check_delta_fits() const {
    if (this->options.groups() == 1) {
      return;
    }
    for (const auto& adapter : this->adapters()) {
      if (adapter.active) {
        check_within_groups(
            grouped_delta(adapter.A.detach(), adapter.B.detach()).second,
            adapter.effective_scaling());
      }
    }
  }

  /// `across`: the largest magnitude the adapter puts across groups, before
  /// its scale `s`.
  void check_within_groups(double across, double s) const {
    TORCHLORA_CHECK(
        std::isfinite(across),
        "cannot merge this ",
        kName,
        ": its base is a grouped convolution (groups = ",
        this->options.groups(),
        ") and the adapter's weights are not finite (",
        across,
        "), so whether it stays within the groups cannot be told; keep it "
        "unmerged." TORCHLORA_NOTHING_CHANGED);
    TORCHLORA_CHECK(
        across * s == 0,
        "cannot merge this ",
        kName,
        ": its base is a grouped convolution (groups = ",
        this->options.groups(),
        "), whose weight [out_channels, in_channels / groups, k...] joins "
        "channels of the same group only, but the adapter joins channels "
        "across groups (weights up to ",
        across * std::abs(s),
        "); keep it unmerged." TORCHLORA_NOTHING_CHANGED);
  }
};

/// LoRA over `torch::nn::Conv1d`.
using LoRAConv1dImpl = LoRAConvImplT<1, torch::nn::Conv1dImpl>;
/// LoRA over `torch::nn::Conv2d`.
using LoRAConv2dImpl = LoRAConvImplT<2, torch::nn::Conv2dImpl>;
/// LoRA over `torch::nn::Conv3d`.
using LoRAConv3dImpl = LoRAConvImplT<3, torch::nn::Conv3dImpl>;

/// `ModuleHolder`s used like `torch::nn::Conv1d`, `Conv2d`, `Conv3d`.
TORCH_MODULE(LoRAConv1d);
TORCH_MODULE(LoRAConv2d);
TORCH_MODULE(LoRAConv3d);

} // namespace torchlora
