#pragma once

// LoRALayerImpl (layer_base.h), copies: clone, save, load and printing.

#include <torchlora/detail/archive_check.h>
#include <torchlora/layer_base.h>

#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <memory>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::save(
    torch::serialize::OutputArchive& archive) const {
  if (merge_.merged) {
    // The weight written must be the one from before merge().
    check_restorable("saving it");
  }
  for (const auto& item : this->named_parameters(/*recurse=*/false)) {
    const bool unmerged = merge_.merged && item.key() == Derived::kWeightName;
    archive.write(item.key(), unmerged ? weight_before_merge() : item.value());
  }
  for (const auto& item : this->named_buffers(/*recurse=*/false)) {
    archive.write(item.key(), item.value(), /*is_buffer=*/true);
  }
  for (const auto& child : this->named_children()) {
    if (child.value()->is_serializable()) {
      torch::serialize::OutputArchive child_archive(archive.compilation_unit());
      child.value()->save(child_archive);
      archive.write(child.key(), child_archive);
    }
  }
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::load(
    torch::serialize::InputArchive& archive) {
  detail::check_archive_fits(*this, archive, Derived::kName);
  if (!merge_.merged) {
    torch::nn::Module::load(archive);
    return;
  }
  // LibTorch's load gives each tensor new storage (`set_`), so views taken
  // now keep the values to put back.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> kept;
  for (const auto& tensor : this->parameters()) {
    kept.emplace_back(tensor, tensor.detach());
  }
  for (const auto& tensor : this->buffers()) {
    kept.emplace_back(tensor, tensor.detach());
  }
  const auto kept_merge = merge_;
  unmerge();
  try {
    torch::nn::Module::load(archive);
  } catch (...) {
    torch::NoGradGuard no_grad;
    for (auto& [tensor, values] : kept) {
      tensor.set_data(values);
    }
    if (kept_merge.keeps_original) {
      merge_ = kept_merge;
      merge_.weight_version = weight._version();
      merge_.checksum = detail::weight_checksum(weight);
    } else {
      merge_keeping_original(/*safe=*/false, /*keep_original=*/false);
    }
    throw;
  }
  merge_keeping_original(/*safe=*/false, kept_merge.keeps_original);
}

template <typename Derived, typename BaseImpl>
std::shared_ptr<torch::nn::Module> LoRALayerImpl<Derived, BaseImpl>::clone(
    const c10::optional<torch::Device>& device) const {
  check_clonable();
  torch::NoGradGuard no_grad;
  auto base_copy = std::dynamic_pointer_cast<BaseImpl>(base_->clone(device));
  TORCHLORA_INTERNAL_ASSERT(base_copy, "base layer clone failed");
  auto copy = std::make_shared<Derived>(BaseHolder(base_copy));
  copy_state_to(*copy, device);
  return copy;
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::copy_state_into(
    LoRALayer& copy,
    const c10::optional<torch::Device>& device) const {
  auto* same_kind = dynamic_cast<Derived*>(&copy);
  TORCHLORA_INTERNAL_ASSERT(
      same_kind != nullptr && same_kind->adapters_.empty(),
      "copy_state_into needs a ",
      Derived::kName,
      " without adapters");
  check_clonable();
  torch::NoGradGuard no_grad;
  copy_state_to(*same_kind, device);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::pretty_print(
    std::ostream& stream) const {
  // The base's own printing, e.g. "torch::nn::Linear(in_features=64,
  // out_features=32, bias=true)", between its parentheses.
  std::ostringstream base_text;
  base_->pretty_print(base_text);
  const auto text = base_text.str();
  const auto open = text.find('(');
  const auto close = text.rfind(')');
  stream << std::boolalpha << "torchlora::" << Derived::kName << "("
         << (open != std::string::npos && close > open
                 ? text.substr(open + 1, close - open - 1)
                 : std::string());
  const bool single_default =
      adapters_.size() == 1 && adapters_.front().name == "default";
  for (const auto& adapter : adapters_.all()) {
    stream << ", ";
    if (!single_default) {
      stream << adapter.name << "=(";
    }
    stream << "rank=" << adapter.options.rank()
           << ", alpha=" << adapter.options.alpha()
           << ", dropout=" << adapter.options.dropout();
    if (adapter.options.use_rslora()) {
      stream << ", use_rslora=true";
    }
    if (adapter.options.use_dora()) {
      stream << ", use_dora=true";
    }
    if (adapter.options.init() == LoRAInit::pissa ||
        adapter.options.init() == LoRAInit::olora) {
      stream << ", init=" << to_string(adapter.options.init());
    }
    if (!single_default) {
      stream << ")";
    }
  }
  stream << ")";
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::copy_state_to(
    Derived& copy,
    const c10::optional<torch::Device>& device) const {
  for (const auto& adapter : adapters_.all()) {
    copy.attach_adapter(adapter.name, adapter.options, /*initialize=*/false);
    auto& target = copy.adapters_.back();
    target.scale = adapter.scale;
    target.active = adapter.active;
    copy_tensor(adapter.A, target.A, device);
    copy_tensor(adapter.B, target.B, device);
    if (adapter.is_dora()) {
      copy_tensor(adapter.magnitude, target.magnitude, device);
    }
  }
  copy.enabled_ = enabled_;
  copy.merge_.merged = merge_.merged;
  copy.merge_.keeps_original = merge_.keeps_original;
  if (merge_.merged && merge_.keeps_original) {
    const auto& original = merge_.original_weight;
    copy.merge_.original_weight = device && original.device() != *device
        ? original.to(*device)
        : original.clone();
  }
  if (merge_.merged) {
    copy.merge_.remember(copy.adapters_, copy.weight);
  }
  copy.weight.set_requires_grad(weight.requires_grad());
  if (bias.defined()) {
    copy.bias.set_requires_grad(bias.requires_grad());
  }
  copy.train(this->is_training());
  copy.refresh_member();
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::copy_tensor(
    const torch::Tensor& from,
    const torch::Tensor& to,
    const c10::optional<torch::Device>& device) {
  to.set_data(
      device && from.device() != *device ? from.to(*device) : from.clone());
  to.set_requires_grad(from.requires_grad());
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::to(
    torch::Device device,
    torch::Dtype dtype,
    bool non_blocking) {
  for (auto& child : this->children()) {
    child->to(device, dtype, non_blocking);
  }
  detail::move_own_tensors(*this, device, dtype, non_blocking);
  merge_.follow(weight, adapters_);
  refresh_member(/*recompute_held=*/true);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::to(
    torch::Dtype dtype,
    bool non_blocking) {
  for (auto& child : this->children()) {
    child->to(dtype, non_blocking);
  }
  detail::move_own_tensors(*this, c10::nullopt, dtype, non_blocking);
  merge_.follow(weight, adapters_);
  refresh_member(/*recompute_held=*/true);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::to(
    torch::Device device,
    bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
  merge_.follow(weight, adapters_);
  refresh_member(/*recompute_held=*/true);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::train(bool on) {
  torch::nn::Module::train(on);
  base_->train(on);
}

template <typename Derived, typename BaseImpl>
void LoRALayerImpl<Derived, BaseImpl>::check_clonable() const {
  if (merge_.merged) {
    check_merged_weight_is_current();
  }
}

template <typename Derived, typename BaseImpl>
torch::nn::AnyModule LoRALayerImpl<Derived, BaseImpl>::base_any_module() const {
  return torch::nn::AnyModule(base_);
}

} // namespace torchlora
