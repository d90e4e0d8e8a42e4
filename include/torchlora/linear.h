#pragma once

#include <torchlora/detail/check.h>
#include <torchlora/detail/lora_linear_function.h>
#include <torchlora/detail/matrix_dicts.h>
#include <torchlora/layer_base.h>
#include <torchlora/options.h>
#include <torchlora/quantized_linear.h>

#include <torch/nn/functional/linear.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace torchlora {
namespace detail {

/// A bias-free Linear whose weight is a LoRA matrix of `[out, in]`.
inline torch::nn::Linear make_lora_matrix(
    int64_t in,
    int64_t out,
    torch::Device device,
    torch::Dtype dtype) {
  torch::nn::Linear matrix(torch::nn::LinearOptions(in, out).bias(false));
  matrix->to(device, dtype);
  return matrix;
}

} // namespace detail

/// A Linear layer with LoRA adapters: `y = x W^T + b + sum over adapters of
/// scaling * (dropout(x) A^T) B^T`, where W and b are the frozen base layer's.
///
/// The base layer's `weight` and `bias` are registered under those exact
/// names (they are the same tensors, never copies), so checkpoint keys are a
/// plain Linear's. Each adapter adds `lora_A.<name>.weight` `[r, in]` and
/// `lora_B.<name>.weight` `[out, r]`.
///
/// Built from `LinearOptions` it is a plain, trainable Linear until
/// `add_adapter` attaches an adapter: declare typed members of a model this
/// way to make them adaptable by `inject_lora`.
///
/// Example:
/// ```
/// torch::nn::Linear base(torch::nn::LinearOptions(64, 32));
/// torchlora::LoRALinear layer(base, torchlora::LoRAOptions(8).alpha(16));
/// torch::Tensor y = layer(torch::randn({4, 10, 64}));  // [4, 10, 32]
/// ```
///
/// The base may be a `torchlora::QuantizedLinear` (a `LinearImpl` whose
/// weight is stored as int8 or NF4 codes): the forward then dequantizes it,
/// `merge` is refused (the codes cannot hold a merged weight) and
/// `merge_and_unload` gives a float Linear; `quantize_base` quantizes the
/// base of a layer in place (what `torchlora::quantize` does to typed
/// members).
///
/// `BaseImpl` is the base layer's module type, `torch::nn::LinearImpl` for
/// `LoRALinear`. Any type with LinearImpl's shape works: a constructor from
/// its `options` (which have `in_features()`, `out_features()`, `bias()`),
/// `weight` and `bias` tensors, `reset_parameters()`, `pretty_print`, and a
/// forward equal to `torch::nn::functional::linear(x, weight, bias)`.
template <typename BaseImpl>
class LoRALinearImplT final
    : public LoRALayerImpl<LoRALinearImplT<BaseImpl>, BaseImpl> {
  using Base = LoRALayerImpl<LoRALinearImplT<BaseImpl>, BaseImpl>;
  friend Base;

 public:
  using typename Base::BaseHolder;
  using typename Base::BaseOptions;
  static constexpr const char* kName = "LoRALinear";
  static constexpr const char* kBaseName = "Linear";
  /// PiSSA and OLoRA factorize a Linear's weight.
  static constexpr bool kTakesWeightInit = true;

  /// A plain, trainable Linear of `in_features -> out_features`.
  LoRALinearImplT(int64_t in_features, int64_t out_features)
      : LoRALinearImplT(BaseOptions(in_features, out_features)) {}

  /// A plain, trainable Linear; attach adapters with `add_adapter`.
  explicit LoRALinearImplT(const BaseOptions& options_)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name())
            Base(BaseHolder(std::make_shared<BaseImpl>(options_))) {}

  /// Adopts `base` (sharing its tensors) with no adapter and without changing
  /// which of its tensors are trainable.
  explicit LoRALinearImplT(const BaseHolder& base)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(base) {}

  /// Wraps `base` (sharing its tensors), freezes it and attaches the adapter
  /// "default". With rank 0 it is the frozen base with no adapter.
  LoRALinearImplT(const BaseHolder& base, const LoRAOptions& lora)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(base) {
    this->wrap_with(lora);
  }

  /// `x W^T + b` plus each active adapter's scaled low-rank product; just
  /// `x W^T + b` when merged or disabled. `input` has any number of leading
  /// dimensions; its last one must be `in_features`. One active adapter
  /// without dropout work takes a fused path (see LoRALinearFunction).
  torch::Tensor forward(const torch::Tensor& input) {
    const auto running = this->forward_scope();
    const auto& options = this->options;
    TORCHLORA_CHECK(
        input.dim() >= 1 && input.size(-1) == options.in_features(),
        "LoRALinear expects the input's last dimension to be "
        "in_features = ",
        options.in_features(),
        ", got an input of shape ",
        input.sizes());
    const auto& weight = this->weight;
    const auto& bias = this->bias;
    auto sizes = input.sizes().vec();
    sizes.back() = options.out_features();
    auto* quantized = quantized_base();
    if (const auto* routing = this->row_routing()) {
      this->check_routed_input(*routing, input, 2, "a batched input");
      const auto x = input.reshape({-1, options.in_features()});
      const auto rows = std::max<int64_t>(routing->rows(), 1);
      return this
          ->routed_forward(
              *routing,
              x,
              x.size(0) / rows,
              [&](const torch::Tensor& grouped) {
                return quantized != nullptr
                    ? quantized->forward(grouped)
                    : torch::nn::functional::linear(grouped, weight, bias);
              })
          .view(sizes);
    }
    if (quantized != nullptr) {
      const auto x = input.reshape({-1, options.in_features()});
      auto y = quantized->forward(x);
      if (this->adapters_in_use()) {
        this->add_adapter_outputs(x, y);
      }
      return y.view(sizes);
    }
    if (!this->adapters_in_use()) {
      return torch::nn::functional::linear(input, weight, bias);
    }
    const auto x = input.reshape({-1, options.in_features()});
    if (this->dora_in_use()) {
      return this->forward_with_dora(x, base_output(x)).view(sizes);
    }
    torch::Tensor y;
    if (const auto* adapter = fast_path_adapter(x)) {
      const auto b = bias.defined() ? bias : x.new_empty({0});
      const bool fold = detail::fold_adapter_into_weight(
          x.size(0),
          options.in_features(),
          options.out_features(),
          x.scalar_type());
      const double s = adapter->effective_scaling();
      if (needs_gradient(x, *adapter)) {
        y = detail::LoRALinearFunction::apply(
            x, weight, b, adapter->A, adapter->B, s, fold);
      } else {
        // Serving: the same values without the autograd Function's cost.
        y = detail::LoRALinearFunction::compute(
            {x, weight, b, adapter->A, adapter->B, s}, fold);
      }
    } else {
      y = torch::nn::functional::linear(x, weight, bias);
      this->add_adapter_outputs(x, y);
    }
    return y.view(sizes);
  }

  /// The quantized base, or null when the base is a float Linear.
  QuantizedLinearImpl* quantized_base() const {
    return dynamic_cast<QuantizedLinearImpl*>(this->base_.get());
  }

  /// Quantizes the base weight in place (the layer keeps its type, so a
  /// typed member stays valid): the base becomes a `QuantizedLinear` sharing
  /// the bias. Refused with adapters (quantize before adding them), when
  /// merged, bound to a LibTorch module's member, or already quantized.
  void quantize_base(const QuantizedLinearOptions& quantization);

  /// Replaces a quantized base by a float `torch::nn::Linear` holding the
  /// dequantized weight (in the dtype the base computes in) and the same
  /// bias; adapters stay. Nothing happens when the base is a float Linear.
  void dequantize_base();

  /// Refused when the base is quantized: merging would need a float
  /// weight; `merge_and_unload` gives one.
  void check_weight_mergeable() const override;

  /// With a quantized base and `merge_first`, the base becomes a float
  /// Linear holding the dequantized weight plus the active adapters'
  /// deltas; otherwise as for any LoRA layer.
  void unload(bool merge_first) override;

  /// The base as an `AnyModule`: a quantized base runs its own forward.
  torch::nn::AnyModule base_any_module() const override;

  /// Refused with a quantized base (its weight cannot be re-initialized
  /// from codes); otherwise re-initializes the base and every adapter.
  void reset_parameters();

  /// Refused with a quantized base: LibTorch's modules read a float weight.
  void bind_member(const std::string& where) override;

  /// The A matrices by adapter name; empty holder until the first adapter.
  torch::nn::ModuleDict lora_A{nullptr};

  /// The B matrices by adapter name; empty holder until the first adapter.
  torch::nn::ModuleDict lora_B{nullptr};

 private:
  std::pair<torch::Tensor, torch::Tensor> create_matrices(
      const std::string& name,
      int64_t rank,
      torch::Device device,
      torch::Dtype dtype) {
    const auto A = detail::make_lora_matrix(
        this->options.in_features(), rank, device, dtype);
    const auto B = detail::make_lora_matrix(
        rank, this->options.out_features(), device, dtype);
    detail::add_matrix_modules(*this, lora_A, lora_B, name, A.ptr(), B.ptr());
    return {A->weight, B->weight};
  }

  /// A quantized base's scales, registered under their own names.
  void register_base_state();

  /// A quantized base computes in the dtype of its scales.
  torch::Dtype compute_dtype() const {
    const auto* quantized = quantized_base();
    return quantized != nullptr ? quantized->compute_dtype()
                                : this->weight.scalar_type();
  }

  /// A quantized base's weight dequantized.
  torch::Tensor float_weight() const {
    const auto* quantized = quantized_base();
    return quantized != nullptr ? quantized->dequantized_weight()
                                : this->weight;
  }

  /// DoRA and PiSSA/OLoRA read and rewrite the float weight: refused over
  /// a quantized base.
  void check_adapter_options(const std::string& name, const LoRAOptions& lora)
      const;

  void check_base_replaceable(const char* operation) const;

  /// A float Linear holding `weight` and this layer's bias.
  std::shared_ptr<torch::nn::LinearImpl> float_linear(
      const torch::Tensor& weight) const {
    return detail::make_float_linear(weight, this->bias);
  }

  /// Makes `base` this layer's base: its tensors replace the old base's
  /// under the same names; adapters are untouched.
  void adopt_base(const std::shared_ptr<torch::nn::LinearImpl>& base);

  void remove_matrices(const std::string& name, bool last) {
    detail::remove_matrix_modules(*this, lora_A, lora_B, name, last);
  }

  /// `x W^T`: the base's output without its bias (DoRA rescales it).
  torch::Tensor base_output(const torch::Tensor& x) const {
    return torch::nn::functional::linear(x, this->weight);
  }

  /// `(x A^T) B^T` in A's dtype.
  static torch::Tensor adapter_product(
      const detail::Adapter& adapter,
      const torch::Tensor& input) {
    return input.to(adapter.A.scalar_type())
        .mm(adapter.A.t())
        .mm(adapter.B.t());
  }

  /// y += s (x A^T) B^T, the scale and the add fused into one GEMM when the
  /// adapter has y's dtype.
  void add_adapter_output(
      const detail::Adapter& adapter,
      const torch::Tensor& input,
      torch::Tensor& y) const {
    if (adapter.A.scalar_type() != y.scalar_type()) {
      Base::add_adapter_output(adapter, input, y);
      return;
    }
    y.addmm_(
        input.mm(adapter.A.t()),
        adapter.B.t(),
        /*beta=*/1,
        /*alpha=*/adapter.effective_scaling());
  }

  /// True when autograd must record the forward: grad mode on and a
  /// tensor it reads requires grad.
  bool needs_gradient(const torch::Tensor& x, const detail::Adapter& adapter)
      const {
    return at::GradMode::is_enabled() &&
        (x.requires_grad() || this->weight.requires_grad() ||
         (this->bias.defined() && this->bias.requires_grad()) ||
         adapter.A.requires_grad() || adapter.B.requires_grad());
  }

  /// The one active adapter when the fused path applies: a single active
  /// adapter in the input's dtype whose dropout does nothing now; else null.
  const detail::Adapter* fast_path_adapter(const torch::Tensor& x) const {
    const detail::Adapter* found = nullptr;
    for (const auto& adapter : this->adapters()) {
      if (!adapter.active) {
        continue;
      }
      if (found != nullptr) {
        return nullptr;
      }
      found = &adapter;
    }
    if (found == nullptr ||
        (found->options.dropout() > 0 && this->is_training()) ||
        found->A.scalar_type() != x.scalar_type() ||
        this->weight.scalar_type() != x.scalar_type()) {
      return nullptr;
    }
    return found;
  }
};

/// LoRA over `torch::nn::Linear`: the layer `inject_lora` creates.
using LoRALinearImpl = LoRALinearImplT<torch::nn::LinearImpl>;

/// A `ModuleHolder` for `LoRALinearImpl`, used like `torch::nn::Linear`.
///
/// Example:
/// ```
/// torchlora::LoRALinear q(torch::nn::Linear(512, 512),
///                         torchlora::LoRAOptions(8).alpha(16));
/// torchlora::LoRALinear ready(torch::nn::LinearOptions(64, 32));
/// ready->add_adapter("default", torchlora::LoRAOptions(4));
/// ```
TORCH_MODULE(LoRALinear);

namespace detail {

/// True for a `QuantizedLinear`, or a `LoRALinear` over one.
inline bool is_quantized(const torch::nn::Module& module) {
  if (dynamic_cast<const QuantizedLinearImpl*>(&module) != nullptr) {
    return true;
  }
  const auto* lora = dynamic_cast<const LoRALinearImpl*>(&module);
  return lora != nullptr && lora->quantized_base() != nullptr;
}

} // namespace detail

} // namespace torchlora

#include <torchlora/layer/linear_quantized_base.h>
