#pragma once

// load_adapter: peft's adapter files read into a model, injecting the
// adapter first where the model lacks it.

#include <torchlora/adapters.h>
#include <torchlora/config.h>
#include <torchlora/detail/atomic_file.h>
#include <torchlora/detail/check.h>
#include <torchlora/inject.h>
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

namespace detail {

/// A tensor the adapter file must hold: where it goes and its shape.
struct ExpectedTensor {
  torch::Tensor target; // undefined until the adapter exists
  std::vector<int64_t> shape;
  /// Another key the file may use for it; empty if none.
  std::string alternate = "";
  /// The key found in the file; empty for an optional tensor it lacks.
  std::string file_key = "";
  /// The file may lack it (a bias peft's save leaves out).
  bool optional = false;
  /// Multiplies the file's tensor: 2 for the B of an attention's out_proj
  /// in a file whose out_proj deltas count twice.
  double factor = 1.0;
};

/// What load_adapter needs of the file before it changes anything: each
/// tensor by key, the base's own copies a file may also hold, and the
/// injection to make (empty when the model has the adapter already).
struct AdapterLoad {
  std::map<std::string, ExpectedTensor> expected;
  std::map<std::string, std::vector<int64_t>> base_copies;
  std::vector<PlannedLayer> injection;
  /// The attentions that carry the adapter (or will): their companions
  /// have peft's `base_layer` paths.
  std::set<std::string> attentions;
};

/// Plans what the file must hold for adapter `name`: the A and B of every
/// layer that has it, or else of every layer the config's injection will
/// give it; records the layers that carry any adapter (`adapted`) and this
/// one (`with_adapter`).
inline void expect_adapter_matrices(
    const ModelIndex& index,
    const PeftFileConfig& file_config,
    const std::string& name,
    AdapterLoad& load,
    std::set<std::string>& adapted,
    std::set<std::string>& with_adapter) {
  const TargetMatcher matcher(file_config.config);
  load.attentions = adapted_attentions(index, name);
  // `attentions` grows below, before any attention's companion is seen.
  const auto expect = [&](const std::string& path,
                          const LayerKind& kind,
                          const char* matrix,
                          torch::Tensor target,
                          std::vector<int64_t> shape) {
    auto& want =
        load.expected[peft_matrix_key(path, kind, matrix, load.attentions)];
    want = ExpectedTensor{
        std::move(target),
        std::move(shape),
        plain_matrix_key(path, kind, matrix, load.attentions)};
    want.factor = file_config.out_proj_twice && *matrix == 'B' &&
            peft_module_path(path, load.attentions) != path
        ? 2.0
        : 1.0;
  };
  bool inject = true;
  for (const auto& [entry, layer] : index.lora_layers()) {
    if (!layer->adapter_names().empty()) {
      adapted.insert(entry->paths.begin(), entry->paths.end());
    }
    if (!layer->has_adapter(name)) {
      continue;
    }
    inject = false;
    const auto& path = entry->paths.front();
    with_adapter.insert(path);
    // Only tensors are copied into an existing adapter: its scaling must
    // already be the file's.
    const auto& have = layer->adapter_options(name);
    const auto want = matcher.options_for(path);
    TORCHLORA_CHECK(
        !matcher.is_target(path) || have.use_dora() == want.use_dora(),
        "load_adapter: '",
        path,
        "' already has adapter \"",
        name,
        "\" with use_dora = ",
        have.use_dora() ? "true" : "false",
        ", but the file's config says use_dora = ",
        want.use_dora() ? "true" : "false",
        "; delete_adapter first, or load under another name");
    TORCHLORA_CHECK(
        !matcher.is_target(path) ||
            (have.alpha() == want.alpha() &&
             have.use_rslora() == want.use_rslora()),
        "load_adapter: '",
        path,
        "' already has adapter \"",
        name,
        "\" with alpha = ",
        have.alpha(),
        ", use_rslora = ",
        have.use_rslora(),
        ", but the file's config gives it alpha = ",
        want.alpha(),
        ", use_rslora = ",
        want.use_rslora(),
        "; delete_adapter first, or load under another name");
    const auto& kind = *kind_of(*entry->module);
    const auto params = entry->module->named_parameters();
    for (const char* matrix : {"A", "B"}) {
      const auto tensor = params[kind.parameter_name(matrix, name)];
      expect(path, kind, matrix, tensor, tensor.sizes().vec());
    }
    if (have.use_dora()) {
      const auto magnitude = params[magnitude_parameter_name(name)];
      load.expected[peft_magnitude_key(path)] =
          ExpectedTensor{magnitude, magnitude.sizes().vec()};
    }
  }
  if (!inject) {
    return;
  }
  check_adapters_enabled(index, "load_adapter");
  load.injection = plan_injection(index, matcher);
  for (const auto& planned : load.injection) {
    // A layer with a companion, plain or a LoRA layer without this adapter.
    if (planned.kind->companion != nullptr) {
      load.attentions.insert(planned.entry->paths.front());
    }
  }
  for (const auto& planned : load.injection) {
    const auto& path = planned.entry->paths.front();
    adapted.insert(planned.entry->paths.begin(), planned.entry->paths.end());
    with_adapter.insert(path);
    const auto shapes =
        planned.kind->shapes(*planned.entry->module, planned.options.rank());
    for (const char* matrix : {"A", "B"}) {
      expect(
          path,
          *planned.kind,
          matrix,
          torch::Tensor(),
          *matrix == 'A' ? shapes.A : shapes.B);
    }
    if (planned.options.use_dora()) {
      load.expected[peft_magnitude_key(path)] = ExpectedTensor{
          torch::Tensor(),
          magnitude_shape(*planned.entry->module, *planned.kind)};
    }
  }
}

/// Plans the tensors of the modules to save and the biases the file may
/// hold (peft's `lora_only` files hold no biases: they are optional then).
inline void expect_modules_and_biases(
    torch::nn::Module& model,
    const ModelIndex& index,
    const LoRAConfig& config,
    AdapterLoad& load,
    const std::set<std::string>& adapted,
    const std::set<std::string>& with_adapter) {
  // torchlora cannot place peft's attention bias keys.
  if (config.bias() != LoRABias::lora_only) {
    check_biases_supported(config.bias(), load.attentions, "load_adapter");
  }
  // peft's file may also hold a module to save's tensors under
  // `<module>.modules_to_save.<name>` (the trained copy, as an alternate
  // key) and `<module>.original_module.<name>` (the base's copy, which the
  // model has already): with bias="all" its biases come so.
  std::vector<std::string> module_paths;
  const auto module_state = state_of_modules(
      index, config.modules_to_save(), "load_adapter", &module_paths);
  for (const auto& [key, tensor] : module_state) {
    auto& want = load.expected[kPeftPrefix + key];
    want = ExpectedTensor{tensor, tensor.sizes().vec()};
    for (const auto& path : module_paths) {
      if (key.size() > path.size() && key.compare(0, path.size(), path) == 0 &&
          key[path.size()] == '.') {
        const auto rest = key.substr(path.size());
        want.alternate = kPeftPrefix + path + ".modules_to_save" + rest;
        load.base_copies[kPeftPrefix + path + ".original_module" + rest] =
            tensor.sizes().vec();
        break;
      }
    }
  }
  for (const auto& bias :
       biases_of(model, index, config.bias(), adapted, with_adapter)) {
    // An adapted layer's bias may also come as `<path>.bias`.
    auto& want = load.expected[kPeftPrefix + bias.key];
    if (want.target.defined()) {
      continue; // the bias of a module to save, expected already
    }
    want = ExpectedTensor{
        bias.tensor,
        bias.tensor.sizes().vec(),
        bias.plain_key.empty() ? std::string() : kPeftPrefix + bias.plain_key};
    // peft's save_pretrained leaves these out with bias="lora_only".
    want.optional = config.bias() == LoRABias::lora_only;
  }
}

/// Checks every tensor of `tensors` against `load` (each expected key there
/// with its shape and a floating-point dtype, nothing unknown) and records
/// the key each expected tensor comes from; returns the optional biases the
/// file lacks.
inline std::vector<std::string> check_file_tensors(
    const safetensors::Tensors& tensors,
    AdapterLoad& load) {
  auto& expected = load.expected;
  const auto& base_copies = load.base_copies;
  std::set<std::string> known;
  std::vector<std::string> biases_kept; // optional biases the file lacks
  for (auto& [key, want] : expected) {
    const auto* found = tensors.find(key);
    const auto* alternate =
        want.alternate.empty() ? nullptr : tensors.find(want.alternate);
    if (found == nullptr && alternate != nullptr) {
      found = alternate;
      want.file_key = want.alternate;
    } else {
      want.file_key = key;
    }
    known.insert(key);
    if (!want.alternate.empty()) {
      known.insert(want.alternate);
    }
    if (found == nullptr && want.optional) {
      want.file_key.clear();
      biases_kept.push_back(key.substr(std::strlen(kPeftPrefix)));
      continue;
    }
    TORCHLORA_CHECK(
        found != nullptr,
        "load_adapter: the file has no tensor \"",
        key,
        "\" (the model needs one of shape ",
        c10::IntArrayRef(want.shape),
        ")");
    TORCHLORA_CHECK(
        found->sizes().vec() == want.shape,
        "load_adapter: tensor \"",
        want.file_key,
        "\" has shape ",
        found->sizes(),
        " in the file, but the model needs ",
        c10::IntArrayRef(want.shape));
    TORCHLORA_CHECK(
        found->is_floating_point() ||
            (want.target.defined() && !want.target.is_floating_point()),
        "load_adapter: tensor \"",
        want.file_key,
        "\" has dtype ",
        found->scalar_type(),
        "; a floating-point tensor is needed");
    TORCHLORA_CHECK(
        alternate == nullptr || alternate == found ||
            (alternate->sizes() == found->sizes() &&
             torch::equal(*alternate, *found)),
        "load_adapter: the file holds \"",
        key,
        "\" and \"",
        want.alternate,
        "\" (the same tensor under two keys), and they differ");
  }
  for (const auto& [key, shape] : base_copies) {
    const auto* found = tensors.find(key);
    if (found == nullptr) {
      continue;
    }
    TORCHLORA_CHECK(
        found->sizes().vec() == shape,
        "load_adapter: tensor \"",
        key,
        "\" has shape ",
        found->sizes(),
        " in the file, but the module's own copy has ",
        c10::IntArrayRef(shape));
    known.insert(key); // the base's copy, which the model holds already
  }
  for (const auto& item : tensors) {
    TORCHLORA_CHECK(
        known.count(item.key()) > 0,
        "load_adapter: the file's tensor \"",
        item.key(),
        "\" (shape ",
        item.value().sizes(),
        ") matches nothing in the model: no adapted module, module to save "
        "or bias has that key");
  }

  return biases_kept;
}

} // namespace detail

/// Loads a peft LoRA adapter (`adapter_config.json` and
/// `adapter_model.safetensors` in `dir/<adapter_name>` where that folder has
/// them, as `save_adapter` writes a named adapter, else in `dir`) into
/// `model` as adapter `adapter_name`. Where the model has no such adapter
/// yet, it is injected first as the config says; then every tensor is
/// copied in, converted to the layer's adapter dtype. Every key of the file
/// must land on a module of the right shape and every expected key must be
/// in the file: otherwise an error names the key and both shapes, and the
/// model is unchanged. Configs of another `peft_type`, or that use a peft
/// feature torchlora does not implement (fan_in_fan_out, CorDA or LoftQ
/// inits, ...), are refused by name. DoRA files load with their magnitudes
/// (`<path>.lora_magnitude_vector`). A file whose config says
/// `init_lora_weights` "pissa", "pissa_niter_<n>" or "olora" changes the
/// base weights as peft's loading does: the init runs on the base (which
/// becomes its residual) before the file's A and B are copied in, so load
/// it onto the base model it was trained from. Every layout peft
/// writes loads: a `bias = "lora_only"` file without the biases (peft's save
/// leaves them out; they keep the base's values, with a warning), a module
/// to save's `modules_to_save.`/`original_module.` copies, and an
/// attention's out_proj B, doubled where the config is peft's (it has
/// `peft_version` or `auto_mapping`), as peft applies it. The loaded adapter
/// is trainable (`inference_mode` is not applied; call
/// `torchlora::set_adapter` or freeze it to serve). As for `save_adapter`,
/// `model` holds the layers; a LoRA layer by itself is refused.
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
  detail::check_not_a_lone_layer(model, "load_adapter");
  const auto folder = detail::adapter_files_folder(dir, adapter_name);
  const auto config_path = (fs::path(folder) / "adapter_config.json").string();
  TORCHLORA_CHECK(
      fs::exists(config_path),
      "load_adapter: no adapter_config.json in '",
      dir,
      "'");
  const auto file_config = detail::read_peft_config(config_path, adapter_name);
  const auto& config = file_config.config;
  const detail::ModelIndex index(model);
  // Loading into a merged layer would leave its merged weight stale.
  detail::check_not_merged(index, "", "load_adapter");
  detail::check_no_forward_running(index, "load_adapter");
  detail::check_not_routed(index, "load_adapter");
  const auto tensors = safetensors::load(
      (fs::path(folder) / "adapter_model.safetensors").string());

  // What the file must hold, by key, before anything changes.
  detail::AdapterLoad load;
  std::set<std::string> adapted; // layers that will carry any adapter
  std::set<std::string> with_adapter; // layers that will carry this one
  detail::expect_adapter_matrices(
      index, file_config, adapter_name, load, adapted, with_adapter);
  detail::expect_modules_and_biases(
      model, index, config, load, adapted, with_adapter);
  const auto biases_kept = detail::check_file_tensors(tensors, load);

  if (!load.injection.empty()) {
    detail::inject_planned(model, TargetMatcher(config), index, load.injection);
    const detail::ModelIndex adapted(model);
    for (const auto& [entry, layer] : adapted.lora_layers()) {
      if (!layer->has_adapter(adapter_name)) {
        continue;
      }
      const auto& kind = *detail::kind_of(*entry->module);
      const auto params = entry->module->named_parameters();
      for (const char* matrix : {"A", "B"}) {
        load.expected[detail::peft_matrix_key(
                          entry->paths.front(), kind, matrix, load.attentions)]
            .target = params[kind.parameter_name(matrix, adapter_name)];
      }
      if (layer->adapter_options(adapter_name).use_dora()) {
        load.expected[detail::peft_magnitude_key(entry->paths.front())].target =
            params[detail::magnitude_parameter_name(adapter_name)];
      }
    }
  }
  torch::NoGradGuard no_grad;
  for (const auto& [key, want] : load.expected) {
    if (want.file_key.empty()) {
      continue;
    }
    want.target.copy_(tensors[want.file_key]);
    if (want.factor != 1.0) {
      // In the adapter's dtype: exact (only the exponent changes).
      want.target.mul_(want.factor);
    }
  }
  if (!biases_kept.empty()) {
    TORCHLORA_WARN(
        "load_adapter: the file has bias = \"lora_only\" but no ",
        "tensor for ",
        biases_kept.size(),
        " bias(es) (",
        detail::quoted_list(biases_kept),
        "): peft's save_pretrained leaves them out. They keep the base "
        "model's values, as they do when peft reloads the file");
  }
}

} // namespace torchlora
