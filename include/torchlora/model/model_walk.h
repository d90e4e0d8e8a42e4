#pragma once

// Walking a model and swapping its layers: shared by inject_lora and the
// lifecycle functions. Not part of the API.

#include <torchlora/detail/check.h>
#include <torchlora/detail/forward_count.h>
#include <torchlora/detail/row_routing.h>
#include <torchlora/layer.h>
#include <torchlora/layer/member_binding.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace torchlora {
namespace detail {

/// One registration of a module: `parent` registered it under `name`.
struct Registration {
  torch::nn::Module* parent;
  std::string name;

  bool operator==(const Registration& other) const {
    return parent == other.parent && name == other.name;
  }
};

/// A module of the model, reached at one or more paths.
struct ModelEntry {
  torch::nn::Module* module;
  /// Paths in model order; the first one names the module, as in peft.
  std::vector<std::string> paths;
  std::vector<Registration> registrations;
};

/// Every module below `root`, each once, in model order (pre-order, the
/// order of `named_modules`). The adapters of LoRA layers are never walked
/// into (a LoRAMultiheadAttention's `out_proj` is). A root that is itself a
/// LoRA layer is the one entry, at path "" with no registration. The index
/// holds no reference to any module.
class ModelIndex {
 public:
  explicit ModelIndex(torch::nn::Module& root) {
    if (dynamic_cast<LoRALayer*>(&root) != nullptr) {
      entries_.push_back(ModelEntry{&root, {""}, {}});
      return;
    }
    walk(root, "");
  }

  const std::vector<ModelEntry>& entries() const {
    return entries_;
  }

  /// The entries that are LoRA layers, with their interface.
  std::vector<std::pair<const ModelEntry*, LoRALayer*>> lora_layers() const {
    std::vector<std::pair<const ModelEntry*, LoRALayer*>> layers;
    for (const auto& entry : entries_) {
      if (auto* layer = dynamic_cast<LoRALayer*>(entry.module)) {
        layers.emplace_back(&entry, layer);
      }
    }
    return layers;
  }

 private:
  void walk(torch::nn::Module& module, const std::string& prefix) {
    const bool lora = dynamic_cast<LoRALayer*>(&module) != nullptr;
    for (const auto& child : module.named_children()) {
      if (lora && child.key().rfind("lora_", 0) == 0) {
        continue; // an adapter's matrices
      }
      auto* pointer = child.value().get();
      const auto path =
          prefix.empty() ? child.key() : prefix + "." + child.key();
      auto found = index_.find(pointer);
      if (found == index_.end()) {
        found = index_.emplace(pointer, entries_.size()).first;
        entries_.push_back(ModelEntry{pointer, {}, {}});
      }
      auto& entry = entries_[found->second];
      entry.paths.push_back(path);
      const Registration registration{&module, child.key()};
      if (std::find(
              entry.registrations.begin(),
              entry.registrations.end(),
              registration) == entry.registrations.end()) {
        entry.registrations.push_back(registration);
      }
      walk(*pointer, path);
    }
  }

  std::vector<ModelEntry> entries_;
  std::unordered_map<const torch::nn::Module*, size_t> index_;
};

inline bool is_container(const torch::nn::Module& module) {
  return dynamic_cast<const torch::nn::SequentialImpl*>(&module) != nullptr ||
      dynamic_cast<const torch::nn::ModuleListImpl*>(&module) != nullptr ||
      dynamic_cast<const torch::nn::ModuleDictImpl*>(&module) != nullptr;
}

/// How many places inside `parent`'s container storage (Sequential,
/// ModuleList, ModuleDict) hold `module`; 0 for other modules.
inline size_t container_slots(
    torch::nn::Module& parent,
    const torch::nn::Module* module) {
  size_t slots = 0;
  if (auto* sequential = dynamic_cast<torch::nn::SequentialImpl*>(&parent)) {
    for (const auto& any : *sequential) {
      slots += any.ptr().get() == module ? 1 : 0;
    }
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&parent)) {
    for (const auto& item : *list) {
      slots += item.get() == module ? 1 : 0;
    }
  } else if (auto* dict = dynamic_cast<torch::nn::ModuleDictImpl*>(&parent)) {
    for (const auto& item : dict->items()) {
      slots += item.second.get() == module ? 1 : 0;
    }
  }
  return slots;
}

/// Throws, naming the layer, while a forward runs through a LoRA layer of
/// the model (on another thread): `operation` would change it under that
/// forward. Checked before anything is changed.
inline void check_no_forward_running(
    const ModelIndex& index,
    const char* operation) {
  for (const auto& [entry, layer] : index.lora_layers()) {
    const auto name = "'" + entry->paths.front() + "'";
    detail::check_no_forward_running(
        layer->running_forwards(), operation, name);
    detail::check_no_member_hold(member_weight_holds(layer), operation, name);
  }
}

/// Throws, naming the layer, while an `AdapterRouting` made for a LoRA layer
/// of the model lives: `operation` would remove adapters or layers it routes
/// rows to, or add layers it does not cover.
inline void check_not_routed(const ModelIndex& index, const char* operation) {
  for (const auto& [entry, layer] : index.lora_layers()) {
    detail::check_not_routed(
        layer, operation, "'" + entry->paths.front() + "'");
  }
}

/// Throws, naming the layer, while the adapters of a LoRA layer of the
/// model are switched off (`DisableAdapters`): adapters added meanwhile
/// would be on inside the guard's scope.
inline void check_adapters_enabled(
    const ModelIndex& index,
    const char* operation) {
  for (const auto& [entry, layer] : index.lora_layers()) {
    TORCHLORA_CHECK(
        layer->adapters_enabled(),
        operation,
        " while the adapters of '",
        entry->paths.front(),
        "' are disabled (DisableAdapters); add adapters after the guard's "
        "scope." TORCHLORA_NOTHING_CHANGED);
  }
}

/// The module of `entry`, held once more by the returned pointer; null for
/// the root, which has no registration.
inline std::shared_ptr<torch::nn::Module> share(const ModelEntry& entry) {
  if (entry.registrations.empty()) {
    return nullptr;
  }
  const auto& registration = entry.registrations.front();
  return registration.parent->named_children()[registration.name];
}

/// How many references to `module` exist beyond the model's registries and
/// container slots and the caller's own `module` pointer: a typed member, a
/// variable. (Raw pointers and weak_ptrs cannot be seen.)
inline size_t outside_references(
    const ModelEntry& entry,
    const std::shared_ptr<torch::nn::Module>& module) {
  if (module == nullptr) {
    return 0;
  }
  size_t inside = 1 + entry.registrations.size();
  std::vector<torch::nn::Module*> parents;
  for (const auto& registration : entry.registrations) {
    if (std::find(parents.begin(), parents.end(), registration.parent) ==
        parents.end()) {
      parents.push_back(registration.parent);
      inside += container_slots(*registration.parent, module.get());
    }
  }
  const auto holders = static_cast<size_t>(module.use_count());
  return holders > inside ? holders - inside : 0;
}

/// Puts `replacement` (also given as an `AnyModule`) wherever `parent` holds
/// `module` under `name`: its registry and, for the LibTorch containers, the
/// storage their forward and iteration use.
inline void replace_child(
    torch::nn::Module& parent,
    const std::string& name,
    const torch::nn::Module* module,
    const std::shared_ptr<torch::nn::Module>& replacement,
    const torch::nn::AnyModule& replacement_as_any) {
  if (auto* sequential = dynamic_cast<torch::nn::SequentialImpl*>(&parent)) {
    for (auto& any : *sequential) {
      if (any.ptr().get() == module) {
        any = replacement_as_any;
      }
    }
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&parent)) {
    for (auto& item : *list) {
      if (item.get() == module) {
        item = replacement;
      }
    }
  } else if (auto* dict = dynamic_cast<torch::nn::ModuleDictImpl*>(&parent)) {
    if (dict->contains(name) && (*dict)[name].get() == module) {
      dict->update({{name, replacement}});
    }
  }
  parent.replace_module(name, replacement);
}

/// Replaces `module` by `replacement` in every registration of `entry`.
inline void replace_everywhere(
    const ModelEntry& entry,
    const torch::nn::Module* module,
    const std::shared_ptr<torch::nn::Module>& replacement,
    const torch::nn::AnyModule& replacement_as_any) {
  for (const auto& registration : entry.registrations) {
    replace_child(
        *registration.parent,
        registration.name,
        module,
        replacement,
        replacement_as_any);
  }
}

/// `replace_everywhere` for a replacement of a known module type.
template <typename ModuleType>
void replace_everywhere(
    const ModelEntry& entry,
    const torch::nn::Module* module,
    const std::shared_ptr<ModuleType>& replacement) {
  replace_everywhere(
      entry, module, replacement, torch::nn::AnyModule(replacement));
}

/// Appends `layer`'s `weight` and `bias` members to `tensors` if `module`
/// is a `Layer`; returns whether it is.
template <typename Layer>
bool add_weight_and_bias(
    const torch::nn::Module& module,
    std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  const auto* layer = dynamic_cast<const Layer*>(&module);
  if (layer == nullptr) {
    return false;
  }
  for (const auto& [name, tensor] :
       {std::make_pair("weight", layer->weight),
        std::make_pair("bias", layer->bias)}) {
    if (tensor.defined()) {
      tensors.emplace_back(name, tensor);
    }
  }
  return true;
}

/// The tensors a plain LibTorch layer's forward reads through its own
/// members, which may not be the ones it registered: `b->weight =
/// a->weight` ties a weight without registering it.
inline std::vector<std::pair<std::string, torch::Tensor>> member_tensors(
    const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  if (const auto* embedding =
          dynamic_cast<const torch::nn::EmbeddingImpl*>(&module)) {
    tensors.emplace_back("weight", embedding->weight);
  } else if (
      !add_weight_and_bias<torch::nn::LinearImpl>(module, tensors) &&
      !add_weight_and_bias<torch::nn::Conv1dImpl>(module, tensors) &&
      !add_weight_and_bias<torch::nn::Conv2dImpl>(module, tensors)) {
    add_weight_and_bias<torch::nn::Conv3dImpl>(module, tensors);
  }
  return tensors;
}

/// Every tensor of `model` by its path: the registered parameters and
/// buffers, and the tensors LibTorch layers read through their own members
/// (`b->weight = a->weight` ties a weight without registering it).
inline std::vector<std::pair<std::string, torch::Tensor>> model_tensors(
    torch::nn::Module& model,
    const ModelIndex& index) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    tensors.emplace_back(item.key(), item.value());
  }
  for (const auto& item : model.named_buffers(/*recurse=*/true)) {
    tensors.emplace_back(item.key(), item.value());
  }
  for (const auto& entry : index.entries()) {
    for (const auto& [name, tensor] : member_tensors(*entry.module)) {
      tensors.emplace_back(entry.paths.front() + "." + name, tensor);
    }
  }
  return tensors;
}

/// True when the tensor at path `key` is one of `entry`'s own (its module
/// is at one of `entry`'s paths).
inline bool owns_tensor(const ModelEntry& entry, const std::string& key) {
  const auto dot = key.rfind('.');
  const auto owner =
      dot == std::string::npos ? std::string() : key.substr(0, dot);
  return std::find(entry.paths.begin(), entry.paths.end(), owner) !=
      entry.paths.end();
}

/// The trainable flag of every parameter of `model`, to put back later.
class TrainableFlags {
 public:
  explicit TrainableFlags(const torch::nn::Module& model) {
    for (const auto& parameter : model.parameters()) {
      flags_.emplace_back(parameter, parameter.requires_grad());
    }
  }

  void restore() const {
    for (const auto& [parameter, flag] : flags_) {
      parameter.set_requires_grad(flag);
    }
  }

 private:
  std::vector<std::pair<torch::Tensor, bool>> flags_;
};

} // namespace detail
} // namespace torchlora
