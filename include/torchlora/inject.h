#pragma once

#include <torchlora/config.h>
#include <torchlora/detail/model_walk.h>
#include <torchlora/layer.h>
#include <torchlora/linear.h>
#include <torchlora/module_ref.h>
#include <torchlora/parameters.h>
#include <torchlora/targeting.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace detail {

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

/// Refuses to adapt the plain Linear of `entry` (held once more by `module`)
/// when something outside the model's registries and containers holds it:
/// that holder would keep calling the old layer.
inline void check_only_held_by_model(
    const ModelEntry& entry,
    const std::shared_ptr<torch::nn::Module>& module) {
  const auto outside = outside_references(entry, module);
  if (outside == 0) {
    return;
  }
  const auto& registration = entry.registrations.front();
  const auto& path = entry.paths.front();
  if (is_container(*registration.parent)) {
    TORCH_CHECK(
        false,
        "torchlora: cannot adapt '",
        path,
        "': this torch::nn::Linear sits in a container but is also held "
        "outside the model (",
        outside,
        " more reference(s), e.g. a variable or member that still holds the "
        "layer put in the container), which would keep calling the old "
        "layer. Drop that reference, or declare the member as "
        "torchlora::LoRALinear. Nothing was changed.");
  }
  TORCH_CHECK(
      false,
      "torchlora: cannot adapt '",
      path,
      "': this torch::nn::Linear is also held outside the model's registry "
      "and containers (",
      outside,
      " more reference(s): a typed member such as `torch::nn::Linear ",
      registration.name,
      "{nullptr};`, or a variable), which would keep calling the old layer, "
      "so the adapter would never be used. Declare the member as "
      "`torchlora::LoRALinear ",
      registration.name,
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
        (!is_linear_like(*entry.module) ||
         TargetMatcher::is_output_head(path))) {
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
          !layer->merged(),
          "torchlora: '",
          path,
          "' is merged; unmerge the model before adding an adapter. Nothing "
          "was changed.");
      TORCH_CHECK(
          !layer->has_adapter(config.adapter_name()),
          "torchlora: '",
          path,
          "' already has an adapter named \"",
          config.adapter_name(),
          "\"; give the new one another adapter_name");
    }
    planned.push_back(PlannedLayer{&entry, matcher.options_for(path)});
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
/// returns their paths, in model order. `model` is an existing, loaded model
/// (a reference, a `std::shared_ptr` or a holder).
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
/// Every check runs before the model is changed, and a failure while
/// changing it (out of memory) undoes what was done: when `inject_lora`
/// throws, the model is exactly as it was.
///
/// Limits: references that own nothing (a raw `LinearImpl*`, a `weak_ptr`)
/// cannot be seen; `clone()` of a whole model whose own `reset()` creates
/// plain Linear children fails after injection (the child types differ).
///
/// Example:
/// ```
/// auto paths = torchlora::inject_lora(
///     *model, torchlora::LoRAConfig(8).alpha(16).target_modules({"q_proj"}));
/// ```
inline std::vector<std::string> inject_lora(
    ModuleRef model_ref,
    const LoRAConfig& config) {
  auto& model = model_ref.get();
  const TargetMatcher matcher(config);
  const detail::ModelIndex index(model);
  const auto planned = detail::plan_injection(index, matcher);

  // The walk held no references; each plain target is now held here once.
  std::vector<std::shared_ptr<torch::nn::Module>> held(planned.size());
  for (size_t i = 0; i < planned.size(); ++i) {
    const auto& entry = *planned[i].entry;
    if (detail::is_plain_linear(*entry.module)) {
      held[i] = detail::share(entry);
      detail::check_only_held_by_model(entry, held[i]);
    }
  }

  // Every check passed; what can still fail is memory. On any failure the
  // steps taken are undone, so the model is as it was.
  const auto& name = config.adapter_name();
  const detail::TrainableFlags flags(model);
  std::vector<LoRALayer*> extended;
  std::vector<std::pair<size_t, std::shared_ptr<LoRALinearImpl>>> swapped;
  try {
    for (size_t i = 0; i < planned.size(); ++i) {
      const auto& entry = *planned[i].entry;
      if (auto* layer = dynamic_cast<LoRALayer*>(entry.module)) {
        layer->add_adapter(name, planned[i].options);
        extended.push_back(layer);
      } else {
        auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(held[i]);
        auto wrapped =
            std::make_shared<LoRALinearImpl>(torch::nn::Linear(linear));
        wrapped->add_adapter(name, planned[i].options);
        swapped.emplace_back(i, wrapped);
        detail::replace_everywhere(entry, entry.module, wrapped);
      }
    }
    mark_only_lora_as_trainable(model, config.bias());
    for (const auto& entry : index.entries()) {
      if (matcher.is_module_to_save(entry.paths.front())) {
        for (auto& parameter : entry.module->parameters()) {
          parameter.set_requires_grad(true);
        }
      }
    }
  } catch (...) {
    for (auto* layer : extended) {
      layer->delete_adapter(name);
    }
    for (const auto& [i, wrapped] : swapped) {
      auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(held[i]);
      detail::replace_everywhere(*planned[i].entry, wrapped.get(), linear);
    }
    flags.restore();
    throw;
  }

  std::vector<std::string> paths;
  for (const auto& layer : planned) {
    paths.push_back(layer.entry->paths.front());
  }
  return paths;
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
  auto* linear = layer.as<torch::nn::LinearImpl>();
  TORCH_CHECK(
      linear != nullptr,
      "torchlora: linear_forward needs a torch::nn::Linear or a "
      "torchlora::LoRALinear, got a ",
      layer.name());
  return linear->forward(input);
}

} // namespace torchlora
