#pragma once

#include <torchlora/adapted_weights.h>
#include <torchlora/adapters.h>
#include <torchlora/detail/check.h>
#include <torchlora/inject.h>
#include <torchlora/io/load_adapter.h>
#include <torchlora/io/peft_config_read.h>
#include <torchlora/io/save_adapter.h>
#include <torchlora/jit/script_state.h>
#include <torchlora/merge.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/targeting.h>

#include <torch/csrc/jit/api/module.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace jit {

/// LoRA adapters on a TorchScript module (scripted or traced in Python,
/// loaded with `torch::jit::load`), and what to do with them: train, merge,
/// save in peft's format.
///
/// The TorchScript module's code cannot be changed, but it reads its
/// weights from attributes at every call. So each adapted layer's weight
/// attribute is given `W + sum s B A` of its active adapters for the length
/// of a call made through torchlora (`AdaptedWeights`), differentiable in
/// every A and B. Between calls it holds a guard that refuses every use, so
/// a forward that bypasses torchlora, or a `save()` of the module with its
/// adapters unmerged, is an error and never the base weight used in
/// silence. `merge()` puts the merged weights in (the module then runs and
/// saves as a plain TorchScript module); `merge_and_unload()` leaves a
/// plain module for good.
///
/// Targeting, adapters, scales and files work as for LibTorch models: the
/// layers are found under the TorchScript module's paths (the Python
/// model's), and `model()` is a LibTorch module with those paths which
/// torchlora's model functions take (`torchlora::set_adapter(lora.model(),
/// "a")`). Linear (and NonDynamicallyQuantizableLinear), Embedding,
/// Conv1d/2d/3d and MultiheadAttention's packed `in_proj_weight` are
/// adapted; adapters need dropout 0 (they act on the weight).
///
/// A `ScriptLoRA` is a handle: copies share the adapters.
///
/// Example:
/// ```
/// auto module = torch::jit::load("model.pt");
/// auto lora = torchlora::jit::inject_lora(
///     module, torchlora::LoRAConfig(8).alpha(16).target_modules({"fc1"}));
/// torch::optim::AdamW optimizer(lora.parameters(), 1e-3);
/// for (const auto& batch : batches) {
///   auto loss = loss_of(lora.forward({batch.data}).toTensor(), batch);
///   optimizer.zero_grad();
///   loss.backward();
///   optimizer.step();
/// }
/// lora.save_adapter("out/adapter");
/// lora.merge_and_unload().save("out/merged.pt");
/// ```
class ScriptLoRA {
 public:
  /// Takes `module` (shared, not copied) with no adapter yet; refuses a
  /// module without parameters (frozen by `torch.jit.freeze`) or one that
  /// is itself a single layer.
  explicit ScriptLoRA(torch::jit::Module module)
      : state_(std::make_shared<detail::ScriptState>(std::move(module))) {}

  /// Adds the adapter `config` describes to the layers it targets, as
  /// `torchlora::inject_lora` does for a LibTorch model; returns their
  /// paths. Refuses (changing nothing) an adapter with dropout, a layer
  /// used by the module at several paths being adapted under one, and
  /// `modules_to_save`.
  std::vector<std::string> inject(const LoRAConfig& config) {
    auto& state = *state_;
    const std::lock_guard<std::mutex> lock(state.calls);
    state.check_no_scope("jit::inject_lora");
    TORCHLORA_CHECK(
        config.dropout() == 0,
        "jit::inject_lora: dropout must be 0 for a TorchScript module, got ",
        config.dropout(),
        ": its layers are adapted through their weights (W + s B A), so the "
        "adapter's input cannot be dropped out." TORCHLORA_NOTHING_CHANGED);
    check_no_variant(config, "jit::inject_lora", "");
    TORCHLORA_CHECK(
        config.modules_to_save().empty(),
        "jit::inject_lora: modules_to_save (got ",
        config.modules_to_save().size(),
        ") cannot be used with a TorchScript module, whose code cannot call "
        "a trainable copy of a module." TORCHLORA_NOTHING_CHANGED);
    state.refresh();
    {
      // Every layer it would adapt must be run by the module's code.
      const TargetMatcher matcher(config);
      const torchlora::detail::ModelIndex index(state.mirror.model());
      std::vector<std::string> planned;
      for (const auto& layer :
           torchlora::detail::plan_injection(index, matcher)) {
        planned.push_back(layer.entry->paths.front());
      }
      state.check_reached(planned, "jit::inject_lora");
    }
    auto paths = torchlora::inject_lora(state.mirror.model(), config);
    state.refresh();
    return paths;
  }

  /// Loads an adapter saved by peft or by `save_adapter` (see
  /// `torchlora::load_adapter`), injecting it where it belongs.
  void load_adapter(
      const std::string& dir,
      const std::string& adapter_name = "default") {
    auto& state = *state_;
    const std::lock_guard<std::mutex> lock(state.calls);
    state.check_no_scope("jit::load_adapter");
    const auto folder =
        torchlora::detail::adapter_files_folder(dir, adapter_name);
    const auto config_path = folder + "/adapter_config.json";
    if (std::filesystem::exists(config_path)) {
      const auto config =
          torchlora::detail::read_peft_config(config_path, adapter_name).config;
      TORCHLORA_CHECK(
          config.modules_to_save().empty(),
          "jit::load_adapter: the adapter in '",
          dir,
          "' has modules_to_save (",
          config.modules_to_save().size(),
          "), which a TorchScript module cannot use: its code cannot call a "
          "trainable copy of a module." TORCHLORA_NOTHING_CHANGED);
      check_no_variant(config, "jit::load_adapter", dir);
      const auto dropout = config.dropout();
      TORCHLORA_CHECK(
          dropout == 0,
          "jit::load_adapter: the adapter in '",
          dir,
          "' has lora_dropout ",
          dropout,
          "; a TorchScript module's layers are adapted through their "
          "weights (W + s B A), where dropout cannot apply. Set "
          "\"lora_dropout\": 0 in its adapter_config.json to load it (the "
          "trained values do not depend on it)." TORCHLORA_NOTHING_CHANGED);
    }
    state.refresh();
    torchlora::load_adapter(state.mirror.model(), dir, adapter_name);
    try {
      std::vector<std::string> paths;
      const torchlora::detail::ModelIndex index(state.mirror.model());
      for (const auto& [entry, layer] : index.lora_layers()) {
        if (layer->has_adapter(adapter_name)) {
          paths.push_back(entry->paths.front());
        }
      }
      state.check_reached(paths, "jit::load_adapter");
    } catch (...) {
      torchlora::delete_adapter(state.mirror.model(), adapter_name);
      state.refresh();
      throw;
    }
    state.refresh();
  }

  /// Saves an adapter in peft's format (see `torchlora::save_adapter`),
  /// under the keys peft gives the Python model the module came from.
  void save_adapter(
      const std::string& dir,
      const SaveAdapterOptions& options = {}) const {
    const std::lock_guard<std::mutex> lock(state_->calls);
    torchlora::save_adapter(state_->mirror.model(), dir, options);
  }

  /// `save_adapter` with the settings of the config the adapter was
  /// injected with (see `torchlora::save_adapter`).
  void save_adapter(const std::string& dir, const LoRAConfig& config) const {
    const std::lock_guard<std::mutex> lock(state_->calls);
    torchlora::save_adapter(state_->mirror.model(), dir, config);
  }

  /// The tensors to train: the adapters' A and B (of the active adapters).
  std::vector<torch::Tensor> parameters() const {
    const std::lock_guard<std::mutex> lock(state_->calls);
    std::vector<torch::Tensor> trainable;
    for (const auto& parameter : state_->mirror.model().parameters()) {
      if (parameter.requires_grad()) {
        trainable.push_back(parameter);
      }
    }
    return trainable;
  }

  /// The paths of the adapted layers.
  std::vector<std::string> adapted_paths() const {
    const std::lock_guard<std::mutex> lock(state_->calls);
    state_->refresh();
    std::vector<std::string> paths;
    for (const auto& target : state_->targets) {
      paths.push_back(target.path);
    }
    return paths;
  }

  /// A LibTorch module with the TorchScript module's paths and adapters,
  /// for torchlora's model functions (`set_adapter`, `set_scale`,
  /// `delete_adapter`, `DisableAdapters`, `adapter_names`, ...). Do not
  /// call its forward.
  torch::nn::Module& model() const {
    return state_->mirror.model();
  }

  /// The TorchScript module.
  torch::jit::Module& module() const {
    return state_->module;
  }

  /// Runs the module's forward with the adapters (an `AdaptedWeights` for
  /// one call).
  c10::IValue forward(std::vector<c10::IValue> inputs);

  /// Runs the module's method `name` with the adapters.
  c10::IValue run_method(
      const std::string& name,
      std::vector<c10::IValue> inputs);

  /// Merges the active adapters into the base weights (see
  /// `torchlora::merge`): the module then runs and saves as a plain
  /// TorchScript module with merged weights, until `unmerge`.
  void merge(const MergeOptions& options = {}) {
    run_on_mirror("jit::merge", [&](torch::nn::Module& model) {
      torchlora::merge(model, options);
    });
  }

  /// Restores the base weights (bit for bit after `merge`).
  void unmerge() {
    run_on_mirror("jit::unmerge", [](torch::nn::Module& model) {
      torchlora::unmerge(model);
    });
  }

  /// Merges the active adapters for good and removes every adapter: the
  /// module is a plain TorchScript module again, with merged weights, which
  /// `save()` writes and Python's `torch.jit.load` runs without torchlora.
  torch::jit::Module merge_and_unload(const MergeOptions& options = {}) {
    run_on_mirror("jit::merge_and_unload", [&](torch::nn::Module& model) {
      torchlora::merge_and_unload(model, options);
    });
    return state_->module;
  }

  /// Removes every adapter without merging: the module is as it was loaded.
  torch::jit::Module unload() {
    run_on_mirror("jit::unload", [](torch::nn::Module& model) {
      torchlora::unload(model);
    });
    return state_->module;
  }

  /// Moves the module and its adapters to `device` (the module's own `to()`
  /// is refused while it holds guards).
  void to(torch::Device device) {
    convert([&](torch::jit::Module& module, torch::nn::Module& model) {
      module.to(device);
      model.to(device);
    });
  }

  /// Converts the module's floating-point weights and its adapters to
  /// `dtype`.
  void to(torch::Dtype dtype) {
    convert([&](torch::jit::Module& module, torch::nn::Module& model) {
      module.to(dtype);
      model.to(dtype);
    });
  }

 private:
  /// Refuses DoRA and the inits that change the base (PiSSA, OLoRA), not
  /// yet offered for TorchScript modules.
  static void check_no_variant(
      const LoRAConfig& config,
      const char* operation,
      const std::string& dir) {
    const auto where =
        dir.empty() ? std::string() : " (the adapter in '" + dir + "')";
    TORCHLORA_CHECK(
        !config.use_dora(),
        operation,
        ": DoRA (use_dora)",
        where,
        " is not offered for TorchScript modules yet; use a LibTorch "
        "model, or use_dora = false." TORCHLORA_NOTHING_CHANGED);
    TORCHLORA_CHECK(
        config.init() != LoRAInit::pissa && config.init() != LoRAInit::olora,
        operation,
        ": init ",
        to_string(config.init()),
        where,
        ", which changes the base weights, is not offered for TorchScript "
        "modules yet; use a LibTorch model." TORCHLORA_NOTHING_CHANGED);
  }
  friend class AdaptedWeights;

  /// Gives the module its real weights, runs `conversion` on the module
  /// and the mirror, and guards the new weights.
  template <typename Conversion>
  void convert(Conversion conversion) {
    auto& state = *state_;
    const std::lock_guard<std::mutex> lock(state.calls);
    state.check_no_scope("jit::ScriptLoRA::to");
    // A module half converted by its own to() is converted the rest of the
    // way (or back).
    state.moving = true;
    try {
      state.refresh();
      state.install_tensors();
      conversion(state.module, state.mirror.model());
      state.refresh();
    } catch (...) {
      state.refresh();
      state.moving = false;
      throw;
    }
    state.moving = false;
  }

  template <typename Operation>
  void run_on_mirror(const char* name, Operation operation) {
    auto& state = *state_;
    const std::lock_guard<std::mutex> lock(state.calls);
    state.check_no_scope(name);
    state.refresh();
    operation(state.mirror.model());
    state.refresh();
  }

  std::shared_ptr<detail::ScriptState> state_;
};

/// The adapted weights of a `ScriptLoRA`, computed once when it is made
/// (as `torchlora::AdaptedWeights` does for LibTorch models: one per
/// training step, after `optimizer.step()`), and the calls of the module
/// that use them. During each call the adapted layers' attributes hold
/// these weights; afterwards they hold their guards (or merged weights)
/// again. While one lives, changing the adapters, merging or saving the
/// adapters' module state is refused. Calls through one `ScriptLoRA` run
/// one at a time.
///
/// Example:
/// ```
/// torchlora::jit::AdaptedWeights adapted(lora);
/// auto loss = adapted.forward({x}).toTensor().pow(2).mean();
/// loss.backward();
/// ```
class AdaptedWeights {
 public:
  explicit AdaptedWeights(ScriptLoRA& lora) : state_(lora.state_) {
    const std::lock_guard<std::mutex> lock(state_->calls);
    state_->refresh();
    holds_ =
        std::make_unique<torchlora::AdaptedWeights>(state_->mirror.model());
    // This scope's weights, which its calls use whatever other scopes
    // (another thread's, an inner one) compute meanwhile.
    for (const auto& target : state_->targets) {
      weights_.push_back(detail::bound_member(*target.layer));
      enabled_.push_back(target.layer->adapters_enabled());
    }
    ++state_->scopes;
  }

  AdaptedWeights(const AdaptedWeights&) = delete;
  AdaptedWeights& operator=(const AdaptedWeights&) = delete;

  ~AdaptedWeights() {
    const std::lock_guard<std::mutex> lock(state_->calls);
    --state_->scopes;
    holds_.reset();
  }

  /// The module's forward with the adapted weights.
  c10::IValue forward(std::vector<c10::IValue> inputs) {
    return run_method("forward", std::move(inputs));
  }

  /// The module's method `name` with the adapted weights.
  c10::IValue run_method(
      const std::string& name,
      std::vector<c10::IValue> inputs) {
    auto& state = *state_;
    const std::lock_guard<std::mutex> lock(state.calls);
    const auto method = state.module.find_method(name);
    TORCHLORA_CHECK(
        method.has_value(),
        "the TorchScript module has no method \"",
        name,
        "\"");
    for (auto& target : state.targets) {
      state.check_untouched(target);
    }
    TORCHLORA_INTERNAL_ASSERT(
        weights_.size() == state.targets.size(),
        "the adapted layers changed while an AdaptedWeights lived");
    for (size_t i = 0; i < weights_.size(); ++i) {
      TORCHLORA_CHECK(
          state.targets[i].layer->adapters_enabled() == enabled_[i],
          "the adapters of '",
          state.targets[i].path,
          "' were ",
          enabled_[i] ? "disabled" : "enabled",
          " (torchlora::DisableAdapters) since this "
          "torchlora::jit::AdaptedWeights computed its weights; make a new "
          "one.");
    }
    for (size_t i = 0; i < weights_.size(); ++i) {
      state.install(state.targets[i], weights_[i]);
    }
    try {
      auto result = (*method)(std::move(inputs));
      state.install_all_resting();
      return result;
    } catch (...) {
      state.install_all_resting();
      throw;
    }
  }

 private:
  std::shared_ptr<detail::ScriptState> state_;
  std::unique_ptr<torchlora::AdaptedWeights> holds_;
  std::vector<torch::Tensor> weights_;
  /// Whether each layer's adapters were enabled when the weights were
  /// computed.
  std::vector<bool> enabled_;
};

inline c10::IValue ScriptLoRA::forward(std::vector<c10::IValue> inputs) {
  AdaptedWeights adapted(*this);
  return adapted.forward(std::move(inputs));
}

inline c10::IValue ScriptLoRA::run_method(
    const std::string& name,
    std::vector<c10::IValue> inputs) {
  AdaptedWeights adapted(*this);
  return adapted.run_method(name, std::move(inputs));
}

/// Adapts the layers of a TorchScript module that `config` targets (see
/// `ScriptLoRA`); the returned object owns the adapters and runs the module
/// with them.
///
/// Example:
/// ```
/// auto module = torch::jit::load("model.pt");
/// auto lora = torchlora::jit::inject_lora(
///     module, torchlora::LoRAConfig(8).target_modules({"q_proj", "v_proj"}));
/// std::cout << lora.adapted_paths().size() << " layers adapted\n";
/// ```
inline ScriptLoRA inject_lora(
    const torch::jit::Module& module,
    const LoRAConfig& config) {
  ScriptLoRA lora(module);
  lora.inject(config);
  return lora;
}

/// A `ScriptLoRA` for `module` holding the adapter saved in `dir` (by peft
/// for the Python model the module came from, or by `save_adapter`).
inline ScriptLoRA load_adapter(
    const torch::jit::Module& module,
    const std::string& dir,
    const std::string& adapter_name = "default") {
  ScriptLoRA lora(module);
  lora.load_adapter(dir, adapter_name);
  return lora;
}

} // namespace jit
} // namespace torchlora
