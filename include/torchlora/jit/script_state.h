#pragma once

// What a torchlora::jit::ScriptLoRA keeps (script_lora.h): the mirror of the
// TorchScript module, its adapted attributes and what they hold between and
// during calls, and which modules have a ScriptLoRA. Not part of the API.

#include <torchlora/detail/check.h>
#include <torchlora/detail/member_sentinel.h>
#include <torchlora/jit/script_kinds.h>
#include <torchlora/jit/script_mirror.h>
#include <torchlora/layer.h>
#include <torchlora/layer/member_binding.h>
#include <torchlora/model/model_walk.h>

#include <torch/csrc/jit/api/module.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <algorithm>
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
    return mirror.model().named_parameters()[path + "." + name];
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
} // namespace jit
} // namespace torchlora
