#pragma once

#include <torchlora/detail/check.h>
#include <torchlora/detail/text.h>
#include <torchlora/layer.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/module_ref.h>
#include <torchlora/quantize.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {

/// Options of `merge` and `merge_and_unload`.
///
/// Example:
/// ```
/// torchlora::merge(model, torchlora::MergeOptions().safe(true));
/// ```
struct MergeOptions {
  /// Compute every merged weight first and refuse, changing nothing, if one
  /// holds NaN or Inf. Costs one more pass over the weights. Default: false.
  TORCH_ARG(bool, safe) = false;
  /// Keep a copy of each merged weight from before, so that `unmerge`
  /// restores it bit for bit (default). With false, `merge` adds the deltas
  /// into the weights themselves and keeps no copy: the memory of the plain
  /// model, for serving one adapter; `unmerge` then subtracts the deltas,
  /// equal up to rounding (not bit for bit, least so in fp16/bf16).
  /// `merge_and_unload` keeps no copy either way.
  TORCH_ARG(bool, keep_original) = true;
};

namespace detail {

/// Throws, naming the layer, if merging the model would fail on any layer:
/// adapters disabled, a delta the base weight cannot hold, a merged weight
/// gone stale, or (when `safe`) NaN or Inf weights. Runs before any layer
/// is merged.
inline void check_mergeable(const ModelIndex& index, bool safe) {
  check_no_forward_running(index, "merge");
  for (const auto& [entry, layer] : index.lora_layers()) {
    const auto& path = entry->paths.front();
    if (!layer->merged() && !layer->active_adapters().empty()) {
      TORCHLORA_CHECK(
          layer->adapters_enabled(),
          "cannot merge '",
          path,
          "': its adapters are disabled (DisableAdapters); merge after the "
          "guard's scope. Nothing was merged");
    }
    try {
      layer->check_mergeable();
    } catch (const c10::Error& error) {
      TORCHLORA_CHECK(
          false,
          "cannot merge '",
          path,
          "': ",
          without_prefix(error.what_without_backtrace()));
    }
    TORCHLORA_CHECK(
        !safe || layer->merged() || layer->active_adapters().empty() ||
            layer->merge_is_finite(),
        "safe merge refused: merging the active adapters of '",
        path,
        "' gives NaN or Inf weights; no weight was changed");
  }
}

/// Throws, naming the layer and the other tensor, if merging the active
/// adapters of a layer of `index` (into its weight itself when `in_place`)
/// would change a tensor that another module of `model` uses too: a weight
/// that is also another module's (tied weights, `b->weight = a->weight`,
/// seen in the registries and in the members of LibTorch's Linear,
/// Embedding and Conv layers) is never merged, as merging replaces the
/// tensor's values wherever it is used; a weight that only shares memory
/// with another tensor is merged keeping the original (which gives it
/// memory of its own), never in place.
inline void check_merge_changes_no_other_tensor(
    torch::nn::Module& model,
    const ModelIndex& index,
    bool in_place) {
  const auto tensors = model_tensors(model, index);
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (layer->merged() || layer->active_adapters().empty()) {
      continue;
    }
    const auto weight = layer->base_weight();
    if (!weight.defined()) {
      continue;
    }
    for (const auto& [key, tensor] : tensors) {
      const bool own = owns_tensor(*entry, key);
      if (tensor.unsafeGetTensorImpl() == weight.unsafeGetTensorImpl()) {
        TORCHLORA_CHECK(
            own,
            "cannot merge '",
            entry->paths.front(),
            "': its weight is also '",
            key,
            "' (tied weights), so merging would change that module too. "
            "Serve the model unmerged, or give each module a weight of its "
            "own before inject_lora. Nothing was merged");
      } else if (
          in_place && tensor.defined() && tensor.has_storage() &&
          weight.has_storage() && tensor.is_alias_of(weight)) {
        TORCHLORA_CHECK(
            false,
            "cannot merge '",
            entry->paths.front(),
            "' in place: its weight shares memory with '",
            key,
            "', which would change too. Merge keeping the original "
            "(MergeOptions().keep_original(true)), which gives the merged "
            "weight memory of its own. Nothing was merged");
      }
    }
  }
}

/// Throws, naming the layer, if unmerging the model would fail on any layer.
inline void check_unmergeable(const ModelIndex& index) {
  check_no_forward_running(index, "unmerge");
  for (const auto& [entry, layer] : index.lora_layers()) {
    try {
      layer->check_unmergeable();
    } catch (const c10::Error& error) {
      TORCHLORA_CHECK(
          false,
          "cannot unmerge '",
          entry->paths.front(),
          "': ",
          without_prefix(error.what_without_backtrace()));
    }
  }
}

/// Unloads every LoRA layer of `index`, the innermost first (a
/// LoRAMultiheadAttention's `out_proj` before the attention), putting the
/// base layer back where only the model held the LoRA layer.
inline void unload_layers(const ModelIndex& index, bool merge_first) {
  const auto layers = index.lora_layers();
  for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
    const auto& [entry, layer] = *it;
    const auto held = share(*entry);
    const bool held_outside = outside_references(*entry, held) > 0;
    layer->unload(merge_first);
    if (held != nullptr && !held_outside) {
      replace_everywhere(
          *entry,
          entry->module,
          layer->base_module(),
          layer->base_any_module());
    }
  }
}

} // namespace detail

/// Merges the active adapters of every LoRA layer of `model` into its base
/// weights: the forward is then the plain model's, at its speed. Each merged
/// layer keeps a copy of its weight from before (memory: one more copy of
/// every merged weight) so that `unmerge` restores it bit for bit, in every
/// dtype (with `MergeOptions().keep_original(false)`: no copy, and `unmerge`
/// subtracts the deltas); the delta is computed in fp32 for fp16/bf16 weights.
/// Layers already merged are left as they are, so merging twice never adds
/// twice.
///
/// Example:
/// ```
/// torchlora::merge(model);    // serve
/// torchlora::unmerge(model);  // back to training or switching adapters
/// ```
inline void merge(ModuleRef model, const MergeOptions& options = {}) {
  const detail::ModelIndex index(model.get());
  detail::check_mergeable(index, options.safe());
  detail::check_merge_changes_no_other_tensor(
      model.get(), index, !options.keep_original());
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (layer->merged() || layer->active_adapters().empty()) {
      continue;
    }
    try {
      layer->check_weight_mergeable();
    } catch (const c10::Error& error) {
      TORCHLORA_CHECK(
          false,
          "cannot merge '",
          entry->paths.front(),
          "': ",
          detail::without_prefix(error.what_without_backtrace()));
    }
  }
  if (!options.keep_original()) {
    for (const auto& [entry, layer] : index.lora_layers()) {
      try {
        layer->check_in_place_mergeable();
      } catch (const c10::Error& error) {
        TORCHLORA_CHECK(
            false,
            "cannot merge '",
            entry->paths.front(),
            "' in place: ",
            detail::without_prefix(error.what_without_backtrace()));
      }
    }
  }
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (options.keep_original()) {
      layer->merge(/*safe=*/false);
    } else {
      layer->merge_in_place(/*safe=*/false);
    }
  }
}

/// Restores the exact base weights of every merged LoRA layer of `model`;
/// unmerged layers are left as they are.
inline void unmerge(ModuleRef model) {
  const detail::ModelIndex index(model.get());
  detail::check_unmergeable(index);
  for (const auto& [entry, layer] : index.lora_layers()) {
    layer->unmerge();
  }
}

/// Merges the active adapters for good and removes every adapter: the model
/// is the plain model again, with merged weights. Containers hold their
/// `torch::nn::Linear` layers again (the very objects that were wrapped);
/// `LoRALinear` members stay, without adapters. The state dict has exactly
/// the plain model's keys. Base tensors stay frozen. Quantized layers
/// (`QuantizedLinear`, a `LoRALinear` over one) become float Linear layers
/// holding the dequantized weight plus the deltas, in the dtype they
/// computed in (see `quantize`).
inline void merge_and_unload(
    ModuleRef model,
    const MergeOptions& options = {}) {
  const detail::ModelIndex index(model.get());
  detail::check_no_forward_running(index, "merge_and_unload");
  detail::check_mergeable(index, options.safe());
  detail::check_not_routed(index, "merge_and_unload");
  detail::check_merge_changes_no_other_tensor(
      model.get(), index, /*in_place=*/false);
  const auto quantized = detail::plan_dequantization(index);
  detail::unload_layers(index, /*merge_first=*/true);
  // LoRA layers over quantized bases were dequantized as they unloaded.
  detail::dequantize_planned(quantized, /*plain_only=*/true);
}

/// Removes every adapter without merging: the model computes the base
/// output again, bit for bit (merged layers are restored first). Layers are
/// put back as `merge_and_unload` does.
inline void unload(ModuleRef model) {
  const detail::ModelIndex index(model.get());
  detail::check_no_forward_running(index, "unload");
  detail::check_unmergeable(index);
  detail::check_not_routed(index, "unload");
  detail::unload_layers(index, /*merge_first=*/false);
}

} // namespace torchlora
