#pragma once

// LoRALayerImpl (layer_base.h): construction, and its adapters: attaching,
// removing, scaling and re-initializing them.

#include <torchlora/layer_base.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {

template <typename Derived, typename BaseImpl>
LoRALayerImpl<Derived, BaseImpl>::LoRALayerImpl(const BaseHolder& base)
    : torch::nn::Cloneable<Derived>(module_name()),
      options(checked_base(base)->options),
      base_(base.ptr()) {
  static_assert(
      detail::module_is_virtual_base<torch::nn::Cloneable<Derived>>::value ==
          static_cast<bool>(TORCHLORA_MODULE_IS_VIRTUAL_BASE),
      TORCHLORA_PREFIX
      "this LibTorch's torch::nn::Cloneable does not derive from "
      "torch::nn::Module as its version says; "
      "TORCHLORA_MODULE_IS_VIRTUAL_BASE needs updating");
  reset();
  // A layer made for a module in eval mode starts in eval mode.
  torch::nn::Module::train(base_->is_training());
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::reset() {
  options = base_->options;
  const auto& base_weight = Derived::member_weight(*base_);
  weight = this->register_parameter(
      Derived::kWeightName, base_weight, base_weight.requires_grad());
  derived().register_base_state();
  const auto base_bias = Derived::bias_of(*base_);
  bias = this->register_parameter(
      Derived::kBiasName,
      base_bias,
      base_bias.defined() && base_bias.requires_grad());
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::reset_parameters() {
  check_not_merged("reset_parameters");
  check_no_forward_running("reset_parameters");
  if (member_.bound) {
    // The base initializes its member: the registered weight, for now.
    Derived::member_weight(*base_) = weight;
  }
  base_->reset_parameters();
  refresh_member();
  for (const auto& adapter : adapters_.all()) {
    const auto init = adapter.options.init();
    if (init == LoRAInit::pissa || init == LoRAInit::olora) {
      init_from_weight(adapter);
    } else {
      derived().init_matrices(
          init, adapter.options.rank(), adapter.A, adapter.B);
    }
  }
  torch::NoGradGuard no_grad;
  for (const auto& adapter : adapters_.all()) {
    if (adapter.is_dora()) {
      adapter.magnitude.copy_(
          dora_norms(adapter).reshape(adapter.magnitude.sizes()));
    }
  }
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::add_adapter(
    const std::string& name,
    const LoRAOptions& lora) {
  attach_adapter(name, lora, /*initialize=*/true);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::attach_adapter(
    const std::string& name,
    const LoRAOptions& lora,
    bool initialize) {
  check_not_merged("add_adapter");
  check_no_forward_running("add_adapter");
  adapters_.check_new_name(name);
  detail::check_adapter_rank(lora.rank(), "add_adapter(\"" + name + "\")");
  detail::check_lora_options(lora);
  derived().check_adapter_options(name, lora);
  check_variant_options(name, lora);
  member_.check_options(name, lora);

  const auto dtype = lora.dtype().value_or(derived().compute_dtype());
  auto [A, B] =
      derived().create_matrices(name, lora.rank(), weight.device(), dtype);
  detail::Adapter adapter{name, lora, lora_scaling(lora), A, B, 1.0, true, {}};
  try {
    if (initialize) {
      if (lora.init() == LoRAInit::pissa || lora.init() == LoRAInit::olora) {
        init_from_weight(adapter);
      } else {
        derived().init_matrices(lora.init(), lora.rank(), adapter.A, adapter.B);
      }
    }
    if (lora.use_dora()) {
      create_magnitude(adapter, initialize);
    }
  } catch (...) {
    derived().remove_matrices(name, /*last=*/adapters_.empty());
    throw;
  }
  adapters_.add(std::move(adapter));
  freeze_base();
  // The new matrices' modules take the layer's training mode.
  this->train(this->is_training());
  detail::check_blas_threads_once();
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::delete_adapter(const std::string& name) {
  check_not_merged("delete_adapter");
  check_no_forward_running("delete_adapter");
  detail::check_not_routed(
      this, "delete_adapter", std::string("this ") + Derived::kName);
  const bool was_active = adapters_.find(name).active;
  derived().remove_matrices(name, /*last=*/adapters_.size() == 1);
  if (adapters_.find(name).is_dora()) {
    remove_magnitude(name);
  }
  adapters_.erase(name);
  if (was_active && !adapters_.empty() && !adapters_.has_active()) {
    set_active_adapters({adapters_.front().name});
  }
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::set_scale(
    const std::string& name,
    double scale) {
  check_not_merged("set_scale");
  check_no_forward_running("set_scale");
  TORCHLORA_CHECK(
      std::isfinite(scale),
      "set_scale(\"",
      name,
      "\") needs a finite scale, got ",
      scale);
  adapters_.find(name).scale = scale;
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::set_active_adapters(
    const std::vector<std::string>& names) {
  check_not_merged("set_active_adapters");
  check_no_forward_running("set_active_adapters");
  adapters_.set_active(names);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::wrap_with(const LoRAOptions& lora) {
  detail::check_lora_options(lora);
  if (lora.rank() > 0) {
    derived().check_adapter_options("default", lora);
    check_variant_options("default", lora);
  }
  freeze_base();
  if (lora.rank() > 0) {
    add_adapter("default", lora);
  }
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::freeze_base() {
  weight.set_requires_grad(false);
  if (bias.defined()) {
    bias.set_requires_grad(false);
  }
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::init_matrices(
    LoRAInit init,
    int64_t rank,
    const torch::Tensor& A,
    const torch::Tensor& B) const {
  detail::init_lora_matrices(init, rank, A, B);
}

} // namespace torchlora
