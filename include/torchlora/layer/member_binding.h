#pragma once

// LoRA layers whose base weight a module of LibTorch reads through a typed
// member of its own (`TransformerEncoderLayer::linear1`,
// `MultiheadAttention::in_proj_weight`): the interface model-wide functions
// use, and the state a layer keeps for it. One concern of `LoRALayerImpl`
// (layer_base.h).

#include <torchlora/detail/check.h>
#include <torchlora/layer.h>
#include <torchlora/options.h>

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace torchlora {

/// A LoRA layer that can be adapted through a member of a LibTorch module
/// (what `inject_lora` does inside LibTorch's Transformer modules). Find it
/// with `torchlora::member_bindable(layer)`.
class MemberBindable {
 public:
  virtual ~MemberBindable() = default;

  /// True when a module of LibTorch reads this layer's base weight through
  /// a typed member of its own: that member then holds the adapted weight
  /// inside a `torchlora::AdaptedWeights` scope, the merged weight when
  /// merged, and otherwise a sentinel that refuses every use.
  virtual bool member_bound() const = 0;

  /// Makes this layer member-bound (`inject_lora` does, for the layers of
  /// LibTorch's modules); `where` names it in messages.
  virtual void bind_member(const std::string& where) = 0;

  /// Points the bound member at the adapted weight, `W + sum s B A`
  /// computed now (differentiable in every A and B when gradients are
  /// recorded), until `release_member_weight` with the returned token:
  /// what `AdaptedWeights` does. Holds nest: the innermost one's weight is
  /// the member's, and releasing it gives back the one before.
  virtual int64_t hold_member_weight() = 0;

  /// Ends the `hold_member_weight` that returned `token`.
  virtual void release_member_weight(int64_t token) = 0;

  /// How many `AdaptedWeights` scopes hold this layer's member now. Changing
  /// the layer's adapters is refused while one does.
  virtual int member_weight_holds() const = 0;
};

/// `layer` as a `MemberBindable`, or null for a layer type that cannot be
/// bound.
inline MemberBindable* member_bindable(LoRALayer* layer) {
  return dynamic_cast<MemberBindable*>(layer);
}
inline const MemberBindable* member_bindable(const LoRALayer* layer) {
  return dynamic_cast<const MemberBindable*>(layer);
}

/// True when `layer`'s base weight is read through a LibTorch member.
inline bool is_member_bound(const LoRALayer* layer) {
  const auto* bindable = member_bindable(layer);
  return bindable != nullptr && bindable->member_bound();
}

/// How many `AdaptedWeights` scopes hold `layer`'s member now (0 for a
/// layer that is not bound).
inline int member_weight_holds(const LoRALayer* layer) {
  const auto* bindable = member_bindable(layer);
  return bindable == nullptr ? 0 : bindable->member_weight_holds();
}

/// Makes `layer` member-bound (`MemberBindable::bind_member`), or refuses a
/// layer type that cannot be.
inline void bind_member(LoRALayer& layer, const std::string& where) {
  auto* bindable = member_bindable(&layer);
  TORCHLORA_CHECK(
      bindable != nullptr,
      "this LoRA layer type cannot be adapted through a member of a LibTorch "
      "module (",
      where,
      ")");
  bindable->bind_member(where);
}

namespace detail {

/// What a member-bound layer keeps: where it is, and the `AdaptedWeights`
/// scopes holding its member now.
struct MemberBinding {
  /// One `AdaptedWeights` scope's hold: its token, the grad mode it was
  /// made in and the weight it computed.
  struct Hold {
    int64_t token = 0;
    bool grad = true;
    torch::Tensor weight;
  };

  bool bound = false;
  /// The layer in messages: "'layers.0.linear1' (read by ...)".
  std::string where;
  /// The scopes holding the member now, innermost last. The member holds the
  /// innermost one's weight.
  std::vector<Hold> holds;
  int64_t last_token = 0;

  /// Adds a hold of `weight`, made in the current grad mode; its token.
  int64_t hold(torch::Tensor weight) {
    Hold hold;
    hold.token = ++last_token;
    hold.grad = at::GradMode::is_enabled();
    hold.weight = std::move(weight);
    holds.push_back(std::move(hold));
    return holds.back().token;
  }

  /// Ends the hold `token`; false when there is none.
  bool release(int64_t token) {
    const auto found =
        std::find_if(holds.begin(), holds.end(), [&](const Hold& hold) {
          return hold.token == token;
        });
    if (found == holds.end()) {
      return false;
    }
    holds.erase(found);
    return true;
  }

  /// Refuses an adapter a bound member cannot honour: the member holds one
  /// weight, so the adapter's input cannot be dropped out. `at` names the
  /// layer when it is about to be bound.
  void check_options(
      const std::string& name,
      const LoRAOptions& lora,
      const std::string& at = std::string()) const {
    if (!bound && at.empty()) {
      return;
    }
    TORCHLORA_CHECK(
        lora.dropout() == 0,
        "adapter \"",
        name,
        "\" of ",
        at.empty() ? where : at,
        " needs dropout 0, got ",
        lora.dropout(),
        ": that LibTorch module reads the layer's weight directly, so the "
        "adapter is applied as one weight W + s B A and its input cannot be "
        "dropped out");
  }

  /// The message of the sentinel a bound member holds outside
  /// `AdaptedWeights`.
  std::string sentinel_message() const {
    return TORCHLORA_PREFIX "the weight LibTorch's module reads from " + where +
        " is the base weight plus its LoRA adapters, computed only "
        "inside a torchlora::AdaptedWeights scope, and it was used "
        "outside one. Make `torchlora::AdaptedWeights adapted(model);` "
        "before the forward (a new one for every training step, after "
        "optimizer.step()), or merge() the model for inference. The "
        "base weight itself is in named_parameters()";
  }
};

} // namespace detail
} // namespace torchlora
