#pragma once

// save_adapter: one adapter of a model written as peft's adapter files.

#include <torchlora/adapters.h>
#include <torchlora/config.h>
#include <torchlora/detail/atomic_file.h>
#include <torchlora/detail/check.h>
#include <torchlora/inject.h>
#include <torchlora/io/initial_conversion.h>
#include <torchlora/io/peft_config_read.h>
#include <torchlora/io/peft_config_write.h>
#include <torchlora/io/peft_layout.h>
#include <torchlora/kinds/layer_kinds.h>
#include <torchlora/layer.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/module_ref.h>
#include <torchlora/parameters.h>
#include <torchlora/safetensors.h>
#include <torchlora/targeting.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace torchlora {

/// Options of `save_adapter`.
///
/// Example:
/// ```
/// torchlora::save_adapter(*model, "out/adapter",
///     torchlora::SaveAdapterOptions().adapter_name("fr").modules_to_save({"head"}));
/// ```
struct SaveAdapterOptions {
  /// The adapter to save. A name other than "default" is saved in a
  /// sub-folder of that name, as peft's `save_pretrained` does.
  TORCH_ARG(std::string, adapter_name) = "default";

  /// Modules trained in full to save with it, matched like `target_modules`.
  TORCH_ARG(std::vector<std::string>, modules_to_save) = {};

  /// Which biases to save with it (the bias mode it was trained with).
  TORCH_ARG(LoRABias, bias) = LoRABias::none;

  /// Written to `adapter_config.json` for peft; empty writes null.
  TORCH_ARG(std::string, base_model_name_or_path) = "";

  /// peft's `task_type` (e.g. "CAUSAL_LM"); empty writes null.
  TORCH_ARG(std::string, task_type) = "";

  /// For an adapter whose init changed the base (PiSSA, OLoRA): the folder
  /// where it was saved right after `inject_lora`. The adapter is then
  /// written as a plain LoRA adapter of the base from before its init
  /// (peft's `path_initial_model_for_weight_conversion`): rank and alpha
  /// doubled (alpha times sqrt(2) with rsLoRA), `A' = [A; A0]`, `B' = [B,
  /// -B0]`. Empty (the default): saved as trained, for the changed base.
  /// (`save_adapter(model, dir, config)` saves as trained.)
  TORCH_ARG(std::string, initial_adapter_dir) = "";
};

namespace detail {

/// The config the adapter was injected with, where it still selects exactly
/// the layers that carry `name` (an attention's out_proj comes with its
/// attention), with their ranks, alphas, rsLoRA and dropout, and peft reads
/// it as torchlora does: then save_adapter writes its targets and patterns
/// as given. Otherwise nullopt (save_adapter writes the adapted paths).
inline std::optional<LoRAConfig> config_if_it_selects(
    const ModelIndex& index,
    const LoRAConfig& config,
    const std::string& name,
    const std::set<std::string>& attentions) {
  const TargetMatcher matcher(config);
  // Written as given only where peft reads it as torchlora does: not
  // "all-linear" (the output head), not a layer filter (peft 0.20 counts a
  // path's first numbered list, 0.15 its last, neither one at the top of
  // the model), and no pattern key twice (the JSON object keeps one).
  if (config.adapter_name() != name || matcher.targets_all_linear() ||
      !config.layers_to_transform().empty() ||
      !config.layers_pattern().empty()) {
    return std::nullopt;
  }
  std::set<std::string> keys;
  for (const auto& entry : config.rank_pattern()) {
    if (!keys.insert(entry.first).second) {
      return std::nullopt;
    }
  }
  keys.clear();
  for (const auto& entry : config.alpha_pattern()) {
    if (!keys.insert(entry.first).second) {
      return std::nullopt;
    }
  }
  std::map<std::string, const LoRALayer*> carrying;
  for (const auto& [entry, layer] : index.lora_layers()) {
    const auto& path = entry->paths.front();
    if (layer->has_adapter(name) &&
        peft_module_path(path, attentions) == path) {
      carrying[path] = layer;
    }
  }
  for (const auto& entry : index.entries()) {
    const auto& path = entry.paths.front();
    if (kind_of(*entry.module) == nullptr) {
      continue;
    }
    if (peft_module_path(path, attentions) != path) {
      // peft would give an adapted attention's out_proj a second adapter.
      if (matcher.is_target(path)) {
        return std::nullopt;
      }
      continue;
    }
    const auto found = carrying.find(path);
    if (matcher.is_target(path) != (found != carrying.end())) {
      return std::nullopt;
    }
    if (found != carrying.end()) {
      const auto want = matcher.options_for(path);
      const auto& have = found->second->adapter_options(name);
      if (want.rank() != have.rank() || want.alpha() != have.alpha() ||
          want.use_rslora() != have.use_rslora() ||
          want.dropout() != have.dropout()) {
        return std::nullopt;
      }
    }
  }
  return config;
}

inline void save_adapter_as(
    ModuleRef model_ref,
    const std::string& dir,
    const SaveAdapterOptions& options,
    const LoRAConfig* injected_with);

/// Warns where `path` is the out_proj of a MultiheadAttention that does not
/// carry adapter `name` itself: peft's attention reads out_proj's weight
/// directly, so peft would ignore that adapter in its forward.
inline void warn_if_out_proj_alone(
    const ModelIndex& index,
    const std::string& path,
    const std::string& name) {
  std::string parent;
  const auto* kind = companion_kind(path, &parent);
  if (kind == nullptr) {
    return;
  }
  for (const auto& entry : index.entries()) {
    if (entry.paths.front() == parent && kind_of(*entry.module) == kind) {
      TORCHLORA_WARN(
          "save_adapter: '",
          path,
          "' carries adapter \"",
          name,
          "\" but its attention '",
          parent,
          "' does not: peft's MultiheadAttention reads out_proj's weight "
          "directly, so peft ignores this adapter in its forward (it counts "
          "only once merged). Adapt the attention to carry it to peft");
    }
  }
}

} // namespace detail

/// Saves adapter `options.adapter_name()` of `model` in peft's format:
/// `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`
/// and `...lora_B.weight`, tensors in their dtype, metadata
/// `{"format": "pt"}`) and `adapter_config.json`, in `dir` (in `dir/<name>`
/// for a name other than "default"). `target_modules` is written as the list
/// of adapted paths (or, where another layer's path ends with one of them,
/// as a full-match regex of them), so peft adapts exactly the same layers;
/// ranks and alphas that differ from the most common ones go into
/// `rank_pattern` and `alpha_pattern` under their paths (anchored where
/// peft would match the bare path on another layer too). `modules_to_save`
/// are saved whole (parameters and buffers) under their plain keys, biases
/// under peft's keys (`<path>.base_layer.bias` for an adapted layer). An
/// attention's out_proj B is written halved: peft adds that delta twice
/// (huggingface/peft#3774). Run-time scales (`set_scale`) are not saved.
/// Trainable parameters that the file would leave out (a module trained in full
/// but not named in `modules_to_save`, say) are named in a warning: pass the
/// `LoRAConfig` the model was injected with to save what it trains. The file
/// names layers by their paths in `model`, so `model` holds the LoRA layers
/// (a `LoRALinear` by itself is refused: register it in a module).
///
/// Example:
/// ```
/// torchlora::save_adapter(*model, "out/adapter");
/// ```
inline void save_adapter(
    ModuleRef model_ref,
    const std::string& dir,
    const SaveAdapterOptions& options = {}) {
  detail::save_adapter_as(model_ref, dir, options, nullptr);
}

/// `save_adapter` with the adapter name, `modules_to_save` and bias mode of
/// the config the adapter was injected with; where that config still
/// selects exactly the adapted layers and peft reads it the same way (no
/// "all-linear", layer filter or repeated pattern key), its
/// `target_modules` (or regex), exclusions and rank/alpha patterns are
/// written as given, as peft writes them.
inline void save_adapter(
    ModuleRef model,
    const std::string& dir,
    const LoRAConfig& config) {
  detail::save_adapter_as(
      model,
      dir,
      SaveAdapterOptions()
          .adapter_name(config.adapter_name())
          .modules_to_save(config.modules_to_save())
          .bias(config.bias()),
      &config);
}

namespace detail {

inline void save_adapter_as(
    ModuleRef model_ref,
    const std::string& dir,
    const SaveAdapterOptions& options,
    const LoRAConfig* injected_with) {
  auto& model = model_ref.get();
  check_not_a_lone_layer(model, "save_adapter");
  const auto& name = options.adapter_name();
  const detail::ModelIndex index(model);
  safetensors::Tensors tensors;
  detail::PeftConfigContents contents;
  contents.adapter_name = name;
  std::set<std::string> adapted; // layers that carry any adapter
  std::set<std::string> with_adapter; // layers that carry this one
  std::map<std::string, bool> matrix_keys; // the A and B keys (true: an A)
  const auto attentions = detail::adapted_attentions(index, name);
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (!layer->adapter_names().empty()) {
      adapted.insert(entry->paths.begin(), entry->paths.end());
    }
    if (!layer->has_adapter(name)) {
      continue;
    }
    const auto& path = entry->paths.front();
    const auto& kind = *detail::kind_of(*entry->module);
    const auto params = entry->module->named_parameters();
    const bool attention_out_proj =
        detail::peft_module_path(path, attentions) != path;
    for (const char* matrix : {"A", "B"}) {
      auto tensor = params[kind.parameter_name(matrix, name)].detach();
      if (attention_out_proj && *matrix == 'B') {
        // peft adds this delta twice (huggingface/peft#3774): half of B
        // makes it behave there as here (out_proj_delta_counts_twice).
        tensor = tensor / 2;
      }
      const auto key = detail::peft_matrix_key(path, kind, matrix, attentions);
      tensors.insert(key, tensor);
      matrix_keys[key] = *matrix == 'A';
    }
    if (layer->adapter_options(name).use_dora()) {
      tensors.insert(
          detail::peft_magnitude_key(path),
          params[detail::magnitude_parameter_name(name)].detach());
    }
    if (!attention_out_proj) {
      contents.layers.emplace_back(path, layer->adapter_options(name));
    } else {
      // An adapted attention's out_proj comes with it, in peft and here,
      // with the attention's options: the file cannot hold others.
      std::string attention;
      companion_kind(path, &attention);
      const auto& own = layer->adapter_options(name);
      for (const auto& [other, other_layer] : index.lora_layers()) {
        if (other->paths.front() != attention) {
          continue;
        }
        const auto& theirs = other_layer->adapter_options(name);
        TORCHLORA_CHECK(
            own.rank() == theirs.rank() && own.alpha() == theirs.alpha() &&
                own.use_rslora() == theirs.use_rslora(),
            "save_adapter: '",
            path,
            "' has adapter \"",
            name,
            "\" with rank ",
            own.rank(),
            ", alpha ",
            own.alpha(),
            ", use_rslora ",
            own.use_rslora(),
            ", but its attention '",
            attention,
            "' has rank ",
            theirs.rank(),
            ", alpha ",
            theirs.alpha(),
            ", use_rslora ",
            theirs.use_rslora(),
            "; peft adapts an attention's out_proj with the attention's "
            "options, so one file cannot hold both. Nothing was written");
      }
    }
    with_adapter.insert(path);
    if (!attention_out_proj) {
      warn_if_out_proj_alone(index, path, name);
    }
    if (layer->scale(name) != 1.0) {
      TORCHLORA_WARN(
          "save_adapter: the run-time scale ",
          layer->scale(name),
          " of '",
          path,
          "' is not saved (peft has no such setting)");
    }
  }
  detail::check_biases_supported(options.bias(), attentions, "save_adapter");
  TORCHLORA_CHECK(
      !contents.layers.empty(),
      "save_adapter: the model has no adapter named \"",
      name,
      "\"");
  for (const auto& [path, tensor] : detail::state_of_modules(
           index, options.modules_to_save(), "save_adapter")) {
    tensors.insert(detail::kPeftPrefix + path, tensor.detach());
  }
  for (const auto& bias :
       detail::biases_of(model, index, options.bias(), adapted, with_adapter)) {
    if (!tensors.contains(kPeftPrefix + bias.key)) {
      tensors.insert(kPeftPrefix + bias.key, bias.tensor.detach());
    }
  }
  warn_about_unsaved_trainables(model, index, tensors);

  // A list entry also matches longer paths that end with "." + entry: where
  // another layer peft could adapt would match so, write a regex instead.
  std::vector<std::string> targets;
  for (const auto& layer : contents.layers) {
    targets.push_back(layer.first);
  }
  for (const auto& entry : index.entries()) {
    const auto& path = entry.paths.front();
    if (detail::kind_of(*entry.module) != nullptr &&
        with_adapter.count(path) == 0 &&
        TargetMatcher::matches_name(path, targets)) {
      contents.list_is_exact = false;
    }
  }
  contents.bias = options.bias();
  contents.modules_to_save = options.modules_to_save();
  if (injected_with != nullptr) {
    contents.as_configured =
        config_if_it_selects(index, *injected_with, name, attentions);
  }
  if (!options.initial_adapter_dir().empty()) {
    const auto initial =
        detail::adapter_files_folder(options.initial_adapter_dir(), name);
    std::error_code ignored;
    TORCHLORA_CHECK(
        std::filesystem::weakly_canonical(initial, ignored) !=
            std::filesystem::weakly_canonical(
                detail::adapter_folder(dir, name), ignored),
        "save_adapter: the initial adapter's folder '",
        initial,
        "' is the folder to write; writing would replace the adapter as it "
        "was initialized. Save the converted adapter elsewhere");
    detail::convert_to_initial_base(tensors, contents, matrix_keys, initial);
  }
  contents.task_type = options.task_type();
  contents.base_model_name_or_path = options.base_model_name_or_path();
  const auto config = detail::config_to_json(contents);

  const auto folder = detail::adapter_folder(dir, name);
  std::error_code error;
  std::filesystem::create_directories(folder, error);
  TORCHLORA_CHECK(
      !error, "cannot create folder '", folder, "': ", error.message());
  safetensors::save(
      (std::filesystem::path(folder) / "adapter_model.safetensors").string(),
      tensors,
      {{"format", "pt"}});
  detail::write_file_atomically(
      (std::filesystem::path(folder) / "adapter_config.json").string(),
      [&](std::ostream& out) { out << config.dump(2) << "\n"; });
}

} // namespace detail

} // namespace torchlora
