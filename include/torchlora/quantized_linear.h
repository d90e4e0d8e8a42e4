#pragma once

#include <torchlora/detail/archive_check.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/move_tensors.h>
#include <torchlora/detail/quantized_codes.h>
#include <torchlora/detail/quantized_linear_function.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/input-archive.h>
#include <torch/types.h>

#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {

/// How `QuantizedLinear` (and `quantize`) store a frozen weight.
///
/// Example:
/// ```
/// auto nf4 = torchlora::QuantizedLinearOptions()
///                .format(torchlora::QuantizedFormat::nf4)
///                .block_size(64)
///                .double_quant(true);
/// ```
struct QuantizedLinearOptions {
  /// int8 (1 byte per weight) or nf4 (half a byte). Default: nf4.
  TORCH_ARG(QuantizedFormat, format) = QuantizedFormat::nf4;
  /// nf4: how many consecutive weights (row-major) share one scale; even.
  /// Default: 64, as QLoRA.
  TORCH_ARG(int64_t, block_size) = 64;
  /// nf4: store the block scales as int8 codes too (QLoRA's "double
  /// quantization"; torchlora's own scheme: the log2 of each scale as an
  /// int8 code on the range of its group of 256, so small blocks keep their
  /// relative precision next to large ones). 8 bits per block instead of 32.
  /// Default: false.
  TORCH_ARG(bool, double_quant) = false;
};

namespace detail {

inline void check_quantized_options(const QuantizedLinearOptions& options) {
  const bool nf4 = options.format() == QuantizedFormat::nf4;
  TORCHLORA_CHECK(
      !nf4 || (options.block_size() >= 2 && options.block_size() % 2 == 0),
      "the NF4 block_size must be even and at least 2, got ",
      options.block_size());
  TORCHLORA_CHECK(
      nf4 || !options.double_quant(),
      "double_quant applies to nf4 only, got format ",
      to_string(options.format()));
}

inline void check_quantizable_weight(const torch::Tensor& weight) {
  TORCHLORA_CHECK(
      weight.defined() && weight.dim() == 2 && weight.is_floating_point(),
      "quantizing needs a floating-point weight [out, in], got ",
      weight.defined() ? std::string(weight.toString()) : "an undefined tensor",
      weight.defined() ? " of shape " + c10::str(weight.sizes()) : "");
  TORCHLORA_CHECK(
      torch::isfinite(weight).all().item<bool>(),
      "the weight (of shape ",
      weight.sizes(),
      ") holds NaN or Inf, which would make its scales NaN");
}

/// A float, frozen `torch::nn::Linear` holding `weight` `[out, in]` and the
/// values of `bias` (undefined: none), which keeps its trainable flag.
inline std::shared_ptr<torch::nn::LinearImpl> make_float_linear(
    const torch::Tensor& weight,
    const torch::Tensor& bias) {
  torch::NoGradGuard no_grad;
  auto linear = std::make_shared<torch::nn::LinearImpl>(
      torch::nn::LinearOptions(weight.size(1), weight.size(0))
          .bias(bias.defined()));
  linear->weight.set_data(weight.detach());
  linear->weight.set_requires_grad(false);
  if (bias.defined()) {
    linear->bias.set_data(bias.detach());
    linear->bias.set_requires_grad(bias.requires_grad());
  }
  return linear;
}

} // namespace detail

/// A frozen Linear whose weight is stored quantized (int8 or QLoRA's NF4):
/// `y = x dequantize(W)^T + b`, computed by dequantizing the weight into the
/// dtype of its scales and multiplying. The backward gives the input's
/// gradient by dequantizing again (no float copy of the weight is kept
/// between them) and the bias's when it is trainable; the weight gets none.
///
/// It is a `torch::nn::LinearImpl` (with `options`, `bias`, and `weight`
/// holding the codes), so a `torchlora::LoRALinear` takes it as its base and
/// `inject_lora` adapts it like any Linear. Its tensors are parameters that
/// never require a gradient: `weight` (int8 `[out, in]` codes, or nf4 codes
/// packed two per byte), then `weight_scale` (int8, `[out]`) or
/// `weight_absmax` (nf4, `[blocks]`; int8 codes when double-quantized, with
/// `weight_absmax_low` and `weight_absmax_step`), and `bias`. The float
/// ones follow `to(dtype)`, and set the dtype it computes in; the codes keep
/// theirs.
///
/// Call it through this holder, a `Sequential` or a `torchlora::LoRALinear`:
/// `torch::nn::LinearImpl::forward` is not virtual and would read the codes
/// as a float weight (LibTorch refuses the dtype).
///
/// Example:
/// ```
/// torch::nn::Linear linear(256, 128);
/// torchlora::QuantizedLinear nf4(linear, torchlora::QuantizedLinearOptions());
/// torch::Tensor y = nf4(torch::randn({4, 256}));  // [4, 128]
/// torchlora::LoRALinear lora(nf4, torchlora::LoRAOptions(8));
/// ```
class QuantizedLinearImpl : public torch::nn::LinearImpl {
 public:
  /// `linear`'s weight quantized (`linear` itself is not changed); its bias
  /// is shared, not copied, and keeps its trainable flag.
  explicit QuantizedLinearImpl(
      const torch::nn::Linear& linear,
      const QuantizedLinearOptions& quantization = {})
      : torch::nn::LinearImpl(checked(linear)->options),
        quantization(quantization) {
    detail::check_quantized_options(quantization);
    detail::check_quantizable_weight(linear->weight);
    adopt(
        quantized_tensors(linear->weight, quantization, linear->weight),
        linear->bias);
  }

  /// A new Linear of `options` (LibTorch's initialization), quantized.
  explicit QuantizedLinearImpl(
      const torch::nn::LinearOptions& options,
      const QuantizedLinearOptions& quantization = {})
      : torch::nn::LinearImpl(options), quantization(quantization) {
    detail::check_quantized_options(quantization);
    reset();
  }

  /// A new Linear of `options`, initialized as LibTorch does, quantized.
  void reset() override {
    torch::nn::LinearImpl fresh(options);
    adopt(
        quantized_tensors(fresh.weight, quantization, fresh.weight),
        fresh.bias);
  }

  /// Refused: the float weight is gone (LibTorch's `reset_parameters`
  /// would initialize the codes as floats). `reset()` makes a new random
  /// layer of the same options instead.
  void reset_parameters() {
    TORCHLORA_CHECK(
        false,
        "reset_parameters on a QuantizedLinear (",
        to_string(quantization.format()),
        "): the float weight is gone; re-initialize the float model and "
        "quantize it again." TORCHLORA_NOTHING_CHANGED);
  }

  /// True when `other` stores a weight as these options do.
  bool same_storage(const QuantizedLinearOptions& other) const {
    return other.format() == quantization.format() &&
        (other.format() == QuantizedFormat::int8 ||
         (other.block_size() == quantization.block_size() &&
          other.double_quant() == quantization.double_quant()));
  }

  /// Deep copy: new tensors with equal values (on `device` if given).
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device =
          c10::nullopt) const override {
    torch::NoGradGuard no_grad;
    auto copy = std::make_shared<QuantizedLinearImpl>(*this);
    copy->parameters_.clear();
    detail::QuantizedTensors tensors;
    for (const auto& [name, tensor] : named_state()) {
      tensors.named.emplace_back(
          name, device ? tensor.to(*device).clone() : tensor.clone());
    }
    torch::Tensor b;
    if (bias.defined()) {
      b = device ? bias.to(*device).clone() : bias.clone();
      b.set_requires_grad(bias.requires_grad());
    }
    copy->adopt(tensors, b);
    copy->train(is_training());
    return copy;
  }

  /// `x dequantize(W)^T + b` for an input of any number of leading
  /// dimensions whose last is `in_features`, in the layer's float dtype.
  torch::Tensor forward(const torch::Tensor& input) {
    TORCHLORA_CHECK(
        input.dim() >= 1 && input.size(-1) == options.in_features(),
        "QuantizedLinear expects the input's last dimension to be "
        "in_features = ",
        options.in_features(),
        ", got an input of shape ",
        input.sizes());
    TORCHLORA_CHECK(
        input.scalar_type() == compute_dtype(),
        "QuantizedLinear computes in ",
        c10::toString(compute_dtype()),
        " (the dtype of its scales, set by to(dtype)), got an input of ",
        c10::toString(input.scalar_type()));
    auto sizes = input.sizes().vec();
    sizes.back() = options.out_features();
    const auto x = input.reshape({-1, options.in_features()});
    const auto b = bias.defined() ? bias : x.new_empty({0});
    const bool record = at::GradMode::is_enabled() &&
        (x.requires_grad() || (bias.defined() && bias.requires_grad()));
    const auto ref = weight_ref();
    const auto y = record ? detail::QuantizedLinearFunction::apply(x, b, ref)
                          : detail::QuantizedLinearFunction::compute(x, b, ref);
    return y.view(sizes);
  }

  /// The float weight `[out, in]` the codes stand for, in the dtype the
  /// layer computes in. A new tensor each call.
  torch::Tensor dequantized_weight() const {
    torch::NoGradGuard no_grad;
    return detail::dequantize(weight_ref());
  }

  /// The dtype the layer computes in: that of its float scales.
  torch::Dtype compute_dtype() const {
    for (const auto& [name, tensor] : named_state()) {
      if (tensor.is_floating_point()) {
        return tensor.scalar_type();
      }
    }
    return torch::kFloat32;
  }

  /// The bytes the weight takes in memory: its codes and their scales
  /// (the bias not counted).
  int64_t weight_bytes() const {
    int64_t bytes = 0;
    for (const auto& [name, tensor] : named_state()) {
      bytes += tensor.numel() * static_cast<int64_t>(tensor.element_size());
    }
    return bytes;
  }

  /// The weight's tensors in registration order: `weight` first, then its
  /// scales (the bias is not among them).
  std::vector<std::pair<std::string, torch::Tensor>> named_state() const {
    // Read from the registry each time: LibTorch's clone of a parent
    // assigns a copy's registry into a typed member of this type.
    std::vector<std::pair<std::string, torch::Tensor>> state;
    for (const auto& item : named_parameters(/*recurse=*/false)) {
      if (item.key() != "bias") {
        state.emplace_back(item.key(), item.value());
      }
    }
    return state;
  }

  /// What a dequantization reads: the format, shape and current tensors.
  detail::QuantizedWeightRef weight_ref() const {
    detail::QuantizedWeightRef ref{
        quantization.format(),
        options.out_features(),
        options.in_features(),
        quantization.block_size(),
        {}};
    for (const auto& [name, tensor] : named_state()) {
      ref.tensors.push_back(tensor);
    }
    return ref;
  }

  /// Moves the layer; `dtype` casts the scales and the bias (the dtype it
  /// computes in), never the codes.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false)
      override {
    detail::move_own_tensors(*this, device, dtype, non_blocking);
  }

  void to(torch::Dtype dtype, bool non_blocking = false) override {
    detail::move_own_tensors(*this, c10::nullopt, dtype, non_blocking);
  }

  void to(torch::Device device, bool non_blocking = false) override {
    detail::move_own_tensors(*this, device, c10::nullopt, non_blocking);
  }

  /// Loads like any module, refusing (before anything of this layer is
  /// read) an archive whose tensors are not this layer's: a float
  /// checkpoint (load it before `quantize`), another format or block size.
  void load(torch::serialize::InputArchive& archive) override {
    detail::check_archive_fits(*this, archive, "QuantizedLinear");
    torch::nn::Module::load(archive);
  }

  /// `torchlora::QuantizedLinear(in_features=256, out_features=128,
  /// bias=true, format=nf4, block_size=64)`.
  void pretty_print(std::ostream& stream) const override {
    stream << std::boolalpha
           << "torchlora::QuantizedLinear(in_features=" << options.in_features()
           << ", out_features=" << options.out_features()
           << ", bias=" << options.bias()
           << ", format=" << to_string(quantization.format());
    if (quantization.format() == QuantizedFormat::nf4) {
      stream << ", block_size=" << quantization.block_size();
      if (quantization.double_quant()) {
        stream << ", double_quant=true";
      }
    }
    stream << ")";
  }

  /// How the weight is stored.
  QuantizedLinearOptions quantization;

 private:
  static const torch::nn::Linear& checked(const torch::nn::Linear& linear) {
    TORCHLORA_CHECK(
        !linear.is_empty(),
        "cannot quantize an empty (nullptr) torch::nn::Linear; got a holder "
        "that holds no module");
    return linear;
  }

  /// The tensors of `weight` quantized, their scales in `like`'s dtype.
  static detail::QuantizedTensors quantized_tensors(
      const torch::Tensor& weight,
      const QuantizedLinearOptions& quantization,
      const torch::Tensor& like) {
    if (quantization.format() == QuantizedFormat::int8) {
      return detail::quantize_int8(weight, like.scalar_type());
    }
    return detail::quantize_nf4(
        weight,
        quantization.block_size(),
        quantization.double_quant(),
        like.scalar_type());
  }

  /// Registers `tensors` (codes first) and `b` as this layer's parameters.
  void adopt(const detail::QuantizedTensors& tensors, const torch::Tensor& b) {
    parameters_.clear();
    for (const auto& [name, tensor] : tensors.named) {
      auto& registered =
          register_parameter(name, tensor, /*requires_grad=*/false);
      if (name == "weight") {
        weight = registered;
      }
    }
    bias = b.defined() ? register_parameter("bias", b, b.requires_grad())
                       : torch::Tensor();
  }
};

/// A `ModuleHolder` for `QuantizedLinearImpl`; converts to a
/// `torch::nn::Linear` holder (what `LoRALinear` takes as its base).
///
/// Example:
/// ```
/// torchlora::QuantizedLinear int8(
///     torch::nn::Linear(64, 32),
///     torchlora::QuantizedLinearOptions().format(
///         torchlora::QuantizedFormat::int8));
/// ```
class QuantizedLinear : public torch::nn::ModuleHolder<QuantizedLinearImpl> {
 public:
  using torch::nn::ModuleHolder<QuantizedLinearImpl>::ModuleHolder;

  /// The same layer, held as a `torch::nn::Linear`.
  operator torch::nn::Linear() const { // NOLINT: implicit on purpose
    return torch::nn::Linear(
        std::static_pointer_cast<torch::nn::LinearImpl>(this->ptr()));
  }
};

} // namespace torchlora
