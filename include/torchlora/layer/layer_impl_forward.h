#pragma once

// LoRALayerImpl (layer_base.h), the adapters' part of a forward: dropout on
// their input and their scaled outputs added to the base layer's.

#include <torchlora/layer_base.h>

#include <torch/nn/functional/dropout.h>
#include <torch/types.h>

namespace torchlora {

template <typename Derived, typename BaseImpl>
bool LoRALayerImpl<Derived, BaseImpl>::adapters_in_use() const {
  if (merge_.merged) {
    check_merged_weight_is_current(/*in_forward=*/true);
    return false;
  }
  return enabled_ && adapters_.has_active();
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::add_adapter_outputs(
    const torch::Tensor& x,
    torch::Tensor& y) const {
  for (const auto& adapter : adapters_.all()) {
    if (adapter.active) {
      derived().add_adapter_output(
          adapter, derived().adapter_input(adapter, x), y);
    }
  }
}

template <typename Derived, typename BaseImpl>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::adapter_input(
    const detail::Adapter& adapter,
    const torch::Tensor& x) const {
  const double p = adapter.options.dropout();
  if (p > 0 && this->is_training()) {
    return torch::nn::functional::dropout(
        x, torch::nn::functional::DropoutFuncOptions().p(p).training(true));
  }
  return x;
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::add_adapter_output(
    const detail::Adapter& adapter,
    const torch::Tensor& input,
    torch::Tensor& y) const {
  const auto product = derived().adapter_product(adapter, input);
  if (product.scalar_type() == y.scalar_type()) {
    y.add_(product, adapter.effective_scaling());
  } else {
    y.add_(product.mul(adapter.effective_scaling()).to(y.scalar_type()));
  }
}

} // namespace torchlora
