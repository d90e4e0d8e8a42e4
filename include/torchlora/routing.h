#pragma once

#include <torchlora/detail/check.h>
#include <torchlora/detail/row_routing.h>
#include <torchlora/detail/text.h>
#include <torchlora/layer.h>
#include <torchlora/layer/member_binding.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/module_ref.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace torchlora {

/// While it lives, on the thread that made it, every LoRA layer of `model`
/// computes row `i` of its input with adapter `names[i]` alone, whatever the
/// active adapters: any attached adapter, or `"__base__"` for the base layer
/// only. Rows are the first dimension of each layer's input; a layer whose
/// input has more leading dimensions (`[batch, tokens, in]`) uses the row's
/// adapter for all of them. A layer that lacks a row's adapter computes that
/// row's base output. The base product runs once for the whole batch, then
/// each adapter's product over its own rows (grouped once, here).
///
/// It works in training: each adapter's gradient comes from its own rows
/// only (an adapter trains where it is trainable, that is active:
/// `set_adapter(model, {...})` with all the routed names). Dropout applies
/// per adapter as configured. A merged layer, or one whose adapters are
/// disabled, refuses a routed forward.
///
/// Other threads do not see the routing: threads serving different requests
/// on one model each make their own. Routings nest (the innermost whose
/// model holds a layer applies). Destroy it on the thread that made it.
/// The routing covers the LoRA layers the model has when it is made. While
/// it lives, `delete_adapter`, `unload`, `merge_and_unload` and
/// `inject_lora` on the model are refused (on any thread): they would route
/// rows to adapters or layers that are gone, or miss new layers.
///
/// Example:
/// ```
/// {
///   torchlora::AdapterRouting routing(*model, {"fr", "de", "__base__"});
///   auto y = model->forward(batch);  // row 0 with "fr", 1 with "de", ...
/// }
/// ```
class AdapterRouting {
 public:
  AdapterRouting(ModuleRef model, std::vector<std::string> names)
      : groups_(check_names(model, names)) {
    const detail::ModelIndex index(model.get());
    for (const auto& [entry, layer] : index.lora_layers()) {
      TORCHLORA_CHECK(
          !is_member_bound(layer),
          "AdapterRouting cannot route rows through '",
          entry->paths.front(),
          "': a LibTorch module reads its weight directly, so one weight "
          "serves every row. Route rows on models built from LoRA layers, or "
          "run one adapter per batch (set_adapter)");
      held_.push_back(detail::share(*entry));
      layers_.insert(layer);
    }
    for (const auto* layer : layers_) {
      detail::RoutedLayers::instance().add(layer);
    }
    active_.groups = &groups_;
    active_.layers = &layers_;
    active_.outer = detail::current_routing();
    detail::current_routing() = &active_;
  }

  AdapterRouting(const AdapterRouting&) = delete;
  AdapterRouting& operator=(const AdapterRouting&) = delete;
  AdapterRouting(AdapterRouting&&) = delete;
  AdapterRouting& operator=(AdapterRouting&&) = delete;

  ~AdapterRouting() {
    // Normally the innermost routing; one destroyed out of order is taken
    // out of the chain wherever it is.
    auto* link = &detail::current_routing();
    while (*link != nullptr && *link != &active_) {
      link = &(*link)->outer;
    }
    if (*link == &active_) {
      *link = active_.outer;
    }
    for (const auto* layer : layers_) {
      detail::RoutedLayers::instance().remove(layer);
    }
  }

  /// The number of rows the routing was made for.
  int64_t rows() const {
    return groups_.rows();
  }

 private:
  /// `names`, once each is known: `"__base__"` or an adapter of some LoRA
  /// layer of `model`.
  static const std::vector<std::string>& check_names(
      ModuleRef model,
      const std::vector<std::string>& names) {
    const detail::ModelIndex index(model.get());
    std::vector<std::string> known;
    for (const auto& [entry, layer] : index.lora_layers()) {
      for (auto& name : layer->adapter_names()) {
        if (std::find(known.begin(), known.end(), name) == known.end()) {
          known.push_back(std::move(name));
        }
      }
    }
    for (size_t row = 0; row < names.size(); ++row) {
      const auto& name = names[row];
      TORCHLORA_CHECK(
          name == detail::base_row_name() ||
              std::find(known.begin(), known.end(), name) != known.end(),
          "AdapterRouting: row ",
          row,
          " names adapter \"",
          name,
          "\", which no LoRA layer of the model has (its adapters: ",
          detail::quoted_list(known),
          "; \"",
          detail::base_row_name(),
          "\" means no adapter)");
    }
    return names;
  }

  detail::RowGroups groups_;
  std::vector<std::shared_ptr<torch::nn::Module>> held_;
  std::unordered_set<const LoRALayer*> layers_;
  detail::ActiveRouting active_{};
};

} // namespace torchlora
