#pragma once

#include <torchlora/config.h>
#include <torchlora/layer.h>
#include <torchlora/linear.h>
#include <torchlora/parameters.h>
#include <torchlora/targeting.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
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
  /// Paths in model order; the first decides targeting, as in peft.
  std::vector<std::string> paths;
  std::vector<Registration> registrations;
};

/// Every module below `root`, each once, in model order (pre-order, the
/// order of `named_modules`). LoRA layers are leaves: their adapters are
/// never walked into, so an adapter is never wrapped.
class ModelIndex {
 public:
  explicit ModelIndex(torch::nn::Module& root) {
    walk(root, "");
  }

  const std::vector<ModelEntry>& entries() const {
    return entries_;
  }

 private:
  void walk(torch::nn::Module& module, const std::string& prefix) {
    for (const auto& child : module.named_children()) {
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
      if (dynamic_cast<LoRALayer*>(pointer) == nullptr) {
        walk(*pointer, path);
      }
    }
  }

  std::vector<ModelEntry> entries_;
  std::unordered_map<const torch::nn::Module*, size_t> index_;
};

inline bool is_plain_linear(const torch::nn::Module& module) {
  return dynamic_cast<const torch::nn::LinearImpl*>(&module) != nullptr;
}

inline bool is_linear_like(const torch::nn::Module& module) {
  return is_plain_linear(module) ||
      dynamic_cast<const LoRALayer*>(&module) != nullptr;
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

/// Puts `replacement` wherever `parent` holds `module`: its registry and, for
/// the LibTorch containers, the storage their forward and iteration use.
inline void replace_child(
    torch::nn::Module& parent,
    const std::string& name,
    const torch::nn::Module* module,
    const std::shared_ptr<LoRALinearImpl>& replacement) {
  if (auto* sequential = dynamic_cast<torch::nn::SequentialImpl*>(&parent)) {
    for (auto& any : *sequential) {
      if (any.ptr().get() == module) {
        any = torch::nn::AnyModule(replacement);
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

/// One layer `inject_lora` will adapt.
struct PlannedLayer {
  const ModelEntry* entry;
  LoRAOptions options;
};

inline std::string list_linear_paths(const ModelIndex& index, size_t limit) {
  std::string text;
  size_t shown = 0;
  size_t total = 0;
  for (const auto& entry : index.entries()) {
    if (!is_linear_like(*entry.module)) {
      continue;
    }
    ++total;
    if (shown < limit) {
      text += (shown ? ", " : "") + entry.paths.front();
      ++shown;
    }
  }
  if (total == 0) {
    return "none";
  }
  if (total > shown) {
    text += ", ... (" + std::to_string(total) + " in all)";
  }
  return text;
}

/// Checks that nothing but `entry`'s registrations and container slots holds
/// the plain Linear `module` (which the caller holds once more).
inline void check_only_held_by_model(
    const ModelEntry& entry,
    const std::shared_ptr<torch::nn::Module>& module) {
  size_t expected = 1 + entry.registrations.size();
  std::vector<torch::nn::Module*> parents;
  for (const auto& registration : entry.registrations) {
    if (std::find(parents.begin(), parents.end(), registration.parent) ==
        parents.end()) {
      parents.push_back(registration.parent);
      expected += container_slots(*registration.parent, module.get());
    }
  }
  const auto holders = static_cast<size_t>(module.use_count());
  TORCH_CHECK(
      holders <= expected,
      "torchlora: cannot adapt '",
      entry.paths.front(),
      "': this torch::nn::Linear is also held outside the model's registry "
      "and containers (",
      holders - expected,
      " more reference(s): a typed member such as `torch::nn::Linear ",
      entry.registrations.front().name,
      "{nullptr};`, or a variable), which would keep calling the old layer, "
      "so the adapter would never be used. Declare the member as "
      "`torchlora::LoRALinear ",
      entry.registrations.front().name,
      "{nullptr};` (same constructor arguments, same checkpoint keys), or "
      "hold the layer only in a Sequential, ModuleList or ModuleDict. "
      "Nothing was changed.");
}

/// Finds the layers `config` targets and checks everything that could fail,
/// without changing the model.
inline std::vector<PlannedLayer> plan_injection(
    const ModelIndex& index,
    const TargetMatcher& matcher) {
  const auto& config = matcher.config();
  const ModelEntry* output_head = nullptr;
  if (matcher.targets_all_linear()) {
    for (const auto& entry : index.entries()) {
      if (is_linear_like(*entry.module)) {
        output_head = &entry;
      }
    }
  }

  for (const auto& name : config.modules_to_save()) {
    const bool found = std::any_of(
        index.entries().begin(), index.entries().end(), [&](const auto& entry) {
          return TargetMatcher::matches_name(entry.paths.front(), {name});
        });
    TORCH_CHECK(
        found,
        "torchlora: modules_to_save entry \"",
        name,
        "\" matches no module of the model");
  }

  std::vector<PlannedLayer> planned;
  for (const auto& entry : index.entries()) {
    const auto& path = entry.paths.front();
    if (!matcher.is_target(path)) {
      continue;
    }
    if (matcher.targets_all_linear() &&
        (!is_linear_like(*entry.module) || &entry == output_head)) {
      continue;
    }
    TORCH_CHECK(
        is_linear_like(*entry.module),
        "torchlora: ",
        matcher.describe_targets(),
        " matched '",
        path,
        "', a ",
        entry.module->name(),
        "; only torch::nn::Linear and torchlora::LoRALinear layers can be "
        "adapted. Name the Linear layers inside it instead.");
    if (auto* layer = dynamic_cast<LoRALayer*>(entry.module)) {
      TORCH_CHECK(
          !layer->has_adapter(config.adapter_name()),
          "torchlora: '",
          path,
          "' already has an adapter named \"",
          config.adapter_name(),
          "\"; give the new one another adapter_name");
    }
    auto options = matcher.options_for(path);
    detail::check_lora_options(options);
    planned.push_back(PlannedLayer{&entry, options});
  }

  TORCH_CHECK(
      !planned.empty(),
      "torchlora: no module matched ",
      matcher.describe_targets(),
      " (after exclusions and layer filters). The model's Linear layers: ",
      list_linear_paths(index, 8));
  return planned;
}

} // namespace detail

/// Adds a LoRA adapter to every layer of `model` that `config` targets and
/// returns their paths, in model order. `model` is an existing, loaded model.
///
/// - A targeted `torch::nn::Linear` registered in any module, including
///   inside `Sequential`, `ModuleList` and `ModuleDict` (whose storage is
///   updated too, so their forward uses it), is replaced by a
///   `torchlora::LoRALinear` that shares its tensors; a layer registered at
///   several paths is adapted once and every path sees it.
/// - A targeted `torchlora::LoRALinear` gets the adapter in place (another
///   `adapter_name` adds a second adapter, never a wrapper in a wrapper).
/// - A targeted plain Linear that something else also holds (a typed member
///   such as `torch::nn::Linear fc{nullptr};`) would keep being called by
///   the model's forward: that is an error that says how to fix the model.
/// - Afterwards only the adapters, `modules_to_save` and the biases of
///   `config.bias()` are trainable.
///
/// Every check runs before the model is changed: when `inject_lora` throws,
/// the model is exactly as it was.
///
/// Example:
/// ```
/// auto paths = torchlora::inject_lora(
///     *model, torchlora::LoRAConfig(8).alpha(16).target_modules({"q_proj"}));
/// ```
inline std::vector<std::string> inject_lora(
    torch::nn::Module& model,
    const LoRAConfig& config) {
  const TargetMatcher matcher(config);
  const detail::ModelIndex index(model);
  const auto planned = detail::plan_injection(index, matcher);

  // The walk held no references; each plain target is now held here once.
  std::vector<std::shared_ptr<torch::nn::Module>> held(planned.size());
  for (size_t i = 0; i < planned.size(); ++i) {
    const auto& entry = *planned[i].entry;
    if (detail::is_plain_linear(*entry.module)) {
      const auto& registration = entry.registrations.front();
      held[i] = registration.parent->named_children()[registration.name];
      detail::check_only_held_by_model(entry, held[i]);
    }
  }

  std::vector<std::string> paths;
  for (size_t i = 0; i < planned.size(); ++i) {
    const auto& entry = *planned[i].entry;
    const auto& name = config.adapter_name();
    if (auto* layer = dynamic_cast<LoRALayer*>(entry.module)) {
      layer->add_adapter(name, planned[i].options);
    } else {
      auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(held[i]);
      auto wrapped =
          std::make_shared<LoRALinearImpl>(torch::nn::Linear(linear));
      wrapped->add_adapter(name, planned[i].options);
      for (const auto& registration : entry.registrations) {
        detail::replace_child(
            *registration.parent, registration.name, entry.module, wrapped);
      }
    }
    paths.push_back(entry.paths.front());
  }

  mark_only_lora_as_trainable(model, config.bias());
  for (const auto& entry : index.entries()) {
    if (matcher.is_module_to_save(entry.paths.front())) {
      for (auto& parameter : entry.module->parameters()) {
        parameter.set_requires_grad(true);
      }
    }
  }
  return paths;
}

/// `inject_lora` on a module held by a `std::shared_ptr`.
template <typename ModuleType>
std::vector<std::string> inject_lora(
    const std::shared_ptr<ModuleType>& model,
    const LoRAConfig& config) {
  TORCH_CHECK(model != nullptr, "torchlora: inject_lora got a null model");
  return inject_lora(static_cast<torch::nn::Module&>(*model), config);
}

/// `inject_lora` on a module holder (`torch::nn::Sequential`, ...).
template <typename ModuleType>
std::vector<std::string> inject_lora(
    const torch::nn::ModuleHolder<ModuleType>& model,
    const LoRAConfig& config) {
  TORCH_CHECK(!model.is_empty(), "torchlora: inject_lora got an empty holder");
  return inject_lora(static_cast<torch::nn::Module&>(*model.ptr()), config);
}

/// Runs a layer that is a `torch::nn::Linear` or a `torchlora::LoRALinear`,
/// for forwards that reach a `ModuleList`/`ModuleDict` element, which
/// `inject_lora` may have swapped: use it where the code said
/// `list[i]->as<torch::nn::Linear>()->forward(x)`.
///
/// Example:
/// ```
/// x = torchlora::linear_forward(*layers[i], x);
/// ```
inline torch::Tensor linear_forward(
    torch::nn::Module& layer,
    const torch::Tensor& input) {
  if (auto* lora = layer.as<LoRALinearImpl>()) {
    return lora->forward(input);
  }
  if (auto* linear = layer.as<torch::nn::LinearImpl>()) {
    return linear->forward(input);
  }
  TORCH_CHECK(
      false,
      "torchlora: linear_forward needs a torch::nn::Linear or a "
      "torchlora::LoRALinear, got a ",
      layer.name());
}

} // namespace torchlora
