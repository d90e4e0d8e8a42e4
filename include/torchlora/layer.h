#pragma once

#include <torchlora/detail/check.h>
#include <torchlora/options.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/types.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace torchlora {

/// What every LoRA layer of torchlora offers, whatever its base layer type.
///
/// Model-wide functions (`inject_lora`, `merge`, `set_adapter`, ...) find LoRA
/// layers through this interface:
/// ```
/// model->apply([](torch::nn::Module& m) {
///   if (auto* lora = dynamic_cast<torchlora::LoRALayer*>(&m)) {
///     std::cout << lora->adapter_names().size() << "\n";
///   }
/// });
/// ```
class LoRALayer {
 public:
  virtual ~LoRALayer() = default;

  // ------------------------------------------------------------ adapters

  /// Names of the attached adapters, in the order they were added.
  virtual std::vector<std::string> adapter_names() const = 0;

  /// True if an adapter of this name is attached.
  virtual bool has_adapter(const std::string& name) const = 0;

  /// Attaches a new, active adapter named `name` and freezes the base layer.
  virtual void add_adapter(
      const std::string& name,
      const LoRAOptions& options) = 0;

  /// Removes adapter `name`: its tensors leave `named_parameters()`.
  virtual void delete_adapter(const std::string& name) = 0;

  /// Makes exactly the adapters in `names` active (names this layer lacks are
  /// skipped): their outputs are summed and they are trainable; the others
  /// are frozen and unused.
  virtual void set_active_adapters(const std::vector<std::string>& names) = 0;

  /// Names of the active adapters, in the order they were added.
  virtual std::vector<std::string> active_adapters() const = 0;

  /// Multiplies adapter `name`'s contribution by `scale` (default 1).
  virtual void set_scale(const std::string& name, double scale) = 0;

  /// The run-time multiplier of adapter `name`.
  virtual double scale(const std::string& name) const = 0;

  /// The options adapter `name` was created with.
  virtual const LoRAOptions& adapter_options(const std::string& name) const = 0;

  /// Switches all adapters off (the base output, bit for bit) or back on.
  virtual void set_adapters_enabled(bool enabled) = 0;

  /// False while `set_adapters_enabled(false)` holds.
  virtual bool adapters_enabled() const = 0;

  // ------------------------------------------------------------ tensors

  /// The tensors of every adapter (A and B of each).
  virtual std::vector<torch::Tensor> adapter_parameters() const = 0;

  /// The tensors of the active adapters.
  virtual std::vector<torch::Tensor> active_adapter_parameters() const = 0;

  /// The base layer's weight (merged while the layer is merged); undefined
  /// for a layer type that does not say (merges then cannot check ties).
  virtual torch::Tensor base_weight() const {
    return torch::Tensor();
  }

  /// The frozen base layer's bias; undefined when the base has none.
  virtual torch::Tensor base_bias() const = 0;

  // ------------------------------------------------------------ merging

  /// Adds the active adapters' products to the base weight, so the forward
  /// is the base layer's alone; `safe` refuses (changing nothing) when the
  /// result holds NaN or Inf. A merged layer stays as it is.
  virtual void merge(bool safe) = 0;

  /// `merge` into the weight itself, keeping no copy of the weight from
  /// before; `unmerge` then subtracts the adapters' products again (exact
  /// up to rounding: not bit for bit, least so in fp16/bf16). A layer type
  /// that cannot refuses.
  virtual void merge_in_place(bool /*safe*/) {
    TORCHLORA_CHECK(
        false,
        "merge_in_place: this LoRA layer type cannot merge without "
        "keeping a copy; use merge()");
  }

  /// Restores the base weight as it was before `merge` (bit for bit after
  /// `merge`, up to rounding after `merge_in_place`); no-op when the layer
  /// is not merged.
  virtual void unmerge() = 0;

  /// True between `merge` (or `merge_in_place`) and `unmerge`.
  virtual bool merged() const = 0;

  /// True when merged by `merge_in_place` (no copy of the weight kept).
  virtual bool merged_in_place() const {
    return false;
  }

  /// True if merging now would give only finite weights.
  virtual bool merge_is_finite() const = 0;

  /// Throws the `torchlora:` error that `merge` would throw (adapters
  /// disabled, a delta the base weight cannot hold, a merged weight gone
  /// stale), without changing anything.
  virtual void check_mergeable() const = 0;

  /// Throws the `torchlora:` error that `merge_in_place` would throw beyond
  /// `check_mergeable`'s, without changing anything.
  virtual void check_in_place_mergeable() const {}

  /// Throws the `torchlora:` error that `merge` and `merge_in_place` would
  /// throw because the base weight cannot hold a merged weight (a quantized
  /// base), without changing anything. `merge_and_unload` does not ask it.
  virtual void check_weight_mergeable() const {}

  /// Throws the `torchlora:` error that `unmerge` would throw (a merged
  /// weight changed in place since `merge`), without changing anything.
  virtual void check_unmergeable() const = 0;

  /// Removes every adapter: after merging them into the base weight for good
  /// (`merge_first`), or after restoring the base weight if merged.
  virtual void unload(bool merge_first) = 0;

  /// The base layer that holds this layer's `weight` and `bias`.
  virtual std::shared_ptr<torch::nn::Module> base_module() const = 0;

  /// The base layer as an `AnyModule`, to put back into a `Sequential`.
  virtual torch::nn::AnyModule base_any_module() const = 0;

  /// Gives `copy`, a LoRA layer of the same kind over a copy of the base
  /// layer and without adapters, this layer's adapters (values, scales,
  /// flags), its enabled and merged state and its training mode: what a
  /// model's clone does for each LoRA layer.
  virtual void copy_state_into(
      LoRALayer& /*copy*/,
      const c10::optional<torch::Device>& /*device*/) const {
    TORCHLORA_CHECK(
        false,
        "this LoRA layer type cannot copy its state into a clone; "
        "clone the model with LibTorch's clone()");
  }

  // ------------------------------------------------------------ threads

  /// How many forwards run through this layer now, on any thread. Changing
  /// the layer's adapters or weights is refused while one runs.
  /// (0 for a layer type that does not count them.)
  virtual int running_forwards() const {
    return 0;
  }
};

} // namespace torchlora
