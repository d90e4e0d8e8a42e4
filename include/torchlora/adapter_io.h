#pragma once

#include <torchlora/adapters.h>
#include <torchlora/config.h>
#include <torchlora/detail/atomic_file.h>
#include <torchlora/detail/layer_kinds.h>
#include <torchlora/detail/model_walk.h>
#include <torchlora/detail/peft_config_json.h>
#include <torchlora/detail/peft_layout.h>
#include <torchlora/inject.h>
#include <torchlora/layer.h>
#include <torchlora/module_ref.h>
#include <torchlora/parameters.h>
#include <torchlora/safetensors.h>
#include <torchlora/targeting.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>

#include <filesystem>
#include <map>
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
};

namespace detail {

/// A tensor the adapter file must hold: where it goes and its shape.
struct ExpectedTensor {
  torch::Tensor target; // undefined until the adapter exists
  std::vector<int64_t> shape;
  /// Another key the file may use for it; empty if none.
  std::string alternate = "";
  /// The key found in the file.
  std::string file_key = "";
};

} // namespace detail

/// Saves adapter `options.adapter_name()` of `model` in peft's format:
/// `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`
/// and `...lora_B.weight`, tensors in their dtype, metadata
/// `{"format": "pt"}`) and `adapter_config.json`, in `dir` (in `dir/<name>`
/// for a name other than "default"). `target_modules` is written as the list
/// of adapted paths (or, where another layer's path ends with one of them,
/// as a full-match regex of them), so peft adapts exactly the same layers;
/// ranks and alphas that differ from the most common ones go into
/// `rank_pattern` and `alpha_pattern`, anchored to their paths.
/// `modules_to_save` are saved whole (parameters and buffers) under their
/// plain keys, biases under peft's keys (`<path>.base_layer.bias` for an
/// adapted layer). Run-time scales (`set_scale`) are not saved. Trainable
/// parameters that the file would leave out (a module trained in full but
/// not named in `modules_to_save`, say) are named in a warning: pass the
/// `LoRAConfig` the model was injected with to save what it trains.
///
/// Example:
/// ```
/// torchlora::save_adapter(*model, "out/adapter");
/// ```
inline void save_adapter(
    ModuleRef model_ref,
    const std::string& dir,
    const SaveAdapterOptions& options = {}) {
  auto& model = model_ref.get();
  const auto& name = options.adapter_name();
  const detail::ModelIndex index(model);
  safetensors::Tensors tensors;
  detail::PeftConfigContents contents;
  contents.adapter_name = name;
  std::set<std::string> adapted; // layers that carry any adapter
  std::set<std::string> with_adapter; // layers that carry this one
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
    for (const char* matrix : {"A", "B"}) {
      tensors.insert(
          detail::peft_matrix_key(path, kind, matrix, attentions),
          params[kind.parameter_name(matrix, name)].detach());
    }
    if (detail::peft_module_path(path, attentions) == path) {
      contents.layers.emplace_back(path, layer->adapter_options(name));
    } else {
      // An adapted attention's out_proj comes with it, in peft and here,
      // with the attention's options: the file cannot hold others.
      const auto attention = path.substr(0, path.size() - 9); // ".out_proj"
      const auto& own = layer->adapter_options(name);
      for (const auto& [other, other_layer] : index.lora_layers()) {
        if (other->paths.front() != attention) {
          continue;
        }
        const auto& theirs = other_layer->adapter_options(name);
        TORCH_CHECK(
            own.rank() == theirs.rank() && own.alpha() == theirs.alpha() &&
                own.use_rslora() == theirs.use_rslora(),
            "torchlora: save_adapter: '",
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
    if (layer->scale(name) != 1.0) {
      TORCH_WARN(
          "torchlora: save_adapter: the run-time scale ",
          layer->scale(name),
          " of '",
          path,
          "' is not saved (peft has no such setting)");
    }
  }
  detail::check_biases_supported(options.bias(), attentions, "save_adapter");
  TORCH_CHECK(
      !contents.layers.empty(),
      "torchlora: save_adapter: the model has no adapter named \"",
      name,
      "\"");
  for (const auto& [path, tensor] : detail::state_of_modules(
           index,
           options.modules_to_save(),
           "save_adapter",
           &contents.modules_to_save)) {
    tensors.insert(detail::kPeftPrefix + path, tensor.detach());
  }
  for (const auto& bias :
       detail::biases_of(model, index, options.bias(), adapted, with_adapter)) {
    if (!tensors.contains(detail::kPeftPrefix + bias.key)) {
      tensors.insert(detail::kPeftPrefix + bias.key, bias.tensor.detach());
    }
  }
  detail::warn_about_unsaved_trainables(model, index, tensors);

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
  contents.task_type = options.task_type();
  contents.base_model_name_or_path = options.base_model_name_or_path();
  const auto config = detail::config_to_json(contents);

  const auto folder = detail::adapter_folder(dir, name);
  std::error_code error;
  std::filesystem::create_directories(folder, error);
  TORCH_CHECK(
      !error,
      "torchlora: cannot create folder '",
      folder,
      "': ",
      error.message());
  safetensors::save(
      (std::filesystem::path(folder) / "adapter_model.safetensors").string(),
      tensors,
      {{"format", "pt"}});
  detail::write_file_atomically(
      (std::filesystem::path(folder) / "adapter_config.json").string(),
      [&](std::ostream& out) { out << config.dump(2) << "\n"; });
}

/// `save_adapter` with the adapter name, `modules_to_save` and bias mode of
/// the config the adapter was injected with.
inline void save_adapter(
    ModuleRef model,
    const std::string& dir,
    const LoRAConfig& config) {
  save_adapter(
      model,
      dir,
      SaveAdapterOptions()
          .adapter_name(config.adapter_name())
          .modules_to_save(config.modules_to_save())
          .bias(config.bias()));
}

/// Loads a peft LoRA adapter (`adapter_config.json` and
/// `adapter_model.safetensors` in `dir/<adapter_name>` where that folder has
/// them, as `save_adapter` writes a named adapter, else in `dir`) into
/// `model` as adapter `adapter_name`. Where the model has no such adapter
/// yet, it is injected first as the config says; then every tensor is
/// copied in, converted to the layer's adapter dtype. Every key of the file
/// must land on a module of the right shape and every expected key must be
/// in the file: otherwise an error names the key and both shapes, and the
/// model is unchanged. Configs of another `peft_type`, or that use a peft
/// feature torchlora does not implement (DoRA, fan_in_fan_out, an init that
/// changes the base weights, ...), are refused by name. The loaded adapter
/// is trainable (`inference_mode` is not applied; call
/// `torchlora::set_adapter` or freeze it to serve).
///
/// Example:
/// ```
/// torchlora::load_adapter(*model, "out/adapter");
/// ```
inline void load_adapter(
    ModuleRef model_ref,
    const std::string& dir,
    const std::string& adapter_name = "default") {
  namespace fs = std::filesystem;
  auto& model = model_ref.get();
  // Where save_adapter puts a named adapter: dir/<name> first (dir itself
  // may hold the default adapter's files next to it).
  auto folder = dir;
  const auto named = detail::adapter_folder(dir, adapter_name);
  if (adapter_name != "default" &&
      fs::exists(fs::path(named) / "adapter_config.json")) {
    folder = named;
  }
  const auto config_path = (fs::path(folder) / "adapter_config.json").string();
  TORCH_CHECK(
      fs::exists(config_path),
      "torchlora: load_adapter: no adapter_config.json in '",
      dir,
      "'");
  const auto config = detail::read_peft_config(config_path, adapter_name);
  // Loading into a merged layer would leave its merged weight stale.
  {
    const detail::ModelIndex index(model);
    detail::check_not_merged(index, "", "load_adapter");
    detail::check_no_forward_running(index, "load_adapter");
    detail::check_not_routed(index, "load_adapter");
  }
  const auto tensors = safetensors::load(
      (fs::path(folder) / "adapter_model.safetensors").string());

  // What the file must hold, by key, before anything changes.
  const detail::ModelIndex index(model);
  std::map<std::string, detail::ExpectedTensor> expected;
  std::set<std::string> adapted; // layers that will carry any adapter
  std::set<std::string> with_adapter; // layers that will carry this one
  bool inject = true;
  const TargetMatcher matcher(config);
  auto attentions = detail::adapted_attentions(index, adapter_name);
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (!layer->adapter_names().empty()) {
      adapted.insert(entry->paths.begin(), entry->paths.end());
    }
    if (!layer->has_adapter(adapter_name)) {
      continue;
    }
    inject = false;
    with_adapter.insert(entry->paths.front());
    // Only tensors are copied into an existing adapter: its scaling must
    // already be the file's.
    const auto& have = layer->adapter_options(adapter_name);
    const auto want = matcher.options_for(entry->paths.front());
    TORCH_CHECK(
        !matcher.is_target(entry->paths.front()) ||
            (have.alpha() == want.alpha() &&
             have.use_rslora() == want.use_rslora()),
        "torchlora: load_adapter: '",
        entry->paths.front(),
        "' already has adapter \"",
        adapter_name,
        "\" with alpha = ",
        have.alpha(),
        ", use_rslora = ",
        have.use_rslora(),
        ", but the file's config gives it alpha = ",
        want.alpha(),
        ", use_rslora = ",
        want.use_rslora(),
        "; delete_adapter first, or load under another name");
    const auto& kind = *detail::kind_of(*entry->module);
    const auto params = entry->module->named_parameters();
    for (const char* matrix : {"A", "B"}) {
      const auto tensor = params[kind.parameter_name(matrix, adapter_name)];
      const auto& path = entry->paths.front();
      expected[detail::peft_matrix_key(path, kind, matrix, attentions)] =
          detail::ExpectedTensor{
              tensor,
              tensor.sizes().vec(),
              detail::plain_matrix_key(path, kind, matrix, attentions)};
    }
  }
  if (inject) {
    const auto plan = detail::plan_injection(index, matcher);
    for (const auto& planned : plan) {
      // A MultiheadAttention, plain or a LoRA layer without this adapter.
      if (planned.kind->plain_name ==
          std::string("torch::nn::MultiheadAttention")) {
        attentions.insert(planned.entry->paths.front());
      }
    }
    for (const auto& planned : plan) {
      const auto& path = planned.entry->paths.front();
      adapted.insert(planned.entry->paths.begin(), planned.entry->paths.end());
      with_adapter.insert(path);
      const auto shapes =
          planned.kind->shapes(*planned.entry->module, planned.options.rank());
      for (const char* matrix : {"A", "B"}) {
        expected[detail::peft_matrix_key(
            path, *planned.kind, matrix, attentions)] = detail::ExpectedTensor{
            torch::Tensor(),
            *matrix == 'A' ? shapes.A : shapes.B,
            detail::plain_matrix_key(path, *planned.kind, matrix, attentions)};
      }
    }
  }
  detail::check_biases_supported(config.bias(), attentions, "load_adapter");
  for (const auto& [key, tensor] : detail::state_of_modules(
           index, config.modules_to_save(), "load_adapter")) {
    expected[detail::kPeftPrefix + key] =
        detail::ExpectedTensor{tensor, tensor.sizes().vec()};
  }
  for (const auto& bias :
       detail::biases_of(model, index, config.bias(), adapted, with_adapter)) {
    // An adapted layer's bias may also come as `<path>.bias`.
    expected[detail::kPeftPrefix + bias.key] = detail::ExpectedTensor{
        bias.tensor,
        bias.tensor.sizes().vec(),
        bias.plain_key.empty() ? std::string()
                               : detail::kPeftPrefix + bias.plain_key};
  }
  std::set<std::string> known;
  for (auto& [key, want] : expected) {
    const auto* found = tensors.find(key);
    if (found == nullptr && !want.alternate.empty()) {
      found = tensors.find(want.alternate);
      want.file_key = want.alternate;
    } else {
      want.file_key = key;
    }
    known.insert(key);
    known.insert(want.alternate);
    TORCH_CHECK(
        found != nullptr,
        "torchlora: load_adapter: the file has no tensor \"",
        key,
        "\" (the model needs one of shape ",
        c10::IntArrayRef(want.shape),
        ")");
    TORCH_CHECK(
        found->sizes().vec() == want.shape,
        "torchlora: load_adapter: tensor \"",
        want.file_key,
        "\" has shape ",
        found->sizes(),
        " in the file, but the model needs ",
        c10::IntArrayRef(want.shape));
    TORCH_CHECK(
        found->is_floating_point() ||
            (want.target.defined() && !want.target.is_floating_point()),
        "torchlora: load_adapter: tensor \"",
        want.file_key,
        "\" has dtype ",
        found->scalar_type(),
        "; a floating-point tensor is needed");
  }
  for (const auto& item : tensors) {
    TORCH_CHECK(
        known.count(item.key()) > 0,
        "torchlora: load_adapter: the file's tensor \"",
        item.key(),
        "\" (shape ",
        item.value().sizes(),
        ") matches nothing in the model: no adapted module, module to save "
        "or bias has that key");
  }

  if (inject) {
    inject_lora(model, config);
    const detail::ModelIndex adapted(model);
    for (const auto& [entry, layer] : adapted.lora_layers()) {
      if (!layer->has_adapter(adapter_name)) {
        continue;
      }
      const auto& kind = *detail::kind_of(*entry->module);
      const auto params = entry->module->named_parameters();
      for (const char* matrix : {"A", "B"}) {
        expected[detail::peft_matrix_key(
                     entry->paths.front(), kind, matrix, attentions)]
            .target = params[kind.parameter_name(matrix, adapter_name)];
      }
    }
  }
  torch::NoGradGuard no_grad;
  for (const auto& [key, want] : expected) {
    want.target.copy_(tensors[want.file_key]);
  }
}

} // namespace torchlora
