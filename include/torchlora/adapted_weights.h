#pragma once

#include <torchlora/layer.h>
#include <torchlora/layer/member_binding.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/module_ref.h>

#include <torch/nn/module.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace torchlora {

/// Computes the adapted weights that LibTorch's own modules read through
/// their typed members, for as long as it lives.
///
/// `TransformerEncoderLayer`, `TransformerDecoderLayer` and
/// `MultiheadAttention` call `linear1`, `linear2`, `out_proj` and
/// `in_proj_weight` through members that `inject_lora` cannot swap. It
/// binds them instead: each member holds
/// - inside an `AdaptedWeights`: `W + sum s B A` of the active adapters,
///   differentiable in every A and B (the base weight when the adapters are
///   disabled);
/// - when the model is merged: the merged weight (no scope needed);
/// - otherwise: a sentinel, so a forward without the scope is a
///   `torchlora:` error, never the base weight used in silence.
///
/// Make one per training step, after the previous `optimizer.step()`: its
/// weights hold the adapters as they were when it was made. A backward
/// through weights whose adapters changed since (an `AdaptedWeights` made
/// once, outside the loop) is an error; several forwards and backwards
/// before the step (gradient accumulation) are fine. While one lives,
/// changing adapters, scales, `DisableAdapters` or merging is refused:
/// do those before making it. For inference, make one under
/// `torch::NoGradGuard` (the weights are then the merged ones, bit for
/// bit), or `merge` the model. Scopes nest: each computes its weights in
/// its own grad mode, and when an inner one ends the outer one's weights
/// are back. Models without such layers need no scope
/// (one is then a no-op). Use a model's scopes from one thread.
///
/// Example:
/// ```
/// for (const auto& batch : batches) {
///   torchlora::AdaptedWeights adapted(*encoder);
///   auto loss = loss_of(encoder->forward(batch));
///   optimizer.zero_grad();
///   loss.backward();
///   optimizer.step();
/// }
/// ```
class AdaptedWeights {
 public:
  explicit AdaptedWeights(ModuleRef model) {
    const detail::ModelIndex index(model.get());
    for (const auto& [entry, layer] : index.lora_layers()) {
      if (auto* bindable = member_bindable(layer);
          bindable != nullptr && bindable->member_bound()) {
        held_.push_back(detail::share(*entry));
        layers_.push_back(bindable);
      }
    }
    try {
      for (auto* layer : layers_) {
        tokens_.push_back(layer->hold_member_weight());
      }
    } catch (...) {
      release();
      throw;
    }
  }

  AdaptedWeights(const AdaptedWeights&) = delete;
  AdaptedWeights& operator=(const AdaptedWeights&) = delete;
  AdaptedWeights(AdaptedWeights&&) = delete;
  AdaptedWeights& operator=(AdaptedWeights&&) = delete;

  /// Gives the members back what they held before: an outer scope's
  /// weights, or the sentinels (or the merged weights).
  ~AdaptedWeights() {
    release();
  }

  /// How many members it computed.
  size_t size() const {
    return layers_.size();
  }

 private:
  void release() {
    for (size_t i = tokens_.size(); i-- > 0;) {
      layers_[i]->release_member_weight(tokens_[i]);
    }
    tokens_.clear();
  }

  std::vector<std::shared_ptr<torch::nn::Module>> held_;
  std::vector<MemberBindable*> layers_;
  std::vector<int64_t> tokens_;
};

} // namespace torchlora
