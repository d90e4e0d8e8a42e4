#pragma once

#include <torchlora/layer.h>
#include <torchlora/quantized_linear.h>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>

namespace torchlora {

/// Parameter counts of a module; a tensor registered at several paths counts
/// once.
struct ParameterCount {
  /// Elements of the parameters that require grad.
  int64_t trainable = 0;
  /// Elements of all parameters.
  int64_t total = 0;
};

/// Counts the trainable and total parameter elements of `module`. A
/// quantized weight (`QuantizedLinear`, a `LoRALinear` over one) counts as
/// the `out x in` weights it stands for: its codes and scales are how they
/// are stored, not more or fewer parameters.
///
/// Example:
/// ```
/// auto counts = torchlora::count_parameters(*model);
/// std::cout << counts.trainable << " of " << counts.total << "\n";
/// ```
inline ParameterCount count_parameters(const torch::nn::Module& module) {
  ParameterCount counts;
  std::unordered_set<const void*> seen;
  const auto count_quantized = [&](const torch::nn::Module& layer) {
    const auto* quantized = dynamic_cast<const QuantizedLinearImpl*>(&layer);
    if (const auto* lora = dynamic_cast<const LoRALayer*>(&layer)) {
      quantized =
          dynamic_cast<const QuantizedLinearImpl*>(lora->base_module().get());
    }
    if (quantized == nullptr ||
        !seen.insert(quantized->weight.unsafeGetTensorImpl()).second) {
      return;
    }
    for (const auto& [name, tensor] : quantized->named_state()) {
      seen.insert(tensor.unsafeGetTensorImpl());
    }
    counts.total +=
        quantized->options.in_features() * quantized->options.out_features();
  };
  // Not `modules(true)`: the module may live outside a shared_ptr.
  count_quantized(module);
  for (const auto& child : module.modules(/*include_self=*/false)) {
    count_quantized(*child);
  }
  for (const auto& parameter : module.parameters(/*recurse=*/true)) {
    if (!seen.insert(parameter.unsafeGetTensorImpl()).second) {
      continue;
    }
    counts.total += parameter.numel();
    if (parameter.requires_grad()) {
      counts.trainable += parameter.numel();
    }
  }
  return counts;
}

/// `count_parameters` of a module holder (`torch::nn::Sequential`, ...).
template <typename ModuleType>
ParameterCount count_parameters(
    const torch::nn::ModuleHolder<ModuleType>& module) {
  return count_parameters(*module.ptr());
}

/// `count_parameters` of a module held by a `std::shared_ptr`.
template <typename ModuleType>
ParameterCount count_parameters(const std::shared_ptr<ModuleType>& module) {
  return count_parameters(static_cast<const torch::nn::Module&>(*module));
}

/// Which biases stay trainable next to the adapters (peft's `bias`).
enum class LoRABias {
  /// No bias is trained.
  none,
  /// Every bias of the model is trained.
  all,
  /// Only the biases of layers that carry an adapter are trained.
  lora_only,
};

/// The name of a bias mode as peft writes it: "none", "all", "lora_only".
inline const char* to_string(LoRABias bias) {
  switch (bias) {
    case LoRABias::none:
      return "none";
    case LoRABias::all:
      return "all";
    case LoRABias::lora_only:
      return "lora_only";
  }
  return "unknown";
}

namespace detail {

/// Whether a parameter name is a bias: "bias" or "<path>.bias".
inline bool is_bias_name(const std::string& name) {
  return name == "bias" ||
      (name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0);
}

} // namespace detail

/// Freezes every parameter of `module` except the active LoRA adapters and
/// the biases that `bias` names.
///
/// Example:
/// ```
/// torchlora::mark_only_lora_as_trainable(*model, torchlora::LoRABias::all);
/// ```
inline void mark_only_lora_as_trainable(
    torch::nn::Module& module,
    LoRABias bias = LoRABias::none) {
  std::unordered_set<const void*> adapters;
  std::unordered_set<const void*> adapted_biases;
  module.apply([&](torch::nn::Module& child) {
    const auto* layer = dynamic_cast<const LoRALayer*>(&child);
    if (layer == nullptr || layer->adapter_names().empty()) {
      return;
    }
    for (const auto& tensor : layer->active_adapter_parameters()) {
      adapters.insert(tensor.unsafeGetTensorImpl());
    }
    const auto base_bias = layer->base_bias();
    if (base_bias.defined()) {
      adapted_biases.insert(base_bias.unsafeGetTensorImpl());
    }
  });
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    const auto& name = item.key();
    auto& parameter = item.value();
    const void* key = parameter.unsafeGetTensorImpl();
    const bool is_bias = detail::is_bias_name(name);
    const bool trainable = adapters.count(key) > 0 ||
        (is_bias && bias == LoRABias::all) ||
        (bias == LoRABias::lora_only && adapted_biases.count(key) > 0);
    parameter.set_requires_grad(trainable);
  }
}

/// `mark_only_lora_as_trainable` of a module holder.
template <typename ModuleType>
void mark_only_lora_as_trainable(
    const torch::nn::ModuleHolder<ModuleType>& module,
    LoRABias bias = LoRABias::none) {
  mark_only_lora_as_trainable(*module.ptr(), bias);
}

/// `mark_only_lora_as_trainable` of a module held by a `std::shared_ptr`.
template <typename ModuleType>
void mark_only_lora_as_trainable(
    const std::shared_ptr<ModuleType>& module,
    LoRABias bias = LoRABias::none) {
  mark_only_lora_as_trainable(static_cast<torch::nn::Module&>(*module), bias);
}

} // namespace torchlora
