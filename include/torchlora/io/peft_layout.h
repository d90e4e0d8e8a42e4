#pragma once

// What a peft adapter file holds besides the LoRA matrices, and under which
// keys: the `base_model.model.` prefix, the matrices' keys of each layer
// kind, `modules_to_save`, biases in peft's `base_layer` layout, and a
// warning about trainable parameters a file would leave out. Not part of the
// API.

#include <torchlora/detail/check.h>
#include <torchlora/kinds/layer_kinds.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/parameters.h>
#include <torchlora/safetensors.h>
#include <torchlora/targeting.h>

#include <torch/nn/module.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace detail {

/// The peft key prefix of every tensor in an adapter file.
constexpr const char* kPeftPrefix = "base_model.model.";

/// peft's file key of matrix `matrix` ("A" or "B") of the `kind` layer at
/// `path`: `base_model.model.<path>.lora_A.weight`, or
/// `...<path>.lora_embedding_A` for an Embedding.
inline std::string peft_matrix_key(
    const std::string& path,
    const LayerKind& kind,
    const char* matrix) {
  return kPeftPrefix + child_path(path, kind.file_suffix(matrix));
}

/// The in-memory name of adapter `adapter`'s DoRA magnitude.
inline std::string magnitude_parameter_name(const std::string& adapter) {
  return "lora_magnitude_vector." + adapter + ".weight";
}

/// peft's file key of the DoRA magnitude of the layer at `path`:
/// `base_model.model.<path>.lora_magnitude_vector` (no adapter name, no
/// `.weight`).
inline std::string peft_magnitude_key(const std::string& path) {
  return kPeftPrefix + child_path(path, "lora_magnitude_vector");
}

/// The shape of a DoRA magnitude on `layer` (plain or LoRA) of `kind`, as
/// peft holds it: `[out]` (Linear), `[embedding_dim]` (Embedding), `[1, out,
/// 1, ...]` (convolutions).
inline std::vector<int64_t> magnitude_shape(
    const torch::nn::Module& layer,
    const LayerKind& kind) {
  const auto weight = layer.named_parameters(/*recurse=*/false)["weight"];
  if (weight.dim() == 2) {
    return {weight.size(kind.matrix_has_weight ? 0 : 1)};
  }
  std::vector<int64_t> shape(static_cast<size_t>(weight.dim()), 1);
  shape[1] = weight.size(0);
  return shape;
}

/// Refuses a model that is itself a LoRA layer: adapter files name each
/// layer by its path in a model, and the model's own layer has none.
inline void check_not_a_lone_layer(
    const torch::nn::Module& model,
    const char* operation) {
  TORCHLORA_CHECK(
      dynamic_cast<const LoRALayer*>(&model) == nullptr,
      operation,
      ": the model is itself a ",
      model.name(),
      "; adapter files hold the layers of a model by their paths, and this "
      "layer has none. Register it in a module (register_module(\"layer\", "
      "...)) and pass that module." TORCHLORA_NOTHING_CHANGED);
}

/// The paths of the model's MultiheadAttention layers that carry adapter
/// `name`: peft holds each as `base_layer` of its LoRA layer, the
/// attention's `out_proj` (and that adapter on it) inside.
inline std::set<std::string> adapted_attentions(
    const ModelIndex& index,
    const std::string& name) {
  std::set<std::string> paths;
  for (const auto& [entry, layer] : index.lora_layers()) {
    const auto* kind = kind_of(*entry->module);
    if (kind != nullptr && kind->companion != nullptr &&
        layer->has_adapter(name)) {
      paths.insert(entry->paths.front());
    }
  }
  return paths;
}

/// The path peft gives the module at `path`: the `out_proj` of an adapted
/// attention (one of `attentions`) sits inside its `base_layer`, so
/// `<attention>.out_proj` is `<attention>.base_layer.out_proj` there.
inline std::string peft_module_path(
    const std::string& path,
    const std::set<std::string>& attentions) {
  std::string parent;
  const auto* kind = companion_kind(path, &parent);
  if (kind != nullptr && attentions.count(parent) > 0) {
    return child_path(child_path(parent, "base_layer"), kind->companion);
  }
  return path;
}

/// `peft_matrix_key` of the module at `path`, in peft's layout.
inline std::string peft_matrix_key(
    const std::string& path,
    const LayerKind& kind,
    const char* matrix,
    const std::set<std::string>& attentions) {
  return peft_matrix_key(peft_module_path(path, attentions), kind, matrix);
}

/// Refuses saving or loading biases (`bias` other than "none") of a model
/// with adapted attention layers: their biases (`in_proj_bias`, and
/// `out_proj`'s inside peft's `base_layer`) have keys of their own in peft
/// that torchlora does not write.
inline void check_biases_supported(
    LoRABias bias,
    const std::set<std::string>& attentions,
    const char* operation) {
  TORCHLORA_CHECK(
      bias == LoRABias::none || attentions.empty(),
      operation,
      ": bias = \"",
      to_string(bias),
      "\" is not supported with adapted MultiheadAttention layers (here '",
      attentions.empty() ? std::string() : *attentions.begin(),
      "'); use bias \"none\" for such models");
}

/// The key of the module at `path` as torchlora names it, where it differs
/// from peft's (the `out_proj` of an adapted attention): load_adapter takes
/// either. Empty where they are the same.
inline std::string plain_matrix_key(
    const std::string& path,
    const LayerKind& kind,
    const char* matrix,
    const std::set<std::string>& attentions) {
  const auto peft = peft_matrix_key(path, kind, matrix, attentions);
  const auto plain = peft_matrix_key(path, kind, matrix);
  return peft == plain ? std::string() : plain;
}

/// The folder of adapter `name` under `dir`: `dir` itself for "default", as
/// peft's `save_pretrained` does.
inline std::string adapter_folder(
    const std::string& dir,
    const std::string& name) {
  TORCHLORA_CHECK(
      !name.empty() && name != "." && name != ".." &&
          name.find_first_of("/\\") == std::string::npos,
      "adapter name \"",
      name,
      "\" cannot name a folder of adapter files (it is empty, \".\" or "
      "\"..\", or holds '/' or '\\')");
  return name == "default" ? dir : (std::filesystem::path(dir) / name).string();
}

/// The folder of adapter `adapter_name` under `dir`: `dir/<name>` where it
/// holds an adapter_config.json (as save_adapter writes a named adapter),
/// else `dir`.
inline std::string adapter_files_folder(
    const std::string& dir,
    const std::string& adapter_name) {
  namespace fs = std::filesystem;
  const auto named = adapter_folder(dir, adapter_name);
  if (adapter_name != "default" &&
      fs::exists(fs::path(named) / "adapter_config.json")) {
    return named;
  }
  return dir;
}

/// The parameters and buffers (as peft saves a module's state dict) of the
/// modules `names` selects (peft's rule: the path ends with a name), by
/// their paths in the model; `paths`, if given, receives the selected
/// modules' paths. A module inside another selected one comes with it.
inline std::vector<std::pair<std::string, torch::Tensor>> state_of_modules(
    const ModelIndex& index,
    const std::vector<std::string>& names,
    const char* operation,
    std::vector<std::string>* paths = nullptr) {
  for (const auto& name : names) {
    const bool found = std::any_of(
        index.entries().begin(), index.entries().end(), [&](const auto& e) {
          return TargetMatcher::is_named_to_save(e.paths.front(), {name});
        });
    TORCHLORA_CHECK(
        found,
        operation,
        ": modules_to_save entry \"",
        name,
        "\" matches no module of the model");
  }
  std::vector<std::pair<std::string, torch::Tensor>> state;
  std::vector<std::string> selected;
  for (const auto& entry : index.entries()) {
    const auto& path = entry.paths.front();
    const bool inside = std::any_of(
        selected.begin(), selected.end(), [&](const std::string& outer) {
          return path.compare(0, outer.size() + 1, outer + ".") == 0;
        });
    if (inside || !TargetMatcher::is_named_to_save(path, names)) {
      continue;
    }
    selected.push_back(path);
    for (const auto& item : entry.module->named_parameters()) {
      // Parameters of integer dtype are a quantized layer's codes.
      TORCHLORA_CHECK(
          item.value().is_floating_point(),
          operation,
          ": modules_to_save takes in '",
          path + "." + item.key(),
          "', the codes of a quantized layer (",
          c10::toString(item.value().scalar_type()),
          "), which cannot be trained or saved as a trained module; leave "
          "the quantized layer out of modules_to_save." TORCHLORA_NOTHING_CHANGED);
      state.emplace_back(path + "." + item.key(), item.value());
    }
    for (const auto& item : entry.module->named_buffers()) {
      state.emplace_back(path + "." + item.key(), item.value());
    }
  }
  if (paths != nullptr) {
    *paths = selected;
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

/// Warns, naming a few, about the trainable parameters of `model` that are
/// not among `saved` and are not adapter weights (other adapters are saved
/// on their own): training them and then losing them is rarely meant.
inline void warn_about_unsaved_trainables(
    const torch::nn::Module& model,
    const ModelIndex& index,
    const safetensors::Tensors& saved) {
  std::set<const void*> saved_data;
  for (const auto& item : saved) {
    saved_data.insert(item.value().data_ptr());
  }
  std::set<const void*> adapter_data;
  for (const auto& [entry, layer] : index.lora_layers()) {
    for (const auto& tensor : layer->adapter_parameters()) {
      adapter_data.insert(tensor.data_ptr());
    }
  }
  std::vector<std::string> unsaved;
  for (const auto& item : model.named_parameters()) {
    const auto* data = item.value().data_ptr();
    if (item.value().requires_grad() && adapter_data.count(data) == 0 &&
        saved_data.count(data) == 0) {
      unsaved.push_back(item.key());
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
  TORCHLORA_WARN(
      "save_adapter: ",
      unsaved.size(),
      " trainable parameter(s) are not saved (",
      names,
      "); name their modules in modules_to_save, or pass the LoRAConfig "
      "the model was injected with");
}

} // namespace detail
} // namespace torchlora
