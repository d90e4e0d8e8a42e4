#pragma once

// The `lora_A` / `lora_B` ModuleDicts of Linear, Conv and MultiheadAttention
// LoRA layers: one matrix module per adapter, registered under peft's
// in-memory names (`lora_A.<adapter>.weight`). Not part of the API.

#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>

#include <memory>
#include <string>

namespace torchlora {
namespace detail {

/// Registers adapter `name`'s matrix modules `A` and `B` in `layer`'s dicts,
/// creating (and registering) the dicts with the first adapter.
inline void add_matrix_modules(
    torch::nn::Module& layer,
    torch::nn::ModuleDict& lora_A,
    torch::nn::ModuleDict& lora_B,
    const std::string& name,
    const std::shared_ptr<torch::nn::Module>& A,
    const std::shared_ptr<torch::nn::Module>& B) {
  if (lora_A.is_empty()) {
    lora_A = layer.register_module("lora_A", torch::nn::ModuleDict());
    lora_B = layer.register_module("lora_B", torch::nn::ModuleDict());
  }
  lora_A->update({{name, A}});
  lora_B->update({{name, B}});
}

/// Unregisters adapter `name`'s matrices; with the `last` adapter, the dicts
/// too, so that the layer has its base's parameters only.
inline void remove_matrix_modules(
    torch::nn::Module& layer,
    torch::nn::ModuleDict& lora_A,
    torch::nn::ModuleDict& lora_B,
    const std::string& name,
    bool last) {
  // ModuleDict::pop leaves the module registered: unregister it as well.
  for (auto* dict : {&lora_A, &lora_B}) {
    (*dict)->pop(name);
    (*dict)->unregister_module(name);
  }
  if (last) {
    layer.unregister_module("lora_A");
    layer.unregister_module("lora_B");
    lora_A = nullptr;
    lora_B = nullptr;
  }
}

} // namespace detail
} // namespace torchlora
