#pragma once

#include <torchlora/detail/check.h>
#include <torchlora/detail/matrix_dicts.h>
#include <torchlora/layer_base.h>
#include <torchlora/linear.h>
#include <torchlora/options.h>

#include <torch/nn/functional/activation.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <utility>

namespace torchlora {

/// LoRA on the packed q/k/v projection of a `torch::nn::MultiheadAttention`,
/// as Python peft does: one adapter over `in_proj_weight` `[3E, E]`, with A
/// `[r, E]` and B `[3E, r]`, so that the projection is `W + s B A`.
///
/// The attention's own tensors are registered under their own names
/// (`in_proj_weight`, `in_proj_bias`, `bias_k`, `bias_v`, `out_proj.*`):
/// checkpoint keys are the plain module's, plus `lora_A.<adapter>.weight`
/// and `lora_B.<adapter>.weight`. `inject_lora` adapts the output projection
/// `out_proj` with a `LoRALinear` of the same options, as peft does.
///
/// Inside `TransformerEncoderLayer`/`TransformerDecoderLayer` LibTorch calls
/// the attention through its typed member, which reads `in_proj_weight` and
/// `out_proj->weight` directly: `inject_lora` binds those members (see
/// `AdaptedWeights`). Called itself, this module computes the same.
///
/// The adapter acts on the weight, so its dropout must be 0; attention with
/// kdim/vdim other than embed_dim (separate q/k/v weights) is refused, as
/// in peft.
///
/// Example:
/// ```
/// torch::nn::MultiheadAttention base(torch::nn::MultiheadAttentionOptions(32,
/// 4)); torchlora::LoRAMultiheadAttention attention(base,
/// torchlora::LoRAOptions(4)); auto [out, weights] = attention(x, x, x);
/// ```
class LoRAMultiheadAttentionImpl final
    : public LoRALayerImpl<
          LoRAMultiheadAttentionImpl,
          torch::nn::MultiheadAttentionImpl> {
  using Base = LoRALayerImpl<
      LoRAMultiheadAttentionImpl,
      torch::nn::MultiheadAttentionImpl>;
  friend Base;

 public:
  using typename Base::BaseHolder;

  static constexpr const char* kName = "LoRAMultiheadAttention";
  /// peft refuses DoRA on MultiheadAttention; so does torchlora.
  static constexpr bool kTakesDora = false;
  static constexpr const char* kBaseName = "MultiheadAttention";

  /// Adopts `base` (sharing its tensors and its `out_proj`) with no adapter.
  explicit LoRAMultiheadAttentionImpl(const BaseHolder& base)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(base) {
    register_rest();
  }

  /// Wraps `base`, freezes its projection and attaches the adapter
  /// "default" on `in_proj_weight`.
  LoRAMultiheadAttentionImpl(const BaseHolder& base, const LoRAOptions& lora)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(base) {
    register_rest();
    this->wrap_with(lora);
  }

  /// `torch::nn::MultiheadAttention`'s forward, with the adapted q/k/v
  /// projection and, when `out_proj` is a `LoRALinear`, its adapted weight.
  std::tuple<torch::Tensor, torch::Tensor> forward(
      const torch::Tensor& query,
      const torch::Tensor& key,
      const torch::Tensor& value,
      const torch::Tensor& key_padding_mask = {},
      bool need_weights = true,
      const torch::Tensor& attn_mask = {},
      bool average_attn_weights = true) {
    const auto running = this->forward_scope();
    TORCHLORA_CHECK(
        this->row_routing() == nullptr,
        "AdapterRouting cannot route rows through a "
        "LoRAMultiheadAttention: its adapter acts on the weight, which every "
        "row shares");
    namespace F = torch::nn::functional;
    const auto& o = this->options;
    const auto [out_weight, out_bias] = output_projection();
    return F::multi_head_attention_forward(
        query,
        key,
        value,
        F::MultiheadAttentionForwardFuncOptions(
            o.embed_dim(),
            o.num_heads(),
            this->adapted_weight(),
            this->bias,
            this->base_->bias_k,
            this->base_->bias_v,
            o.add_zero_attn(),
            o.dropout(),
            out_weight,
            out_bias)
            .training(this->is_training())
            .key_padding_mask(key_padding_mask)
            .need_weights(need_weights)
            .attn_mask(attn_mask)
            .average_attn_weights(average_attn_weights));
  }

  /// Deep copy, `out_proj` (and its adapters) included.
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device =
          c10::nullopt) const override {
    auto copy = std::dynamic_pointer_cast<LoRAMultiheadAttentionImpl>(
        Base::clone(device));
    const auto out_proj = this->named_children()["out_proj"];
    if (dynamic_cast<const LoRALayer*>(out_proj.get()) != nullptr) {
      auto out_copy =
          std::dynamic_pointer_cast<LoRALinearImpl>(out_proj->clone(device));
      TORCHLORA_INTERNAL_ASSERT(out_copy, "out_proj clone failed");
      copy->replace_module("out_proj", out_copy);
      copy->base_->out_proj = torch::nn::Linear(out_copy->base_layer());
      copy->base_->replace_module("out_proj", copy->base_->out_proj.ptr());
    }
    return copy;
  }

  /// Removes the adapters (see `LoRALayer::unload`) and gives the attention's
  /// registry back the `out_proj` this layer holds.
  void unload(bool merge_first) override {
    Base::unload(merge_first);
    this->base_->replace_module("out_proj", this->named_children()["out_proj"]);
  }

  /// The A matrices by adapter name; empty holder until the first adapter.
  torch::nn::ModuleDict lora_A{nullptr};
  /// The B matrices by adapter name; empty holder until the first adapter.
  torch::nn::ModuleDict lora_B{nullptr};

 private:
  static constexpr const char* kWeightName = "in_proj_weight";
  static constexpr const char* kBiasName = "in_proj_bias";

  /// The packed q/k/v weight (checked first, as the layer registers it).
  static torch::Tensor& member_weight(torch::nn::MultiheadAttentionImpl& base) {
    TORCHLORA_CHECK(
        base._qkv_same_embed_dim,
        "cannot adapt a MultiheadAttention whose kdim (",
        base.options.kdim(),
        ") or vdim (",
        base.options.vdim(),
        ") differs from embed_dim (",
        base.options.embed_dim(),
        "): it keeps separate q/k/v weights, and torchlora (like peft) adapts "
        "the packed in_proj_weight only");
    return base.in_proj_weight;
  }

  static torch::Tensor bias_of(const torch::nn::MultiheadAttentionImpl& base) {
    return base.in_proj_bias;
  }

  /// The attention's other tensors and its `out_proj`, as its own registry
  /// holds it now (a `LoRALinear` once adapted), under their own names.
  void register_rest() {
    for (const auto* name : {"bias_k", "bias_v"}) {
      const auto& tensor = std::string(name) == "bias_k" ? this->base_->bias_k
                                                         : this->base_->bias_v;
      if (tensor.defined()) {
        this->register_parameter(name, tensor, tensor.requires_grad());
      }
    }
    // The attention's registry may hold a LoRALinear out_proj (adapted
    // first): this layer holds it from now on, and the attention's registry
    // its plain Linear again (so that it clones), until `unload`.
    auto& base = *this->base_;
    this->register_module("out_proj", base.named_children()["out_proj"]);
    base.replace_module("out_proj", base.out_proj.ptr());
  }

  /// The output projection's weight and bias: the adapted ones of a
  /// `LoRALinear`, else the plain layer's.
  std::pair<torch::Tensor, torch::Tensor> output_projection() const {
    const auto child = this->named_children()["out_proj"];
    if (const auto* lora = child->as<LoRALinearImpl>()) {
      return {lora->adapted_weight(), lora->bias};
    }
    const auto* plain = child->as<torch::nn::LinearImpl>();
    TORCHLORA_INTERNAL_ASSERT(plain, "out_proj is not a Linear");
    return {plain->weight, plain->bias};
  }

  std::pair<torch::Tensor, torch::Tensor> create_matrices(
      const std::string& name,
      int64_t rank,
      torch::Device device,
      torch::Dtype dtype) {
    const auto embed_dim = this->options.embed_dim();
    const auto A = detail::make_lora_matrix(embed_dim, rank, device, dtype);
    const auto B = detail::make_lora_matrix(rank, 3 * embed_dim, device, dtype);
    detail::add_matrix_modules(*this, lora_A, lora_B, name, A.ptr(), B.ptr());
    return {A->weight, B->weight};
  }

  void remove_matrices(const std::string& name, bool last) {
    detail::remove_matrix_modules(*this, lora_A, lora_B, name, last);
  }

  /// The adapter acts on the weight: its input cannot be dropped out.
  void check_adapter_options(const std::string& name, const LoRAOptions& lora)
      const {
    TORCHLORA_CHECK(
        lora.dropout() == 0,
        "adapter \"",
        name,
        "\" of a MultiheadAttention needs dropout 0, got ",
        lora.dropout(),
        ": the adapter is applied as one weight W + s B A over the packed "
        "q/k/v projection, so its input cannot be dropped out");
  }
};

/// A `ModuleHolder` for `LoRAMultiheadAttentionImpl`.
TORCH_MODULE(LoRAMultiheadAttention);

} // namespace torchlora
