#pragma once

// The adapters of one LoRA layer: their options, scales, matrices and which
// are active. One concern of `LoRALayerImpl` (layer_base.h). Not part of the
// API.

#include <torchlora/detail/check.h>
#include <torchlora/detail/text.h>
#include <torchlora/options.h>

#include <torch/nn/init.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace torchlora {
namespace detail {

/// One adapter of a LoRA layer: its options, its scales and its matrices.
struct Adapter {
  std::string name;
  LoRAOptions options;
  /// `alpha / r` (`alpha / sqrt(r)` with rsLoRA), fixed by the options.
  double scaling;
  /// The down-projection A, `[r, ...]` (its layout depends on the kind).
  torch::Tensor A;
  /// The up-projection B, `[..., r]` (its layout depends on the kind).
  torch::Tensor B;
  /// Run-time multiplier of the contribution (`set_scale`), default 1.
  double scale = 1.0;
  /// Whether the forward uses this adapter (`set_active_adapters`).
  bool active = true;
  /// DoRA's magnitude, one per output channel (in peft's shape for the
  /// kind); undefined for a plain LoRA adapter.
  torch::Tensor magnitude;

  bool is_dora() const {
    return magnitude.defined();
  }

  /// What the adapter's product is multiplied by: `scaling * scale`.
  double effective_scaling() const {
    return scaling * scale;
  }
};

/// One adapter's delta as a merge adds it: its matrices, its scale and, for
/// DoRA, its magnitude (undefined otherwise).
struct Delta {
  torch::Tensor A;
  torch::Tensor B;
  double s;
  torch::Tensor magnitude = {};
};

/// What tells that a tensor changed: its version counter (bumped by
/// in-place ops: an optimizer step, `copy_`) and its data pointer
/// (`set_data`).
struct Stamp {
  int64_t version;
  const void* data;
  bool operator==(const Stamp& other) const {
    return version == other.version && data == other.data;
  }
};

/// Fills A and B as `init` asks (A down, B up: Linear and Conv layers).
inline void init_lora_matrices(
    LoRAInit init,
    int64_t rank,
    const torch::Tensor& A,
    const torch::Tensor& B) {
  torch::NoGradGuard no_grad;
  switch (init) {
    case LoRAInit::kaiming_uniform:
      torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
      B.zero_();
      break;
    case LoRAInit::gaussian:
      torch::nn::init::normal_(A, 0.0, 1.0 / static_cast<double>(rank));
      B.zero_();
      break;
    case LoRAInit::random:
      torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
      torch::nn::init::kaiming_uniform_(B, std::sqrt(5.0));
      break;
    case LoRAInit::pissa:
    case LoRAInit::olora:
      // From the weight (LoRALayerImpl::init_from_weight), never here.
      TORCHLORA_INTERNAL_ASSERT(
          false, "init ", to_string(init), " needs the weight");
      break;
  }
}

/// The adapters of a layer, in the order they were added.
class AdapterSet {
 public:
  const std::vector<Adapter>& all() const {
    return adapters_;
  }
  bool empty() const {
    return adapters_.empty();
  }
  size_t size() const {
    return adapters_.size();
  }
  const Adapter& front() const {
    return adapters_.front();
  }
  const Adapter& back() const {
    return adapters_.back();
  }
  Adapter& back() {
    return adapters_.back();
  }

  void add(Adapter adapter) {
    adapters_.push_back(std::move(adapter));
  }

  /// Removes adapter `name` (which must exist).
  void erase(const std::string& name) {
    const auto& adapter = find(name);
    adapters_.erase(
        adapters_.begin() + static_cast<std::ptrdiff_t>(&adapter - &front()));
  }

  std::vector<std::string> names() const {
    std::vector<std::string> names;
    for (const auto& adapter : adapters_) {
      names.push_back(adapter.name);
    }
    return names;
  }

  std::vector<std::string> active_names() const {
    std::vector<std::string> names;
    for (const auto& adapter : adapters_) {
      if (adapter.active) {
        names.push_back(adapter.name);
      }
    }
    return names;
  }

  bool has(const std::string& name) const {
    return or_null(name) != nullptr;
  }

  bool has_active() const {
    return std::any_of(adapters_.begin(), adapters_.end(), [](const auto& a) {
      return a.active;
    });
  }

  const Adapter* or_null(const std::string& name) const {
    for (const auto& adapter : adapters_) {
      if (adapter.name == name) {
        return &adapter;
      }
    }
    return nullptr;
  }

  const Adapter& find(const std::string& name) const {
    const auto* found = or_null(name);
    TORCHLORA_CHECK(
        found != nullptr,
        "this layer has no adapter named \"",
        name,
        "\" (it has: ",
        quoted_list(names()),
        ")");
    return *found;
  }

  Adapter& find(const std::string& name) {
    return const_cast<Adapter&>(
        static_cast<const AdapterSet&>(*this).find(name));
  }

  /// Refuses a name that cannot be given to a new adapter.
  void check_new_name(const std::string& name) const {
    TORCHLORA_CHECK(
        !name.empty(), "an adapter name must not be empty, got \"\"");
    TORCHLORA_CHECK(
        name.find('.') == std::string::npos,
        "an adapter name must not contain '.', got \"",
        name,
        "\"");
    // It names a folder in adapter files (save_adapter).
    TORCHLORA_CHECK(
        name.find_first_of("/\\") == std::string::npos,
        "an adapter name must not contain '/' or '\\' (it names "
        "a folder of adapter files), got \"",
        name,
        "\"");
    TORCHLORA_CHECK(
        !has(name), "this layer already has an adapter named \"", name, "\"");
  }

  /// Makes exactly the adapters in `names` active and trainable.
  void set_active(const std::vector<std::string>& names) {
    for (auto& adapter : adapters_) {
      adapter.active =
          std::find(names.begin(), names.end(), adapter.name) != names.end();
      adapter.A.set_requires_grad(adapter.active);
      adapter.B.set_requires_grad(adapter.active);
      if (adapter.is_dora()) {
        adapter.magnitude.set_requires_grad(adapter.active);
      }
    }
  }

  /// A and B (and a DoRA magnitude) of every adapter (`active_only`: of
  /// the active ones).
  std::vector<torch::Tensor> matrices(bool active_only) const {
    std::vector<torch::Tensor> tensors;
    for (const auto& adapter : adapters_) {
      if (adapter.active || !active_only) {
        tensors.push_back(adapter.A);
        tensors.push_back(adapter.B);
        if (adapter.is_dora()) {
          tensors.push_back(adapter.magnitude);
        }
      }
    }
    return tensors;
  }

  /// True when an active adapter is a DoRA adapter.
  bool has_active_dora() const {
    return std::any_of(adapters_.begin(), adapters_.end(), [](const auto& a) {
      return a.active && a.is_dora();
    });
  }

  /// True when any adapter is a DoRA adapter.
  bool has_dora() const {
    return std::any_of(adapters_.begin(), adapters_.end(), [](const auto& a) {
      return a.is_dora();
    });
  }

  /// The active adapters' deltas, their matrices as they are now (not
  /// copied).
  std::vector<Delta> active_deltas() const {
    std::vector<Delta> deltas;
    for (const auto& adapter : adapters_) {
      if (adapter.active) {
        deltas.push_back(Delta{
            adapter.A.detach(),
            adapter.B.detach(),
            adapter.effective_scaling(),
            adapter.is_dora() ? adapter.magnitude.detach() : torch::Tensor()});
      }
    }
    return deltas;
  }

  /// The stamps of the active adapters' matrices.
  std::vector<Stamp> active_stamps() const {
    std::vector<Stamp> stamps;
    for (const auto& adapter : adapters_) {
      if (adapter.active) {
        for (const auto* tensor : {&adapter.A, &adapter.B}) {
          stamps.push_back(Stamp{tensor->_version(), tensor->data_ptr()});
        }
        if (adapter.is_dora()) {
          stamps.push_back(Stamp{
              adapter.magnitude._version(), adapter.magnitude.data_ptr()});
        }
      }
    }
    return stamps;
  }

  /// True when an active adapter's matrices record gradients now.
  bool records_gradients() const {
    if (!at::GradMode::is_enabled()) {
      return false;
    }
    return std::any_of(adapters_.begin(), adapters_.end(), [](const auto& a) {
      return a.active &&
          (a.A.requires_grad() || a.B.requires_grad() ||
           (a.is_dora() && a.magnitude.requires_grad()));
    });
  }

 private:
  std::vector<Adapter> adapters_;
};

} // namespace detail
} // namespace torchlora
