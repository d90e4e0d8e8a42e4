#pragma once

#include <torchlora/detail/check.h>
#include <torchlora/detail/text.h>
#include <torchlora/layer.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/module_ref.h>

#include <torch/nn/module.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace torchlora {
namespace detail {

/// Every adapter name of the model's LoRA layers, each once, first seen first.
inline std::vector<std::string> model_adapter_names(const ModelIndex& index) {
  std::vector<std::string> names;
  for (const auto& [entry, layer] : index.lora_layers()) {
    for (const auto& name : layer->adapter_names()) {
      if (std::find(names.begin(), names.end(), name) == names.end()) {
        names.push_back(name);
      }
    }
  }
  return names;
}

/// Throws unless some LoRA layer of `index` has adapter `name`.
inline void check_adapter_exists(
    const ModelIndex& index,
    const std::string& name,
    const char* operation) {
  const auto names = model_adapter_names(index);
  TORCHLORA_CHECK(
      std::find(names.begin(), names.end(), name) != names.end(),
      operation,
      ": the model has no adapter named \"",
      name,
      "\" (its adapters: ",
      quoted_list(names),
      ")");
}

/// Throws, naming the layer, if a LoRA layer that `name` concerns (all
/// layers when `name` is empty) is merged.
inline void check_not_merged(
    const ModelIndex& index,
    const std::string& name,
    const char* operation) {
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (name.empty() || layer->has_adapter(name)) {
      TORCHLORA_CHECK(
          !layer->merged(),
          operation,
          ": '",
          entry->paths.front(),
          "' is merged; unmerge the model first");
    }
  }
}

} // namespace detail

/// Makes `names` the active adapters of every LoRA layer of `model`: their
/// outputs are summed (as in peft), they are trainable, and every other
/// adapter is frozen and unused. A layer without any of them computes its
/// base output.
///
/// Example:
/// ```
/// torchlora::set_adapter(model, "fr");
/// torchlora::set_adapter(model, {"default", "fr"});
/// ```
inline void set_adapter(
    ModuleRef model,
    const std::vector<std::string>& names) {
  const detail::ModelIndex index(model.get());
  TORCHLORA_CHECK(
      !names.empty(),
      "set_adapter needs at least one adapter name, got none "
      "(torchlora::DisableAdapters switches all of them off)");
  for (const auto& name : names) {
    detail::check_adapter_exists(index, name, "set_adapter");
  }
  detail::check_not_merged(index, "", "set_adapter");
  detail::check_no_forward_running(index, "set_adapter");
  for (const auto& [entry, layer] : index.lora_layers()) {
    layer->set_active_adapters(names);
  }
}

/// `set_adapter` with one name.
inline void set_adapter(ModuleRef model, const std::string& name) {
  set_adapter(model, std::vector<std::string>{name});
}

/// `set_adapter` with a braced list of names.
inline void set_adapter(
    ModuleRef model,
    std::initializer_list<std::string> names) {
  set_adapter(model, std::vector<std::string>(names));
}

/// The adapter names of every LoRA layer of `model`, each once.
inline std::vector<std::string> adapter_names(ModuleRef model) {
  return detail::model_adapter_names(detail::ModelIndex(model.get()));
}

/// Removes adapter `name` from every LoRA layer of `model` that has it; its
/// tensors leave `named_parameters()`. Where it was the only active adapter,
/// the first remaining one becomes active, with a warning (as in peft).
inline void delete_adapter(ModuleRef model, const std::string& name) {
  const detail::ModelIndex index(model.get());
  detail::check_adapter_exists(index, name, "delete_adapter");
  detail::check_not_merged(index, name, "delete_adapter");
  detail::check_no_forward_running(index, "delete_adapter");
  detail::check_not_routed(index, "delete_adapter");
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (!layer->has_adapter(name)) {
      continue;
    }
    const auto active = layer->active_adapters();
    layer->delete_adapter(name);
    const auto now_active = layer->active_adapters();
    if (active.size() == 1 && active.front() == name && !now_active.empty()) {
      TORCHLORA_WARN(
          "delete_adapter: \"",
          name,
          "\" was the active adapter of '",
          entry->paths.front(),
          "'; \"",
          now_active.front(),
          "\" is active now");
    }
  }
}

/// Multiplies adapter `name`'s contribution by `scale` at run time, in
/// every LoRA layer of `model` that has it (1 restores it, 0 silences it).
inline void set_scale(ModuleRef model, const std::string& name, double scale) {
  const detail::ModelIndex index(model.get());
  detail::check_adapter_exists(index, name, "set_scale");
  detail::check_not_merged(index, name, "set_scale");
  detail::check_no_forward_running(index, "set_scale");
  // Each layer checks that the scale is finite before it stores it, so a
  // bad scale stops at the first layer with nothing changed.
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (layer->has_adapter(name)) {
      layer->set_scale(name, scale);
    }
  }
}

/// Inside its scope `model` computes exactly its base output, bit for bit:
/// every LoRA layer is switched off (merged layers are unmerged first). At
/// scope exit, also on an exception, every layer gets its state back (merged
/// layers are merged again; in place unless a DoRA adapter made active
/// meanwhile refuses that, then keeping the original). `modules_to_save` are
/// trained in place, so the guard does not undo their training. While it lives,
/// `inject_lora` is refused. Layers the model drops meanwhile (`unload`) are
/// left as they are, and the guard does not keep them alive (it never counts as
/// a reference held outside the model); LoRA layers that a later `inject_lora`
/// makes in their place are not switched off.
///
/// Example:
/// ```
/// {
///   torchlora::DisableAdapters guard(model);
///   auto reference = model(x);  // the base model's output
/// }
/// ```
class DisableAdapters {
 public:
  explicit DisableAdapters(ModuleRef model) {
    const detail::ModelIndex index(model.get());
    // Before anything changes: a layer refused half-way would leave the
    // others disabled until their restore.
    detail::check_no_forward_running(index, "DisableAdapters");
    const auto layers = index.lora_layers();
    saved_.reserve(layers.size());
    try {
      for (const auto& [entry, layer] : layers) {
        saved_.push_back(Saved{
            detail::share(*entry),
            entry->registrations.empty(),
            layer,
            layer->adapters_enabled(),
            layer->merged(),
            layer->merged_in_place()});
        layer->unmerge();
        layer->set_adapters_enabled(false);
      }
    } catch (...) {
      restore();
      throw;
    }
  }

  DisableAdapters(const DisableAdapters&) = delete;
  DisableAdapters& operator=(const DisableAdapters&) = delete;

  ~DisableAdapters() {
    restore();
  }

 private:
  struct Saved {
    std::weak_ptr<torch::nn::Module> module;
    /// The model itself is the layer (the caller keeps it alive).
    bool root;
    LoRALayer* layer;
    bool enabled;
    bool merged;
    bool merged_in_place;
  };

  void restore() noexcept {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      const auto alive = it->module.lock();
      if (!alive && !it->root) {
        continue; // no longer part of any model
      }
      try {
        it->layer->set_adapters_enabled(it->enabled);
        bool in_place = it->merged_in_place;
        if (in_place) {
          try {
            // The adapters made active meanwhile may refuse it (DoRA).
            it->layer->check_in_place_mergeable();
          } catch (const c10::Error&) {
            in_place = false;
          }
        }
        if (in_place) {
          it->layer->merge_in_place(/*safe=*/false);
        } else if (it->merged) {
          it->layer->merge(/*safe=*/false);
        }
      } catch (const std::exception& error) {
        TORCHLORA_WARN(
            "DisableAdapters could not restore a layer: ", error.what());
      }
    }
    saved_.clear();
  }

  std::vector<Saved> saved_;
};

} // namespace torchlora
