#pragma once

// LoRALinearImplT (linear.h) over a quantized base (`QuantizedLinear`):
// quantizing and dequantizing the base in place, unloading to a float
// Linear, and what a quantized base refuses.

#include <torchlora/detail/check.h>
#include <torchlora/detail/text.h>
#include <torchlora/linear.h>
#include <torchlora/quantized_linear.h>

#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <memory>
#include <string>

namespace torchlora {

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::quantize_base(
    const QuantizedLinearOptions& quantization) {
  check_base_replaceable("quantize_base");
  TORCHLORA_CHECK(
      quantized_base() == nullptr,
      "quantize_base on a layer whose base is quantized already (",
      to_string(quantized_base()->quantization.format()),
      "); dequantize_base() first." TORCHLORA_NOTHING_CHANGED);
  TORCHLORA_CHECK(
      this->adapter_names().empty(),
      "quantize_base on a layer with adapters (",
      detail::quoted_list(this->adapter_names()),
      "): their training saw the float base. Quantize before adding "
      "adapters." TORCHLORA_NOTHING_CHANGED);
  auto quantized = std::make_shared<QuantizedLinearImpl>(
      torch::nn::Linear(
          std::static_pointer_cast<torch::nn::LinearImpl>(this->base_)),
      quantization);
  adopt_base(quantized);
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::dequantize_base() {
  if (quantized_base() == nullptr) {
    return;
  }
  check_base_replaceable("dequantize_base");
  adopt_base(float_linear(quantized_base()->dequantized_weight()));
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::check_weight_mergeable() const {
  const auto* quantized = quantized_base();
  TORCHLORA_CHECK(
      quantized == nullptr,
      "cannot merge into a base weight quantized as ",
      to_string(quantized->quantization.format()),
      ": rounding the merged weight to its codes "
      "would lose most of the adapters' change. Serve unmerged, or "
      "merge_and_unload() to a float model." TORCHLORA_NOTHING_CHANGED);
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::unload(bool merge_first) {
  if (!merge_first || quantized_base() == nullptr) {
    Base::unload(merge_first);
    return;
  }
  this->check_mergeable();
  check_base_replaceable("unload");
  auto merged = float_linear(this->weight_with_adapters());
  Base::unload(/*merge_first=*/false);
  adopt_base(merged);
}

template <typename BaseImpl>
torch::nn::AnyModule LoRALinearImplT<BaseImpl>::base_any_module() const {
  if (quantized_base() != nullptr) {
    return torch::nn::AnyModule(std::dynamic_pointer_cast<QuantizedLinearImpl>(
        std::shared_ptr<torch::nn::Module>(this->base_)));
  }
  return Base::base_any_module();
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::reset_parameters() {
  const auto* quantized = quantized_base();
  TORCHLORA_CHECK(
      quantized == nullptr,
      "reset_parameters on a layer whose base is quantized (",
      to_string(quantized->quantization.format()),
      "): the float weight is gone; re-initialize the float model and "
      "quantize it again." TORCHLORA_NOTHING_CHANGED);
  Base::reset_parameters();
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::bind_member(const std::string& where) {
  TORCHLORA_CHECK(
      quantized_base() == nullptr,
      "cannot bind ",
      where,
      ": its base is quantized, and LibTorch's module would read the codes "
      "as its weight");
  Base::bind_member(where);
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::register_base_state() {
  if (const auto* quantized = quantized_base()) {
    for (const auto& [name, tensor] : quantized->named_state()) {
      if (name != this->kWeightName) {
        this->register_parameter(name, tensor, /*requires_grad=*/false);
      }
    }
  }
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::check_adapter_options(
    const std::string& name,
    const LoRAOptions& lora) const {
  const auto* quantized = quantized_base();
  if (quantized == nullptr) {
    return;
  }
  const auto init = lora.init();
  TORCHLORA_CHECK(
      !lora.use_dora() && init != LoRAInit::pissa && init != LoRAInit::olora,
      "adapter \"",
      name,
      "\" asks for ",
      lora.use_dora() ? std::string("DoRA (use_dora)")
                      : std::string("init ") + to_string(init),
      ", which is not offered over a base quantized as ",
      to_string(quantized->quantization.format()),
      " (it reads or rewrites the float weight)");
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::check_base_replaceable(
    const char* operation) const {
  this->check_not_merged(operation);
  TORCHLORA_CHECK(
      !this->member_bound(),
      operation,
      " on a layer bound to a LibTorch module's member (its forward reads "
      "a float weight)." TORCHLORA_NOTHING_CHANGED);
  TORCHLORA_CHECK(
      this->running_forwards() == 0 && this->member_weight_holds() == 0,
      operation,
      " while a forward runs through this layer." TORCHLORA_NOTHING_CHANGED);
}

template <typename BaseImpl>
void LoRALinearImplT<BaseImpl>::adopt_base(
    const std::shared_ptr<torch::nn::LinearImpl>& base) {
  auto typed = std::dynamic_pointer_cast<BaseImpl>(
      std::shared_ptr<torch::nn::Module>(base));
  TORCHLORA_INTERNAL_ASSERT(typed, "a base of another type");
  // The layer's own parameters are the base's; adapters are children.
  this->parameters_.clear();
  this->base_ = typed;
  this->base_->train(this->is_training());
  this->reset();
}

} // namespace torchlora
