#pragma once

#include <torchlora/adapted_weights.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/member_sentinel.h>
#include <torchlora/inject.h>
#include <torchlora/io/load_adapter.h>
#include <torchlora/io/save_adapter.h>
#include <torchlora/jit/script_mirror.h>
#include <torchlora/layer.h>
#include <torchlora/layer/member_binding.h>
#include <torchlora/merge.h>
#include <torchlora/model/model_walk.h>

#include <torch/csrc/jit/api/module.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace torchlora {
namespace jit {
namespace detail {

/// What a TorchScript module's adapted attribute holds outside an
/// `AdaptedWeights` call: every operator on it, and saving or copying the
/// module, is a torchlora: error.
inline std::string guard_message(const std::string& path, const char* name) {
  return TORCHLORA_PREFIX "'" + path + "." + name +
      "' of this TorchScript module is its base weight plus LoRA adapters, "
      "computed only while torchlora runs the module: call it through "
      "torchlora::jit::AdaptedWeights (or ScriptLoRA::forward), not "
      "directly. To save or run it as a plain TorchScript module, merge "
      "it through its ScriptLoRA first (lora.merge() or "
      "lora.merge_and_unload()). Saving, copying or moving it with to() "
      "fails until then; ScriptLoRA::to moves it";
}

/// The TorchScript objects (a module and its submodules) that a
/// `ScriptLoRA` holds now.
struct ScriptOwners {
  std::mutex mutex;
  std::map<const c10::ivalue::Object*, const void*> owner;

  static ScriptOwners& get() {
    // Never destroyed: ScriptLoRA handles in static objects release their
    // modules at exit, after function-local statics may be gone.
    static auto* owners = new ScriptOwners();
    return *owners;
  }

  /// Records `module` and its submodules as held by `state`, or refuses
  /// (changing nothing) when another holds one of them.
  void claim(const torch::jit::Module& module, const void* state) {
    const std::lock_guard<std::mutex> lock(mutex);
    std::vector<std::pair<std::string, const c10::ivalue::Object*>> objects;
    for (const auto& item : module.named_modules()) {
      objects.emplace_back(item.name, item.value._ivalue().get());
    }
    for (const auto& [path, object] : objects) {
      const auto found = owner.find(object);
      TORCHLORA_CHECK(
          found == owner.end() || found->second == state,
          "jit::inject_lora: the TorchScript module",
          path.empty() ? std::string() : " '" + path + "'",
          " already has a torchlora::jit::ScriptLoRA: add adapters through "
          "that one (ScriptLoRA::inject), or let its last copy go first "
          "(the module then gets its weights back).");
    }
    for (const auto& [path, object] : objects) {
      owner[object] = state;
    }
  }

  void release(const void* state) {
    const std::lock_guard<std::mutex> lock(mutex);
    for (auto it = owner.begin(); it != owner.end();) {
      it = it->second == state ? owner.erase(it) : std::next(it);
    }
  }
};

/// The weight the base layer of a bound LoRA layer reads through its member:
/// what `torchlora::AdaptedWeights` computed for it.
inline torch::Tensor bound_member(const LoRALayer& layer) {
  const auto base = layer.base_module();
  if (const auto* linear = base->as<torch::nn::LinearImpl>()) {
    return linear->weight;
  }
  if (const auto* embedding = base->as<torch::nn::EmbeddingImpl>()) {
    return embedding->weight;
  }
  if (const auto* conv = base->as<torch::nn::Conv1dImpl>()) {
    return conv->weight;
  }
  if (const auto* conv = base->as<torch::nn::Conv2dImpl>()) {
    return conv->weight;
  }
  if (const auto* conv = base->as<torch::nn::Conv3dImpl>()) {
    return conv->weight;
  }
  const auto* attention = base->as<torch::nn::MultiheadAttentionImpl>();
  TORCHLORA_INTERNAL_ASSERT(attention != nullptr, "unknown base layer");
  return attention->in_proj_weight;
}

/// One adapted attribute of the TorchScript module.
struct ScriptTarget {
  std::string path;
  torch::jit::Module owner;
  std::string attribute;
  LoRALayer* layer = nullptr;
  /// What the attribute holds outside `AdaptedWeights` calls when the layer
  /// is not merged.
  torch::Tensor guard;
  /// What torchlora last put into the attribute, and its dtype and device
  /// then: anything else there was put by someone else (or converted by the
  /// module's own `to()`), and is refused.
  torch::Tensor installed;
  caffe2::TypeMeta installed_dtype;
  torch::Device installed_device = torch::kCPU;
};

/// What a `ScriptLoRA` shares with its copies and its `AdaptedWeights`.
struct ScriptState {
  explicit ScriptState(const torch::jit::Module& script)
      : module(claimed(script, this)), mirror(released_on_error(script)) {}

  ScriptState(const ScriptState&) = delete;
  ScriptState& operator=(const ScriptState&) = delete;

  /// The last `ScriptLoRA` copy is gone: the module gets real weights back
  /// (the merged ones where merged; its adapters go with the mirror).
  ~ScriptState() {
    for (auto& target : targets) {
      try {
        install(target, mirror_tensor(target.path, target.attribute));
      } catch (...) {
        // Nothing to give back: the module keeps what it holds.
      }
    }
    ScriptOwners::get().release(this);
  }

  torch::jit::Module module;
  ScriptMirror mirror;
  std::vector<ScriptTarget> targets;
  /// Calls of the module through torchlora, one at a time.
  std::mutex calls;
  /// `AdaptedWeights` alive now.
  int scopes = 0;
  /// True while `ScriptLoRA::to` converts the weights.
  bool moving = false;

 private:
  static const torch::jit::Module& claimed(
      const torch::jit::Module& script,
      const void* state) {
    ScriptOwners::get().claim(script, state);
    return script;
  }

  /// The mirror of `script`; when making it fails, the claim is undone.
  ScriptMirror released_on_error(const torch::jit::Module& script) {
    try {
      return ScriptMirror(script);
    } catch (...) {
      ScriptOwners::get().release(this);
      throw;
    }
  }

 public:
  /// The mirror's tensor `attribute` of the layer at `path` (the base
  /// weight, merged when merged).
  torch::Tensor mirror_tensor(const std::string& path, const std::string& name)
      const {
    const torch::nn::Module* module = &mirror.model();
    size_t start = 0;
    while (start <= path.size()) {
      const auto dot = path.find('.', start);
      const auto part = path.substr(
          start, dot == std::string::npos ? std::string::npos : dot - start);
      module = module->named_children()[part].get();
      if (dot == std::string::npos) {
        break;
      }
      start = dot + 1;
    }
    return module->named_parameters(/*recurse=*/false)[name];
  }

  /// Refuses when `target`'s attribute holds something torchlora did not
  /// put there (a `setattr` or `to()` behind its back).
  void check_untouched(const ScriptTarget& target) const {
    const auto held = target.owner.attr(target.attribute);
    TORCHLORA_CHECK(
        held.isTensor() &&
            held.toTensor().unsafeGetTensorImpl() ==
                target.installed.unsafeGetTensorImpl() &&
            (moving ||
             (held.toTensor().dtype() == target.installed_dtype &&
              held.toTensor().device() == target.installed_device)),
        "'",
        target.path,
        ".",
        target.attribute,
        "' of the TorchScript module was replaced behind torchlora's back "
        "(setattr, or to() on the module): the adapters would not reach "
        "it. Change the module through its ScriptLoRA (ScriptLoRA::to "
        "moves it)." TORCHLORA_NOTHING_CHANGED);
  }

  void install(ScriptTarget& target, const torch::Tensor& tensor) {
    target.owner.setattr(target.attribute, tensor);
    target.installed = tensor;
    target.installed_dtype = tensor.dtype();
    target.installed_device = tensor.device();
  }

  /// The dtype and device of every weight, as torchlora last saw them.
  std::vector<std::tuple<std::string, caffe2::TypeMeta, torch::Device>> layout()
      const {
    std::vector<std::tuple<std::string, caffe2::TypeMeta, torch::Device>> all;
    for (const auto& item : mirror.model().named_parameters()) {
      all.emplace_back(item.key(), item.value().dtype(), item.value().device());
    }
    return all;
  }

  /// Refuses when a weight was converted past torchlora (the module's own
  /// `to()`, which stops at the first guard and leaves the module half
  /// converted).
  void check_layout() const {
    if (moving || last_layout.empty()) {
      return;
    }
    const auto now = layout();
    for (size_t i = 0; i < now.size() && i < last_layout.size(); ++i) {
      const auto& [name, dtype, device] = now[i];
      const auto& [before_name, before_dtype, before_device] = last_layout[i];
      TORCHLORA_CHECK(
          name != before_name ||
              (dtype == before_dtype && device == before_device),
          "'",
          name,
          "' of the TorchScript module was converted behind torchlora's "
          "back (to ",
          dtype,
          " on ",
          device,
          ", from ",
          before_dtype,
          " on ",
          before_device,
          ": the module's own to()), and its adapters were not. Convert "
          "it with ScriptLoRA::to, which converts both.");
    }
  }

  /// What `check_layout` compares with.
  std::vector<std::tuple<std::string, caffe2::TypeMeta, torch::Device>>
      last_layout;

  /// What the attribute holds between calls: the merged weight when merged;
  /// the base weight when the model is merged and this layer has nothing to
  /// merge (no active adapter, or the adapters disabled); else the guard.
  void install_resting(ScriptTarget& target, bool model_merged) {
    const auto& layer = *target.layer;
    const bool inert =
        layer.active_adapters().empty() || !layer.adapters_enabled();
    // The merged weight as a tensor of its own (sharing its memory), so
    // that an unmerge made past torchlora (torchlora::unmerge(lora.model()))
    // does not turn the module back to the base weights in silence.
    install(
        target,
        layer.merged() || (model_merged && inert) ? layer.base_weight().detach()
                                                  : target.guard);
  }

  /// True when any adapted layer is merged.
  bool model_merged() const {
    return std::any_of(targets.begin(), targets.end(), [](const auto& target) {
      return target.layer->merged();
    });
  }

  /// `install_resting` for every target.
  void install_all_resting() {
    const bool merged = model_merged();
    for (auto& target : targets) {
      install_resting(target, merged);
    }
  }

  /// Matches the targets to the mirror's LoRA layers now (after inject,
  /// load, unload or any model function on `mirror.model()`): new layers
  /// are bound and guarded, layers no longer adapted get their base weight
  /// back.
  void refresh() {
    check_layout();
    for (const auto& target : targets) {
      check_untouched(target);
    }
    // The new targets are made aside, so that an error leaves the old ones.
    std::vector<ScriptTarget> next;
    const torchlora::detail::ModelIndex index(mirror.model());
    for (const auto& [entry, layer] : index.lora_layers()) {
      const auto& path = entry->paths.front();
      const auto kind = mirror.kind_at(path);
      TORCHLORA_INTERNAL_ASSERT(kind, "a LoRA layer at ", path, " unmirrored");
      const auto found =
          std::find_if(targets.begin(), targets.end(), [&](const auto& old) {
            return old.path == path;
          });
      if (layer->adapter_names().empty()) {
        continue; // nothing to add: the base weight goes back (below)
      }
      ScriptTarget target;
      if (found != targets.end()) {
        target = *found;
      } else {
        target.path = path;
        target.owner = mirror.script_module(path);
        target.attribute = adapted_attribute(*kind);
        target.installed = target.owner.attr(target.attribute).toTensor();
      }
      target.layer = layer;
      if (!is_member_bound(layer)) {
        bind_member(*layer, "'" + path + "' (a layer of a TorchScript module)");
      }
      const auto base = mirror_tensor(path, target.attribute);
      if (!target.guard.defined() || target.guard.sizes() != base.sizes() ||
          target.guard.dtype() != base.dtype() ||
          target.guard.device() != base.device()) {
        target.guard = torchlora::detail::member_sentinel(
            base, guard_message(path, target.attribute.c_str()));
      }
      next.push_back(std::move(target));
    }
    for (auto& old : targets) {
      const bool kept =
          std::any_of(next.begin(), next.end(), [&](const auto& target) {
            return target.path == old.path;
          });
      if (!kept) {
        install(old, mirror_tensor(old.path, old.attribute));
      }
    }
    targets = std::move(next);
    install_all_resting();
    last_layout = layout();
  }

  /// Puts each target's base weight (merged when merged) back, for an
  /// operation on the whole TorchScript module.
  void install_tensors() {
    for (auto& target : targets) {
      check_untouched(target);
      install(target, mirror_tensor(target.path, target.attribute));
    }
  }

  /// Refuses layers at `paths` that the module's code never runs: an
  /// adapter there would change nothing.
  void check_reached(
      const std::vector<std::string>& paths,
      const char* operation) {
    if (!reached) {
      reached = reachable_paths(module);
    }
    for (const auto& path : paths) {
      TORCHLORA_CHECK(
          reached->count(path) > 0,
          operation,
          ": the TorchScript module's code never runs '",
          path,
          "' (a second name of a module that a traced model recorded under "
          "another, or a layer nothing calls), so an adapter there would "
          "change nothing. Target the name the code uses." TORCHLORA_NOTHING_CHANGED);
    }
  }

  /// The paths the module's code reaches, found on first use.
  std::optional<std::set<std::string>> reached;

  void check_no_scope(const char* operation) const {
    TORCHLORA_CHECK(
        scopes == 0,
        operation,
        " while ",
        scopes,
        " torchlora::jit::AdaptedWeights hold the adapted weights; end them "
        "first." TORCHLORA_NOTHING_CHANGED);
  }
};

} // namespace detail

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
    torchlora::save_adapter(state_->mirror.model(), dir, options);
  }

  /// `save_adapter` with the settings of the config the adapter was
  /// injected with (see `torchlora::save_adapter`).
  void save_adapter(const std::string& dir, const LoRAConfig& config) const {
    torchlora::save_adapter(state_->mirror.model(), dir, config);
  }

  /// The tensors to train: the adapters' A and B (of the active adapters).
  std::vector<torch::Tensor> parameters() const {
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
  friend class AdaptedWeights;

  /// Gives the module its real weights, runs `conversion` on the module
  /// and the mirror, and guards the new weights.
  template <typename Conversion>
  void convert(Conversion conversion) {
    auto& state = *state_;
    const std::lock_guard<std::mutex> lock(state.calls);
    state.check_no_scope("jit::ScriptLoRA::to");
    state.refresh();
    state.install_tensors();
    state.moving = true;
    try {
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
