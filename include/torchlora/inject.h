#pragma once

#include <torchlora/attention.h>
#include <torchlora/config.h>
#include <torchlora/conv.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/text.h>
#include <torchlora/embedding.h>
#include <torchlora/kinds/layer_kinds.h>
#include <torchlora/layer.h>
#include <torchlora/layer/member_binding.h>
#include <torchlora/linear.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/module_ref.h>
#include <torchlora/parameters.h>
#include <torchlora/quantized_linear.h>
#include <torchlora/targeting.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/transformerlayer.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

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
  const LayerKind* kind;
  LoRAOptions options;
};

/// Where a LibTorch module reads `module` through a typed member of its own
/// (so that swapping it in the registry would not take effect), e.g.
/// "TransformerEncoderLayer's linear1->weight"; empty when none does.
inline std::string libtorch_member_of(
    const Registration& registration,
    const torch::nn::Module* module) {
  const auto* parent = registration.parent;
  const std::string& name = registration.name;
  if (const auto* encoder =
          dynamic_cast<const torch::nn::TransformerEncoderLayerImpl*>(parent)) {
    if ((name == "linear1" && encoder->linear1.get() == module) ||
        (name == "linear2" && encoder->linear2.get() == module)) {
      return "TransformerEncoderLayer's " + name + "->weight";
    }
  }
  if (const auto* decoder =
          dynamic_cast<const torch::nn::TransformerDecoderLayerImpl*>(parent)) {
    if ((name == "linear1" && decoder->linear1.get() == module) ||
        (name == "linear2" && decoder->linear2.get() == module)) {
      return "TransformerDecoderLayer's " + name + "->weight";
    }
  }
  const auto* attention =
      dynamic_cast<const torch::nn::MultiheadAttentionImpl*>(parent);
  if (const auto* lora =
          dynamic_cast<const LoRAMultiheadAttentionImpl*>(parent)) {
    attention = lora->base_layer().get();
  }
  if (attention != nullptr && name == "out_proj" &&
      attention->out_proj.get() == module) {
    return "MultiheadAttention's out_proj->weight";
  }
  return std::string();
}

/// The member a planned plain layer must be bound to, as `where` for
/// `torchlora::bind_member` ("'path' (...)"); empty when the layer is held
/// by the model only. A MultiheadAttention is always bound (its forward
/// reads `in_proj_weight`); a Linear when one LibTorch module's typed member
/// is all that holds it outside the model. Anything else holding it is the
/// error of `check_only_held_by_model`.
inline std::string member_binding(
    const ModelEntry& entry,
    const std::shared_ptr<torch::nn::Module>& module,
    const LayerKind& kind) {
  const auto& path = entry.paths.front();
  if (kind.is_plain(*module) &&
      dynamic_cast<const torch::nn::MultiheadAttentionImpl*>(module.get())) {
    return "'" + path + "' (MultiheadAttention's in_proj_weight)";
  }
  const auto outside = outside_references(entry, module);
  if (outside != 1) {
    return std::string();
  }
  for (const auto& registration : entry.registrations) {
    const auto member = libtorch_member_of(registration, module.get());
    if (!member.empty()) {
      return "'" + path + "' (" + member + ")";
    }
  }
  return std::string();
}

/// The paths of the layers torchlora can adapt, at most `limit` of them.
inline std::string list_adaptable_paths(const ModelIndex& index, size_t limit) {
  std::string text;
  size_t shown = 0;
  size_t total = 0;
  for (const auto& entry : index.entries()) {
    if (kind_of(*entry.module) == nullptr) {
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

inline void check_only_held_by_model(
    const ModelEntry& entry,
    const std::shared_ptr<torch::nn::Module>& module,
    const LayerKind& kind) {
  const auto outside = outside_references(entry, module);
  if (outside == 0) {
    return;
  }
  const auto& registration = entry.registrations.front();
  const auto layer =
      "cannot adapt '" + entry.paths.front() + "': this " + kind.plain_name;
  if (is_container(*registration.parent)) {
    TORCHLORA_CHECK(
        false,
        layer,
        " sits in a container but is also held outside the model (",
        outside,
        " more reference(s), e.g. a variable or member that still holds the "
        "layer put in the container), which would keep calling the old "
        "layer. Drop that reference, or declare the member as ",
        kind.lora_name,
        "." TORCHLORA_NOTHING_CHANGED);
  }
  TORCHLORA_CHECK(
      false,
      layer,
      " is also held outside the model's registry and containers (",
      outside,
      " more reference(s): a typed member such as `",
      kind.plain_name,
      " ",
      registration.name,
      "{nullptr};`, or a variable), which would keep calling the old layer, "
      "so the adapter would never be used. Declare the member as `",
      kind.lora_name,
      " ",
      registration.name,
      "{nullptr};` (same constructor arguments, same checkpoint keys), or "
      "hold the layer only in a Sequential, ModuleList or "
      "ModuleDict." TORCHLORA_NOTHING_CHANGED);
}

/// Adds the companion of every planned layer whose kind has one (an
/// attention's `out_proj`, with the attention's options, as peft does) unless
/// planned already, keeping model order.
inline void add_attention_output_projections(
    const ModelIndex& index,
    const LoRAConfig& config,
    std::vector<PlannedLayer>& planned) {
  const auto planned_at = [&](const ModelEntry& entry) {
    return std::any_of(planned.begin(), planned.end(), [&](const auto& p) {
      return p.entry == &entry;
    });
  };
  std::vector<PlannedLayer> added;
  for (const auto& layer : planned) {
    if (layer.kind->companion == nullptr) {
      continue;
    }
    const auto out_path =
        child_path(layer.entry->paths.front(), layer.kind->companion);
    for (const auto& entry : index.entries()) {
      if (entry.paths.front() != out_path || planned_at(entry)) {
        continue;
      }
      auto* lora = dynamic_cast<LoRALayer*>(entry.module);
      if (lora != nullptr && lora->has_adapter(config.adapter_name())) {
        continue;
      }
      added.push_back(
          PlannedLayer{&entry, kind_of(*entry.module), layer.options});
    }
  }
  planned.insert(planned.end(), added.begin(), added.end());
  const auto* first = index.entries().data();
  std::sort(planned.begin(), planned.end(), [&](const auto& a, const auto& b) {
    return a.entry - first < b.entry - first;
  });
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
          return TargetMatcher::is_named_to_save(entry.paths.front(), {name});
        });
    TORCHLORA_CHECK(
        found,
        "modules_to_save entry \"",
        name,
        "\" matches no module of the model");
  }

  for (const auto& entry : index.entries()) {
    TORCHLORA_CHECK(
        !matcher.is_module_to_save(entry.paths.front()) ||
            !is_quantized(*entry.module),
        "modules_to_save takes in '",
        entry.paths.front(),
        "', whose weight is quantized and cannot be trained; leave it out "
        "of modules_to_save (its adapters train over it)." TORCHLORA_NOTHING_CHANGED);
  }

  std::vector<PlannedLayer> planned;
  for (const auto& entry : index.entries()) {
    const auto& path = entry.paths.front();
    if (!matcher.is_target(path)) {
      continue;
    }
    const auto* kind = kind_of(*entry.module);
    if (matcher.targets_all_linear() &&
        (kind == nullptr || !kind->linear ||
         TargetMatcher::is_output_head(path))) {
      continue;
    }
    TORCHLORA_CHECK(
        kind != nullptr,
        matcher.describe_targets(),
        " matched '",
        path,
        "', a ",
        entry.module->name(),
        "; only ",
        adaptable_kinds_text(),
        " can be adapted. Name the layers inside it instead.");
    if (auto* layer = dynamic_cast<LoRALayer*>(entry.module)) {
      TORCHLORA_CHECK(
          !layer->merged(),
          "'",
          path,
          "' is merged; unmerge the model before adding an adapter. Nothing "
          "was changed.");
      TORCHLORA_CHECK(
          !layer->has_adapter(config.adapter_name()),
          "'",
          path,
          "' already has an adapter named \"",
          config.adapter_name(),
          "\"; give the new one another adapter_name");
    }
    planned.push_back(PlannedLayer{&entry, kind, matcher.options_for(path)});
  }
  add_attention_output_projections(index, config, planned);

  TORCHLORA_CHECK(
      !planned.empty(),
      "no module matched ",
      matcher.describe_targets(),
      " (after exclusions and layer filters). The model's adaptable layers: ",
      list_adaptable_paths(index, 8));
  return planned;
}

} // namespace detail

namespace detail {

/// Carries out `planned` (made by `plan_injection` from `index` of `model`,
/// nothing changed since) and returns the adapted paths; on any failure the
/// model is as it was.
inline std::vector<std::string> inject_planned(
    torch::nn::Module& model,
    const TargetMatcher& matcher,
    const ModelIndex& index,
    const std::vector<PlannedLayer>& planned) {
  const auto& config = matcher.config();
  // The walk held no references; each plain target is now held here once.
  std::vector<std::shared_ptr<torch::nn::Module>> held(planned.size());
  std::vector<std::string> bindings(planned.size());
  for (size_t i = 0; i < planned.size(); ++i) {
    const auto& entry = *planned[i].entry;
    if (planned[i].kind->is_plain(*entry.module)) {
      held[i] = share(entry);
      bindings[i] = member_binding(entry, held[i], *planned[i].kind);
      if (bindings[i].empty()) {
        check_only_held_by_model(entry, held[i], *planned[i].kind);
      }
    }
  }

  // What can still fail: a layer kind's own refusal of the options, and
  // memory. On any failure the steps taken are undone, so the model is as
  // it was: a layer that took the adapter in place gets its active set back
  // too (removing the adapter would otherwise activate another, as in peft).
  const auto& name = config.adapter_name();
  const TrainableFlags flags(model);
  // PiSSA/OLoRA change the base weights: kept to be put back on failure.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> weights_before;
  const auto init = config.init();
  if (init == LoRAInit::pissa || init == LoRAInit::olora) {
    for (const auto& layer : planned) {
      const auto own = layer.entry->module->named_parameters(false);
      if (const auto* weight = own.find("weight")) {
        weights_before.emplace_back(*weight, weight->detach().clone());
      }
    }
  }
  std::vector<std::pair<LoRALayer*, std::vector<std::string>>> extended;
  std::vector<std::pair<size_t, std::shared_ptr<torch::nn::Module>>> swapped;
  try {
    // The innermost first: an attention's out_proj is swapped before the
    // attention, whose LoRA layer then takes it over.
    for (size_t i = planned.size(); i-- > 0;) {
      const auto& entry = *planned[i].entry;
      try {
        if (auto* layer = dynamic_cast<LoRALayer*>(entry.module)) {
          auto active = layer->active_adapters();
          layer->add_adapter(name, planned[i].options);
          extended.emplace_back(layer, std::move(active));
        } else {
          auto [wrapped, wrapped_any] = planned[i].kind->wrap(held[i]);
          try {
            dynamic_cast<LoRALayer&>(*wrapped).add_adapter(
                name, planned[i].options);
          } catch (...) {
            // A LoRAMultiheadAttention took its base's out_proj over when
            // made: unloading gives it back.
            dynamic_cast<LoRALayer&>(*wrapped).unload(/*merge_first=*/false);
            throw;
          }
          swapped.emplace_back(i, wrapped);
          replace_everywhere(entry, entry.module, wrapped, wrapped_any);
          if (!bindings[i].empty()) {
            bind_member(dynamic_cast<LoRALayer&>(*wrapped), bindings[i]);
          }
        }
      } catch (const c10::Error& error) { // a layer kind's own refusal
        TORCHLORA_CHECK(
            false,
            "cannot adapt '",
            entry.paths.front(),
            "': ",
            as_clause(error.what_without_backtrace()),
            "." TORCHLORA_NOTHING_CHANGED);
      }
    }
    mark_only_lora_as_trainable(model, config.bias());
    for (const auto& entry : index.entries()) {
      if (matcher.is_module_to_save(entry.paths.front())) {
        for (auto& parameter : entry.module->parameters()) {
          // Quantized codes take no gradient.
          parameter.set_requires_grad(parameter.is_floating_point());
        }
      }
    }
  } catch (...) {
    for (const auto& [layer, active] : extended) {
      layer->delete_adapter(name);
      layer->set_active_adapters(active);
    }
    for (auto it = swapped.rbegin(); it != swapped.rend(); ++it) {
      const auto& [i, wrapped] = *it;
      // Gives a bound member its weight back and the attention its out_proj.
      dynamic_cast<LoRALayer&>(*wrapped).unload(/*merge_first=*/false);
      replace_everywhere(
          *planned[i].entry,
          wrapped.get(),
          held[i],
          planned[i].kind->plain_any(held[i]));
    }
    flags.restore();
    torch::NoGradGuard no_grad;
    for (auto& [weight, before] : weights_before) {
      weight.detach().copy_(before);
    }
    throw;
  }

  std::vector<std::string> paths;
  for (const auto& layer : planned) {
    paths.push_back(layer.entry->paths.front());
  }
  return paths;
}

} // namespace detail

/// Adds a LoRA adapter to every layer of `model` that `config` targets and
/// returns their paths, in model order. `model` is an existing, loaded model
/// (a reference, a `std::shared_ptr` or a holder).
///
/// - A targeted `torch::nn::Linear`, `Embedding`, `Conv1d`, `Conv2d` or
///   `Conv3d` registered in any module, including inside `Sequential`,
///   `ModuleList` and `ModuleDict` (whose storage is updated too, so their
///   forward uses it), is replaced by its LoRA layer
///   (`torchlora::LoRALinear`, `LoRAEmbedding`, `LoRAConv2d`, ...) that
///   shares its tensors; a layer registered at several paths is adapted once
///   and every path sees it.
///   `"all-linear"` takes Linear layers only, as in peft.
/// - A targeted LoRA layer gets the adapter in place (another
///   `adapter_name` adds a second adapter, never a wrapper in a wrapper).
/// - A targeted plain layer that something else also holds (a typed member
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
/// plain children fails after injection (the child types differ).
///
/// Example:
/// ```
/// auto paths = torchlora::inject_lora(
///     *model,
///     torchlora::LoRAConfig(8).alpha(16).target_modules({"q_proj"}));
/// ```
inline std::vector<std::string> inject_lora(
    ModuleRef model_ref,
    const LoRAConfig& config) {
  auto& model = model_ref.get();
  const TargetMatcher matcher(config);
  const detail::ModelIndex index(model);
  detail::check_not_routed(index, "inject_lora");
  detail::check_no_forward_running(index, "inject_lora");
  detail::check_adapters_enabled(index, "inject_lora");
  return detail::inject_planned(
      model, matcher, index, detail::plan_injection(index, matcher));
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
  if (auto* quantized = layer.as<QuantizedLinearImpl>()) {
    return quantized->forward(input);
  }
  auto* linear = layer.as<torch::nn::LinearImpl>();
  TORCHLORA_CHECK(
      linear != nullptr,
      "linear_forward needs a torch::nn::Linear, a torchlora::LoRALinear or "
      "a torchlora::QuantizedLinear, got a ",
      layer.name());
  return linear->forward(input);
}

/// Runs a layer of any kind torchlora adapts, plain or LoRA (Linear,
/// Embedding, Conv1d/2d/3d), for forwards that reach a layer through the
/// registry or a `ModuleList`/`ModuleDict`, which `inject_lora` may have
/// swapped.
///
/// Example:
/// ```
/// x = torchlora::layer_forward(*named_children()["embed"], tokens);
/// ```
inline torch::Tensor layer_forward(
    torch::nn::Module& layer,
    const torch::Tensor& input) {
  const auto* kind = detail::kind_of(layer);
  TORCHLORA_CHECK(
      kind != nullptr,
      "layer_forward needs a layer torchlora adapts (",
      detail::adaptable_kinds_text(),
      "), got a ",
      layer.name());
  TORCHLORA_CHECK(
      kind->forward != nullptr,
      "layer_forward runs layers with one input; a ",
      layer.name(),
      " takes several: call its own forward");
  auto output = kind->forward(layer, input);
  // A LoRA layer the table counts as Linear's but over another base.
  TORCHLORA_CHECK(
      output.defined(),
      "layer_forward runs the LoRA layers of ",
      detail::adaptable_kinds_text(/*lora_only=*/true),
      "; this ",
      layer.name(),
      " wraps another base layer: call its own forward");
  return output;
}

} // namespace torchlora
