#pragma once

#include <torchlora/adapters.h>
#include <torchlora/config.h>
#include <torchlora/detail/atomic_file.h>
#include <torchlora/detail/model_walk.h>
#include <torchlora/detail/peft_config_json.h>
#include <torchlora/detail/text.h>
#include <torchlora/inject.h>
#include <torchlora/layer.h>
#include <torchlora/module_ref.h>
#include <torchlora/parameters.h>
#include <torchlora/safetensors.h>
#include <torchlora/targeting.h>

#include <nlohmann/json.hpp>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
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

/// The peft key prefix of every tensor in an adapter file.
constexpr const char* kPeftPrefix = "base_model.model.";

/// peft's file key of matrix `matrix` ("A" or "B") of the layer at `path`.
inline std::string peft_lora_key(const std::string& path, const char* matrix) {
  return kPeftPrefix + path + ".lora_" + matrix + ".weight";
}

/// A LoRA layer's parameter name of matrix `matrix` of adapter `name`.
inline std::string lora_parameter_name(
    const char* matrix,
    const std::string& name) {
  return std::string("lora_") + matrix + "." + name + ".weight";
}

/// `text` with every regex special character escaped.
inline std::string regex_escape(const std::string& text) {
  std::string escaped;
  for (const char c : text) {
    if (std::strchr(".^$|()[]{}*+?\\", c) != nullptr) {
      escaped += '\\';
    }
    escaped += c;
  }
  return escaped;
}

/// The most frequent value of `values` (the first one on a tie).
template <typename T>
T most_common(const std::vector<T>& values) {
  T best = values.front();
  size_t best_count = 0;
  for (const auto& value : values) {
    const auto count =
        static_cast<size_t>(std::count(values.begin(), values.end(), value));
    if (count > best_count) {
      best = value;
      best_count = count;
    }
  }
  return best;
}

/// The parameters and buffers (as peft saves a module's state dict) of the
/// modules `names` selects (matched like target_modules), by their paths in
/// the model; `paths`, if given, receives the selected modules' paths.
inline std::vector<std::pair<std::string, torch::Tensor>> state_of_modules(
    const ModelIndex& index,
    const std::vector<std::string>& names,
    const char* operation,
    std::vector<std::string>* paths = nullptr) {
  std::vector<std::pair<std::string, torch::Tensor>> state;
  for (const auto& name : names) {
    bool found = false;
    for (const auto& entry : index.entries()) {
      const auto& path = entry.paths.front();
      if (!TargetMatcher::matches_name(path, {name})) {
        continue;
      }
      found = true;
      if (paths != nullptr) {
        paths->push_back(path);
      }
      for (const auto& item : entry.module->named_parameters()) {
        state.emplace_back(path + "." + item.key(), item.value());
      }
      for (const auto& item : entry.module->named_buffers()) {
        state.emplace_back(path + "." + item.key(), item.value());
      }
    }
    TORCH_CHECK(
        found,
        "torchlora: ",
        operation,
        ": modules_to_save entry \"",
        name,
        "\" matches no module of the model");
  }
  return state;
}

/// The key of the bias of the module at `path`: in peft an adapted layer
/// holds its base layer as `base_layer`, so its bias is
/// `<path>.base_layer.bias`.
inline std::string bias_key(const std::string& path, bool adapted) {
  const auto prefix = path.empty() ? std::string() : path + ".";
  return prefix + (adapted ? "base_layer.bias" : "bias");
}

/// A bias to save or load: its key in peft's layout, and for an adapted
/// layer the plain `<path>.bias` key, which load_adapter also accepts.
struct BiasEntry {
  std::string key;
  torch::Tensor tensor;
  std::string plain_key; // empty unless the layer is adapted
};

/// The biases `bias` names: every bias of the model, or those of the
/// layers in `with_adapter`. `adapted` are the paths of layers that carry
/// any adapter (their biases are keyed as peft keys them).
inline std::vector<BiasEntry> biases_of(
    torch::nn::Module& model,
    const ModelIndex& index,
    LoRABias bias,
    const std::set<std::string>& adapted,
    const std::set<std::string>& with_adapter) {
  std::vector<BiasEntry> biases;
  const auto entry_for = [&](const std::string& path,
                             bool is_adapted,
                             const torch::Tensor& tensor) {
    return BiasEntry{
        bias_key(path, is_adapted),
        tensor,
        is_adapted ? bias_key(path, false) : std::string()};
  };
  std::set<const void*> seen;
  if (bias == LoRABias::all) {
    for (const auto& item : model.named_parameters()) {
      const auto& key = item.key();
      if (!is_bias_name(key) ||
          !seen.insert(item.value().unsafeGetTensorImpl()).second) {
        continue;
      }
      const auto path =
          key == "bias" ? std::string() : key.substr(0, key.size() - 5);
      biases.push_back(entry_for(path, adapted.count(path) > 0, item.value()));
    }
  } else if (bias == LoRABias::lora_only) {
    for (const auto& entry : index.entries()) {
      const auto& path = entry.paths.front();
      if (with_adapter.count(path) == 0) {
        continue;
      }
      const auto own = entry.module->named_parameters(/*recurse=*/false);
      const auto* tensor = own.find("bias");
      if (tensor != nullptr && tensor->defined()) {
        biases.push_back(entry_for(path, true, *tensor));
      }
    }
  }
  return biases;
}

inline std::string adapter_folder(
    const std::string& dir,
    const std::string& name) {
  return name == "default" ? dir : (std::filesystem::path(dir) / name).string();
}

/// Warns, naming a few, about the trainable parameters of `model` that are
/// not among `saved` and are not adapter weights (other adapters are saved
/// on their own): training them and then losing them is rarely meant.
inline void warn_about_unsaved_trainables(
    const torch::nn::Module& model,
    const safetensors::Tensors& saved) {
  std::set<const void*> saved_data;
  for (const auto& item : saved) {
    saved_data.insert(item.value().data_ptr());
  }
  std::vector<std::string> unsaved;
  for (const auto& item : model.named_parameters()) {
    const auto& key = item.key();
    const bool adapter_weight = key.rfind("lora_A.", 0) == 0 ||
        key.rfind("lora_B.", 0) == 0 ||
        key.find(".lora_A.") != std::string::npos ||
        key.find(".lora_B.") != std::string::npos;
    if (item.value().requires_grad() && !adapter_weight &&
        saved_data.count(item.value().data_ptr()) == 0) {
      unsaved.push_back(key);
    }
  }
  if (unsaved.empty()) {
    return;
  }
  std::string names;
  for (size_t i = 0; i < unsaved.size() && i < 3; ++i) {
    names += (i ? ", " : "") + unsaved[i];
  }
  if (unsaved.size() > 3) {
    names += ", ...";
  }
  TORCH_WARN(
      "torchlora: save_adapter: ",
      unsaved.size(),
      " trainable parameter(s) are not saved (",
      names,
      "); name their modules in modules_to_save, or pass the LoRAConfig "
      "the model was injected with");
}

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
  std::vector<std::pair<std::string, LoRALayer*>> layers;
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (layer->has_adapter(name)) {
      layers.emplace_back(entry->paths.front(), layer);
    }
  }
  TORCH_CHECK(
      !layers.empty(),
      "torchlora: save_adapter: the model has no adapter named \"",
      name,
      "\"");

  safetensors::Tensors tensors;
  std::vector<int64_t> ranks;
  std::vector<double> alphas;
  std::vector<double> dropouts;
  std::vector<bool> rslora;
  for (const auto& [path, layer] : layers) {
    auto* module = dynamic_cast<torch::nn::Module*>(layer);
    const auto params = module->named_parameters();
    for (const char* matrix : {"A", "B"}) {
      tensors.insert(
          detail::peft_lora_key(path, matrix),
          params[detail::lora_parameter_name(matrix, name)].detach());
    }
    const auto* lora_linear = dynamic_cast<LoRALinearImpl*>(layer);
    TORCH_CHECK(
        lora_linear != nullptr,
        "torchlora: save_adapter: '",
        path,
        "' is a LoRA layer type without peft options");
    const auto& lora = lora_linear->adapter_options(name);
    ranks.push_back(lora.rank());
    alphas.push_back(lora.alpha());
    dropouts.push_back(lora.dropout());
    rslora.push_back(lora.use_rslora());
    if (lora_linear->scale(name) != 1.0) {
      TORCH_WARN(
          "torchlora: save_adapter: the run-time scale ",
          lora_linear->scale(name),
          " of '",
          path,
          "' is not saved (peft has no such setting)");
    }
  }
  TORCH_CHECK(
      std::all_of(
          rslora.begin(),
          rslora.end(),
          [&](bool b) { return b == rslora.front(); }),
      "torchlora: save_adapter: some layers of adapter \"",
      name,
      "\" use rsLoRA and some do not; peft's config holds one use_rslora");
  if (!std::all_of(dropouts.begin(), dropouts.end(), [&](double d) {
        return d == dropouts.front();
      })) {
    TORCH_WARN(
        "torchlora: save_adapter: the layers' dropouts differ; peft's config "
        "holds one lora_dropout, written as ",
        dropouts.front());
  }
  std::vector<std::string> saved_modules;
  for (const auto& [path, tensor] : detail::state_of_modules(
           index, options.modules_to_save(), "save_adapter", &saved_modules)) {
    tensors.insert(detail::kPeftPrefix + path, tensor.detach());
  }
  std::set<std::string> adapted;
  std::set<std::string> with_adapter;
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (!layer->adapter_names().empty()) {
      adapted.insert(entry->paths.begin(), entry->paths.end());
    }
  }
  for (const auto& [path, layer] : layers) {
    with_adapter.insert(path);
  }
  for (const auto& bias :
       detail::biases_of(model, index, options.bias(), adapted, with_adapter)) {
    if (!tensors.contains(detail::kPeftPrefix + bias.key)) {
      tensors.insert(detail::kPeftPrefix + bias.key, bias.tensor.detach());
    }
  }

  detail::warn_about_unsaved_trainables(model, tensors);

  const auto rank = detail::most_common(ranks);
  const auto alpha = detail::most_common(alphas);
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object();
  nlohmann::ordered_json alpha_pattern = nlohmann::ordered_json::object();
  std::vector<std::string> targets;
  std::string targets_regex;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& path = layers[i].first;
    targets.push_back(path);
    targets_regex += (i ? "|" : "") + detail::regex_escape(path);
    // peft matches pattern keys on the path or a dotted suffix of it: the
    // anchor keeps the key to this very path.
    if (ranks[i] != rank) {
      rank_pattern["^" + detail::regex_escape(path)] = ranks[i];
    }
    if (alphas[i] != alpha) {
      alpha_pattern["^" + detail::regex_escape(path)] = alphas[i];
    }
  }
  // A list entry also matches longer paths that end with "." + entry: where
  // another Linear layer would match so, write a full-match regex instead.
  bool list_is_exact = true;
  for (const auto& entry : index.entries()) {
    const auto& path = entry.paths.front();
    if (detail::is_linear_like(*entry.module) &&
        with_adapter.count(path) == 0 &&
        TargetMatcher::matches_name(path, targets)) {
      list_is_exact = false;
    }
  }
  auto null_if_empty = [](const std::string& text) {
    return text.empty() ? nlohmann::ordered_json()
                        : nlohmann::ordered_json(text);
  };
  nlohmann::ordered_json config = {
      {"peft_type", "LORA"},
      {"task_type", null_if_empty(options.task_type())},
      {"base_model_name_or_path",
       null_if_empty(options.base_model_name_or_path())},
      {"revision", nullptr},
      {"inference_mode", true},
      {"r", rank},
      {"lora_alpha", alpha},
      {"lora_dropout", dropouts.front()},
      {"target_modules",
       list_is_exact ? nlohmann::ordered_json(targets)
                     : nlohmann::ordered_json(targets_regex)},
      {"exclude_modules", nullptr},
      {"bias", to_string(options.bias())},
      {"use_rslora", static_cast<bool>(rslora.front())},
      {"init_lora_weights", true},
      {"modules_to_save",
       saved_modules.empty() ? nlohmann::ordered_json()
                             : nlohmann::ordered_json(saved_modules)},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"layers_to_transform", nullptr},
      {"layers_pattern", nullptr},
      {"fan_in_fan_out", false},
      {"use_dora", false}};

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
/// `adapter_model.safetensors` in `dir`, or in `dir/<adapter_name>`) into
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
  auto folder = dir;
  if (!fs::exists(fs::path(folder) / "adapter_config.json") &&
      adapter_name != "default" &&
      fs::exists(fs::path(dir) / adapter_name / "adapter_config.json")) {
    folder = (fs::path(dir) / adapter_name).string();
  }
  const auto config_path = (fs::path(folder) / "adapter_config.json").string();
  TORCH_CHECK(
      fs::exists(config_path),
      "torchlora: load_adapter: no adapter_config.json in '",
      dir,
      "'");
  const auto config = detail::read_peft_config(config_path, adapter_name);
  // Loading into a merged layer would leave its merged weight stale.
  detail::check_not_merged(detail::ModelIndex(model), "", "load_adapter");
  const auto tensors = safetensors::load(
      (fs::path(folder) / "adapter_model.safetensors").string());

  // What the file must hold, by key, before anything changes.
  const detail::ModelIndex index(model);
  std::map<std::string, detail::ExpectedTensor> expected;
  std::set<std::string> adapted; // layers that will carry any adapter
  std::set<std::string> with_adapter; // layers that will carry this one
  bool inject = true;
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (!layer->adapter_names().empty()) {
      adapted.insert(entry->paths.begin(), entry->paths.end());
    }
    if (!layer->has_adapter(adapter_name)) {
      continue;
    }
    inject = false;
    with_adapter.insert(entry->paths.front());
    const auto params = entry->module->named_parameters();
    for (const char* matrix : {"A", "B"}) {
      const auto tensor =
          params[detail::lora_parameter_name(matrix, adapter_name)];
      expected[detail::peft_lora_key(entry->paths.front(), matrix)] =
          detail::ExpectedTensor{tensor, tensor.sizes().vec()};
    }
  }
  if (inject) {
    const TargetMatcher matcher(config);
    for (const auto& planned : detail::plan_injection(index, matcher)) {
      const auto& path = planned.entry->paths.front();
      adapted.insert(planned.entry->paths.begin(), planned.entry->paths.end());
      with_adapter.insert(path);
      const auto own =
          planned.entry->module->named_parameters(/*recurse=*/false);
      const auto weight = own["weight"];
      const int64_t rank = planned.options.rank();
      expected[detail::peft_lora_key(path, "A")] =
          detail::ExpectedTensor{torch::Tensor(), {rank, weight.size(1)}};
      expected[detail::peft_lora_key(path, "B")] =
          detail::ExpectedTensor{torch::Tensor(), {weight.size(0), rank}};
    }
  }
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
      const auto params = entry->module->named_parameters();
      for (const char* matrix : {"A", "B"}) {
        expected[detail::peft_lora_key(entry->paths.front(), matrix)].target =
            params[detail::lora_parameter_name(matrix, adapter_name)];
      }
    }
  }
  torch::NoGradGuard no_grad;
  for (const auto& [key, want] : expected) {
    want.target.copy_(tensors[want.file_key]);
  }
}

} // namespace torchlora
