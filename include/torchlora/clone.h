#pragma once

#include <torchlora/detail/check.h>
#include <torchlora/detail/text.h>
#include <torchlora/inject.h>
#include <torchlora/kinds/layer_kinds.h>
#include <torchlora/layer.h>
#include <torchlora/layer/member_binding.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/quantized_linear.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace detail {

/// The `AnyModule` under which a `Sequential` parent stores `module`; empty
/// for other parents (which store no `AnyModule`).
inline torch::nn::AnyModule stored_any(
    torch::nn::Module& parent,
    const torch::nn::Module* module) {
  if (auto* sequential = dynamic_cast<torch::nn::SequentialImpl*>(&parent)) {
    for (const auto& any : *sequential) {
      if (any.ptr().get() == module) {
        return any;
      }
    }
  }
  return torch::nn::AnyModule();
}

/// A LoRA layer of the model put aside while LibTorch clones the model: the
/// layer, how its parent stores it, and where.
struct SetAside {
  const ModelEntry* entry;
  std::shared_ptr<torch::nn::Module> layer;
  torch::nn::AnyModule layer_any;
};

/// Where LibTorch's `clone()` copied a `QuantizedLinear` into the plain
/// `torch::nn::Linear` its parent's `reset()` built (keeping only the
/// `LinearImpl` part: a Linear holding codes), puts a real copy of it: the
/// plain quantized layers of `index` and the quantized bases of the LoRA
/// layers set aside.
inline void restore_quantized_layers(
    const ModelIndex& index,
    torch::nn::Module& copy,
    const std::vector<SetAside>& aside,
    const c10::optional<torch::Device>& device) {
  std::map<std::string, const QuantizedLinearImpl*> quantized;
  for (const auto& entry : index.entries()) {
    if (const auto* layer = dynamic_cast<QuantizedLinearImpl*>(entry.module)) {
      quantized[entry.paths.front()] = layer;
    }
  }
  for (const auto& item : aside) {
    const auto* lora = dynamic_cast<LoRALinearImpl*>(item.layer.get());
    if (lora != nullptr && lora->quantized_base() != nullptr) {
      quantized[item.entry->paths.front()] = lora->quantized_base();
    }
  }
  if (quantized.empty()) {
    return;
  }
  const ModelIndex copy_index(copy);
  for (const auto& entry : copy_index.entries()) {
    const auto found = quantized.find(entry.paths.front());
    if (found == quantized.end() ||
        dynamic_cast<QuantizedLinearImpl*>(entry.module) != nullptr) {
      continue;
    }
    auto layer = std::dynamic_pointer_cast<QuantizedLinearImpl>(
        found->second->clone(device));
    replace_everywhere(entry, entry.module, layer);
  }
}

/// LibTorch's `model.clone(device)` with LoRA layers of `index` replaced by
/// their base layers meanwhile: those that only the model holds (one
/// `inject_lora` put in place of a plain layer), or with
/// `typed_members_too` also those held elsewhere. The model is as it was
/// afterwards, also when cloning fails.
inline std::shared_ptr<torch::nn::Module> clone_setting_aside(
    torch::nn::Module& model,
    const ModelIndex& index,
    const c10::optional<torch::Device>& device,
    bool typed_members_too) {
  std::vector<SetAside> aside;
  for (const auto& [entry, layer] : index.lora_layers()) {
    bool inside_lora = true;
    for (const auto& registration : entry->registrations) {
      inside_lora = inside_lora &&
          dynamic_cast<LoRALayer*>(registration.parent) != nullptr;
    }
    if (inside_lora) {
      continue; // an attention's out_proj: its attention is set aside
    }
    auto held = share(*entry);
    if (!typed_members_too && outside_references(*entry, held) > 0) {
      continue; // a typed LoRA member: its parent builds it, it clones itself
    }
    const auto& registration = entry->registrations.front();
    aside.push_back(
        SetAside{entry, held, stored_any(*registration.parent, entry->module)});
  }
  size_t done = 0;
  const auto put_back = [&] {
    while (done > 0) {
      --done;
      const auto& item = aside[done];
      auto* layer = dynamic_cast<LoRALayer*>(item.layer.get());
      replace_everywhere(
          *item.entry, layer->base_module().get(), item.layer, item.layer_any);
    }
  };
  std::shared_ptr<torch::nn::Module> copy;
  try {
    for (; done < aside.size(); ++done) {
      auto* layer = dynamic_cast<LoRALayer*>(aside[done].layer.get());
      replace_everywhere(
          *aside[done].entry,
          aside[done].layer.get(),
          layer->base_module(),
          layer->base_any_module());
    }
    copy = model.clone(device);
  } catch (...) {
    put_back();
    throw;
  }
  put_back();
  restore_quantized_layers(index, *copy, aside, device);
  return copy;
}

/// A copy of `model` with its LoRA layers: LibTorch's `clone()` rebuilds a
/// module's children in `reset()` and copies each child into one of the
/// same type, so a parent that builds a plain layer (a
/// `TransformerEncoderLayer`'s `self_attn`, a user module that registers a
/// `Linear`) cannot take a LoRA layer's copy. Such layers are their base
/// layers again while LibTorch clones (`clone_setting_aside`). A LoRA layer
/// held outside the model too is taken for a typed member, which its parent
/// builds and LibTorch clones, unless LibTorch then fails: the clone is
/// tried again with every LoRA layer set aside. The clone's layers at
/// those paths are then wrapped and bound as `inject_lora` does, and get
/// each LoRA layer's state.
inline std::shared_ptr<torch::nn::Module> clone_model(
    torch::nn::Module& model,
    const c10::optional<torch::Device>& device) {
  const ModelIndex index(model);
  const auto layers = index.lora_layers();
  if (layers.size() == 1 && layers.front().first->paths.front().empty()) {
    return model.clone(device); // the model is a LoRA layer itself
  }
  for (const auto& [entry, layer] : layers) {
    TORCHLORA_CHECK(
        layer->adapters_enabled(),
        "clone_keeping_trainable while the adapters of '",
        entry->paths.front(),
        "' are disabled (DisableAdapters): the copy would keep them off for "
        "good. Clone after the guard's scope." TORCHLORA_NOTHING_CHANGED);
  }
  std::shared_ptr<torch::nn::Module> copy;
  try {
    copy = clone_setting_aside(model, index, device, false);
  } catch (const c10::Error&) {
    copy = clone_setting_aside(model, index, device, true);
  }

  // The copy's plain layers at the LoRA layers' paths, innermost first (an
  // attention's out_proj before the attention, which then takes it over).
  const ModelIndex copy_index(*copy);
  std::map<std::string, const ModelEntry*> at_path;
  for (const auto& entry : copy_index.entries()) {
    for (const auto& path : entry.paths) {
      at_path[path] = &entry;
    }
  }
  std::set<const ModelEntry*> done;
  for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
    const auto& [entry, layer] = *it;
    for (const auto& path : entry->paths) {
      const auto found = at_path.find(path);
      TORCHLORA_INTERNAL_ASSERT(
          found != at_path.end(), "the clone has no module at '", path, "'");
      const auto& copy_entry = *found->second;
      if (!done.insert(&copy_entry).second) {
        continue; // one module at several paths, adapted once
      }
      auto* copy_layer = dynamic_cast<LoRALayer*>(copy_entry.module);
      if (copy_layer == nullptr) {
        const auto* kind = kind_of(*copy_entry.module);
        TORCHLORA_INTERNAL_ASSERT(
            kind != nullptr && kind->is_plain(*copy_entry.module),
            "the clone has a ",
            copy_entry.module->name(),
            " at '",
            path,
            "'");
        const auto plain = share(copy_entry);
        const auto binding = member_binding(copy_entry, plain, *kind);
        auto [wrapped, wrapped_any] = kind->wrap(plain);
        replace_everywhere(copy_entry, plain.get(), wrapped, wrapped_any);
        copy_layer = dynamic_cast<LoRALayer*>(wrapped.get());
        if (!binding.empty()) {
          bind_member(*copy_layer, binding);
        }
      } else if (!copy_layer->adapter_names().empty()) {
        continue; // a typed LoRA member cloned with its adapters
      }
      layer->copy_state_into(*copy_layer, device);
    }
  }
  return copy;
}

} // namespace detail

/// A deep copy of `model` whose parameters are trainable exactly where
/// `model`'s are, and whose modules are in training or eval mode as
/// `model`'s are; LoRA layers are copied with their adapters, scales and
/// merged or disabled state.
///
/// Use it instead of `model->clone()` on an adapted model: LibTorch's
/// `clone()` re-creates every parameter in `reset()` and copies only its
/// values, so a plain clone has its frozen base weights trainable again;
/// and where a module's `reset()` builds a plain child that `inject_lora`
/// replaced (LibTorch's `TransformerEncoderLayer`, a user module that
/// registers a `torch::nn::Linear` without a typed member), LibTorch's
/// `clone()` fails ("Attempted to clone submodule, but it is of a different
/// type"). This one clones such models too.
///
/// Example:
/// ```
/// auto copy = torchlora::clone_keeping_trainable(model);  // shared_ptr
/// ```
inline std::shared_ptr<torch::nn::Module> clone_keeping_trainable(
    const torch::nn::Module& model,
    const c10::optional<torch::Device>& device = c10::nullopt) {
  std::shared_ptr<torch::nn::Module> copy;
  try {
    // Set-aside layers are put back before this returns or throws.
    copy = detail::clone_model(const_cast<torch::nn::Module&>(model), device);
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    if (message.rfind("torchlora:", 0) == 0) {
      throw;
    }
    TORCHLORA_CHECK(
        false,
        "clone_keeping_trainable: LibTorch could not clone the "
        "model (",
        message,
        "). Every module of the model must implement clone() (derive from "
        "torch::nn::Cloneable and register its children in reset())");
  }
  auto copied = copy->named_parameters(/*recurse=*/true);
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    if (auto* tensor = copied.find(item.key())) {
      tensor->set_requires_grad(item.value().requires_grad());
    }
  }
  // Training modes too: a clone may come back in training mode (containers
  // do), whatever the original's. Outer modules first, so each module ends
  // with its own mode.
  copy->train(model.is_training());
  auto copied_modules = copy->named_modules("", /*include_self=*/false);
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (auto* module = copied_modules.find(item.key())) {
      (*module)->train(item.value()->is_training());
    }
  }
  return copy;
}

/// `clone_keeping_trainable` of a module held by a `std::shared_ptr`,
/// returning the same module type.
template <typename ModuleType>
std::shared_ptr<ModuleType> clone_keeping_trainable(
    const std::shared_ptr<ModuleType>& model,
    const c10::optional<torch::Device>& device = c10::nullopt) {
  return std::dynamic_pointer_cast<ModuleType>(clone_keeping_trainable(
      static_cast<const torch::nn::Module&>(*model), device));
}

/// `clone_keeping_trainable` of a module holder, as a `std::shared_ptr` to
/// its module.
template <typename ModuleType>
std::shared_ptr<ModuleType> clone_keeping_trainable(
    const torch::nn::ModuleHolder<ModuleType>& model,
    const c10::optional<torch::Device>& device = c10::nullopt) {
  return clone_keeping_trainable(model.ptr(), device);
}

} // namespace torchlora
