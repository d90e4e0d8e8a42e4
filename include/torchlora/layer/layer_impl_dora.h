#pragma once

// LoRALayerImpl (layer_base.h), the LoRA variants: DoRA's magnitudes and
// forward, and the PiSSA/OLoRA initializations from the base weight.

#include <torchlora/detail/dora.h>
#include <torchlora/layer_base.h>

#include <torch/types.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace torchlora {

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_variant_options(
    const std::string& name,
    const LoRAOptions& lora) const {
  TORCHLORA_CHECK(
      !lora.use_dora() || Derived::kTakesDora,
      "adapter \"",
      name,
      "\" asks for DoRA (use_dora = true), which a ",
      Derived::kName,
      " does not take (peft refuses it too); use use_dora(false)");
  const bool from_weight =
      lora.init() == LoRAInit::pissa || lora.init() == LoRAInit::olora;
  if (!from_weight) {
    return;
  }
  TORCHLORA_CHECK(
      Derived::kTakesWeightInit,
      "adapter \"",
      name,
      "\" asks for init ",
      to_string(lora.init()),
      ", which factorizes a Linear's [out, in] weight; a ",
      Derived::kName,
      " has none (peft: Linear layers only)");
  const auto limit = std::min(weight.size(0), weight.size(1));
  TORCHLORA_CHECK(
      lora.rank() <= limit,
      "adapter \"",
      name,
      "\" asks for init ",
      to_string(lora.init()),
      " with rank ",
      lora.rank(),
      ", more than the weight's ",
      weight.sizes(),
      " has (at most ",
      limit,
      ")");
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::create_magnitude(
    detail::Adapter& adapter,
    bool initialize) {
  const int64_t axis = Derived::kMagnitudeAxis;
  const auto channels = weight.size(axis);
  // peft's shapes: [channels] for a matrix weight, [1, channels, 1, ...]
  // for a convolution's.
  std::vector<int64_t> shape{channels};
  if (weight.dim() > 2) {
    shape.assign(static_cast<size_t>(weight.dim()), 1);
    shape[1] = channels;
  }
  torch::Tensor magnitude;
  {
    torch::NoGradGuard no_grad;
    magnitude = initialize
        ? dora_norms(adapter).to(adapter.A.scalar_type()).reshape(shape)
        : torch::empty(shape, adapter.A.options());
  }
  auto holder = std::make_shared<detail::LoRAMagnitudeImpl>(
      magnitude.set_requires_grad(true));
  if (lora_magnitude_vector.is_empty()) {
    lora_magnitude_vector =
        this->register_module("lora_magnitude_vector", torch::nn::ModuleDict());
  }
  lora_magnitude_vector->update({{adapter.name, holder}});
  adapter.magnitude = holder->weight;
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::remove_magnitude(
    const std::string& name) {
  lora_magnitude_vector->pop(name);
  lora_magnitude_vector->unregister_module(name);
  if (lora_magnitude_vector->empty()) {
    this->unregister_module("lora_magnitude_vector");
    lora_magnitude_vector = nullptr;
  }
}

template <typename Derived, typename BaseImpl>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::dora_norms(
    const detail::Adapter& adapter) const {
  torch::NoGradGuard no_grad;
  const auto dtype = detail::factorization_dtype(weight.scalar_type());
  auto adapted = weight.detach().to(dtype, /*non_blocking=*/false, true);
  derived().add_delta_weight(
      adapted,
      adapter.A.detach().to(dtype),
      adapter.B.detach().to(dtype),
      adapter.effective_scaling());
  return detail::channel_norms(adapted, Derived::kMagnitudeAxis);
}

template <typename Derived, typename BaseImpl>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::dora_factor(
    const detail::Adapter& adapter) const {
  return adapter.magnitude.reshape(-1) /
      dora_norms(adapter).to(adapter.magnitude.scalar_type());
}

template <typename Derived, typename BaseImpl>
torch::Tensor LoRALayerImpl<Derived, BaseImpl>::forward_with_dora(
    const torch::Tensor& x,
    const torch::Tensor& base_out) const {
  const auto axis = Derived::output_channel_axis(base_out);
  const auto dims = base_out.dim();
  const auto dtype = base_out.scalar_type();
  const auto factor = [&](const detail::Adapter& adapter) {
    return detail::along(dora_factor(adapter).to(dtype), axis, dims);
  };
  // Each active adapter with its (dropped-out) input, drawn once, in order.
  std::vector<std::pair<const detail::Adapter*, torch::Tensor>> active;
  for (const auto& adapter : adapters_.all()) {
    if (adapter.active) {
      active.emplace_back(&adapter, derived().adapter_input(adapter, x));
    }
  }
  if (active.size() == 1 && active.front().second.is_same(x)) {
    // One DoRA adapter on the undropped input: g (base + s product) + b.
    const auto& adapter = *active.front().first;
    auto adapted = base_out;
    derived().add_adapter_output(adapter, x, adapted);
    const auto g = factor(adapter);
    return bias.defined()
        ? torch::addcmul(detail::along(bias, axis, dims), adapted, g)
        : adapted * g;
  }
  // Each DoRA adapter adds (g - 1) base(x') + g s product(x'), x' its
  // (dropped-out) input, its norm taken against the base weight alone.
  auto y = bias.defined() ? base_out + detail::along(bias, axis, dims)
                          : base_out.clone();
  for (const auto& [adapter, input] : active) {
    if (!adapter->is_dora()) {
      derived().add_adapter_output(*adapter, input, y);
      continue;
    }
    const auto base_in =
        input.is_same(x) ? base_out : derived().base_output(input);
    const auto g = factor(*adapter);
    const auto product = derived().adapter_product(*adapter, input).to(dtype);
    y = y + (g - 1) * base_in + (g * adapter->effective_scaling()) * product;
  }
  return y;
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_in_place_mergeable() const {
  if (merge_.merged || !enabled_) {
    return;
  }
  std::vector<std::string> dora;
  for (const auto& adapter : adapters_.all()) {
    if (adapter.active && adapter.is_dora()) {
      dora.push_back(adapter.name);
    }
  }
  TORCHLORA_CHECK(
      dora.empty(),
      "merge_in_place cannot be undone for the DoRA adapter(s) ",
      detail::quoted_list(dora),
      ": their rescaling of the weight is no sum that unmerge() could "
      "subtract; use merge(), which keeps the weight from before." TORCHLORA_NOTHING_CHANGED);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::init_from_weight(
    const detail::Adapter& adapter) {
  torch::NoGradGuard no_grad;
  const auto& lora = adapter.options;
  const int64_t rank = lora.rank();
  const double s = adapter.scaling;
  const auto dtype = detail::factorization_dtype(weight.scalar_type());
  const auto W = weight.detach().to(dtype);
  TORCHLORA_CHECK(
      torch::isfinite(W).all().item<bool>(),
      "adapter \"",
      adapter.name,
      "\" asks for init ",
      to_string(lora.init()),
      ", which factorizes the weight, but this ",
      Derived::kName,
      "'s weight holds NaN or Inf");
  torch::Tensor A;
  torch::Tensor B;
  if (lora.init() == LoRAInit::olora) {
    const auto [Q, R] = torch::linalg_qr(W, "reduced");
    B = Q.narrow(1, 0, rank).contiguous();
    A = R.narrow(0, 0, rank).contiguous();
  } else {
    torch::Tensor U;
    torch::Tensor S;
    torch::Tensor Vh;
    if (lora.pissa_niter() == 0) {
      std::tie(U, S, Vh) = torch::linalg_svd(W, /*full_matrices=*/false);
    } else {
      std::tie(U, S, Vh) = detail::randomized_svd(W, rank, lora.pissa_niter());
    }
    const auto root = (S.narrow(0, 0, rank) / s).sqrt();
    A = root.unsqueeze(1) * Vh.narrow(0, 0, rank);
    B = U.narrow(1, 0, rank) * root.unsqueeze(0);
  }
  adapter.A.copy_(A);
  adapter.B.copy_(B);
  // The residual of the values the adapter holds (rounded to its dtype) and
  // of the factor it is applied with (its run-time scale included), so that
  // the output does not change.
  const double applied = adapter.effective_scaling();
  weight.detach().copy_(
      W -
      applied * adapter.B.detach().to(dtype).mm(adapter.A.detach().to(dtype)));
}

} // namespace torchlora
