#pragma once

// The layer kinds torchlora adapts, in one table: how to recognise the plain
// layer and its LoRA layer, how to wrap and unwrap, the names of the adapter
// tensors (in memory and in peft's files) and their shapes for a rank. inject,
// merge_and_unload, save and load treat every kind through it. Not part of
// the API.

#include <torchlora/attention.h>
#include <torchlora/conv.h>
#include <torchlora/detail/check.h>
#include <torchlora/embedding.h>
#include <torchlora/layer.h>
#include <torchlora/linear.h>
#include <torchlora/quantized_linear.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace torchlora {
namespace detail {

/// The shapes of an adapter's A and B.
struct AdapterShapes {
  std::vector<int64_t> A;
  std::vector<int64_t> B;
};

/// One kind of layer that torchlora adapts.
struct LayerKind {
  /// The plain layer's type, as users write it: "torch::nn::Linear".
  const char* plain_name;
  /// Its LoRA layer's type: "torchlora::LoRALinear".
  const char* lora_name;
  /// Whether `"all-linear"` takes it (Linear only, as in peft).
  bool linear;
  /// The adapter tensors' name prefix: "lora_" gives `lora_A.<adapter>.weight`
  /// in memory and `lora_A.weight` in peft's files; "lora_embedding_" gives
  /// `lora_embedding_A.<adapter>` and `lora_embedding_A`.
  const char* matrix_prefix;
  bool matrix_has_weight;
  bool (*is_plain)(const torch::nn::Module&);
  bool (*is_lora)(const torch::nn::Module&);
  /// A LoRA layer adopting the plain layer `plain` (sharing its tensors, no
  /// adapter), and the same as an `AnyModule` for a `Sequential`.
  std::pair<std::shared_ptr<torch::nn::Module>, torch::nn::AnyModule> (*wrap)(
      const std::shared_ptr<torch::nn::Module>& plain);
  /// The plain layer `plain` as an `AnyModule`.
  torch::nn::AnyModule (*plain_any)(
      const std::shared_ptr<torch::nn::Module>& plain);
  /// The shapes of a rank-`rank` adapter on `layer` (plain or LoRA).
  AdapterShapes (*shapes)(const torch::nn::Module& layer, int64_t rank);
  /// The forward of `layer` (plain or LoRA) for one input; undefined when
  /// `layer` is neither. Null for kinds whose forward takes several inputs.
  torch::Tensor (*forward)(torch::nn::Module& layer, const torch::Tensor& x);
  /// The child adapted together with the layer, with its options (an
  /// attention's "out_proj"), or null; peft holds it at
  /// `<layer>.base_layer.<companion>`.
  const char* companion;

  /// The in-memory name of matrix `matrix` ("A"/"B") of adapter `adapter`.
  std::string parameter_name(const char* matrix, const std::string& adapter)
      const {
    return std::string(matrix_prefix) + matrix + "." + adapter +
        (matrix_has_weight ? ".weight" : "");
  }

  /// The name of matrix `matrix` in peft's files, after the layer's path.
  std::string file_suffix(const char* matrix) const {
    return std::string(matrix_prefix) + matrix +
        (matrix_has_weight ? ".weight" : "");
  }
};

/// True when `Layer` has a forward taking one tensor.
template <typename Layer, typename = void>
struct has_unary_forward : std::false_type {};
template <typename Layer>
struct has_unary_forward<
    Layer,
    std::void_t<decltype(std::declval<Layer&>().forward(
        std::declval<const torch::Tensor&>()))>> : std::true_type {};

/// `layer`'s forward for `x`, `layer` being a `Plain` or a `LoRA` layer;
/// undefined when it is neither.
template <typename Plain, typename LoRA>
torch::Tensor unary_forward(torch::nn::Module& layer, const torch::Tensor& x) {
  if (auto* lora = dynamic_cast<LoRA*>(&layer)) {
    return lora->forward(x);
  }
  if constexpr (std::is_base_of_v<Plain, QuantizedLinearImpl>) {
    // Its forward, not LinearImpl's, which would read the codes.
    if (auto* quantized = dynamic_cast<QuantizedLinearImpl*>(&layer)) {
      return quantized->forward(x);
    }
  }
  if (auto* plain = dynamic_cast<Plain*>(&layer)) {
    return plain->forward(x);
  }
  return torch::Tensor();
}

/// The kind of `Plain` layers and their `LoRA` layers; `Recognised` is what
/// counts as its LoRA layer (`LoRA` itself, or any `LoRALayer` for Linear).
template <typename Plain, typename LoRA, typename Recognised = LoRA>
LayerKind make_layer_kind(
    const char* plain_name,
    const char* lora_name,
    bool linear,
    const char* matrix_prefix,
    bool matrix_has_weight,
    AdapterShapes (*shapes)(const torch::nn::Module&, int64_t),
    const char* companion = nullptr) {
  torch::Tensor (*forward)(torch::nn::Module&, const torch::Tensor&) = nullptr;
  if constexpr (has_unary_forward<Plain>::value) {
    forward = unary_forward<Plain, LoRA>;
  }
  return LayerKind{
      plain_name,
      lora_name,
      linear,
      matrix_prefix,
      matrix_has_weight,
      [](const torch::nn::Module& module) {
        return dynamic_cast<const Plain*>(&module) != nullptr;
      },
      [](const torch::nn::Module& module) {
        return dynamic_cast<const Recognised*>(&module) != nullptr;
      },
      [](const std::shared_ptr<torch::nn::Module>& plain) {
        auto typed = std::dynamic_pointer_cast<Plain>(plain);
        TORCHLORA_INTERNAL_ASSERT(typed, "wrapping a layer of another kind");
        auto wrapped =
            std::make_shared<LoRA>(torch::nn::ModuleHolder<Plain>(typed));
        return std::make_pair(
            std::static_pointer_cast<torch::nn::Module>(wrapped),
            torch::nn::AnyModule(wrapped));
      },
      [](const std::shared_ptr<torch::nn::Module>& plain) {
        if constexpr (std::is_base_of_v<Plain, QuantizedLinearImpl>) {
          if (auto quantized =
                  std::dynamic_pointer_cast<QuantizedLinearImpl>(plain)) {
            return torch::nn::AnyModule(quantized);
          }
        }
        return torch::nn::AnyModule(std::dynamic_pointer_cast<Plain>(plain));
      },
      shapes,
      forward,
      companion};
}

/// The base weight of a plain or LoRA layer (LoRA layers register their
/// base's weight as `weight`).
inline torch::Tensor weight_of(const torch::nn::Module& layer) {
  // The dict is kept: `find` points into it.
  const auto parameters = layer.named_parameters(/*recurse=*/false);
  const auto* weight = parameters.find("weight");
  TORCHLORA_INTERNAL_ASSERT(weight != nullptr, "a layer without weight");
  return *weight;
}

inline AdapterShapes linear_shapes(const torch::nn::Module& layer, int64_t r) {
  // From the options: a quantized base's `weight` holds packed codes.
  const torch::nn::LinearOptions* options = nullptr;
  if (const auto* plain = dynamic_cast<const torch::nn::LinearImpl*>(&layer)) {
    options = &plain->options;
  } else if (const auto* lora = dynamic_cast<const LoRALinearImpl*>(&layer)) {
    options = &lora->options;
  }
  if (options != nullptr) {
    return {{r, options->in_features()}, {options->out_features(), r}};
  }
  const auto weight = weight_of(layer); // [out, in]
  return {{r, weight.size(1)}, {weight.size(0), r}};
}

inline AdapterShapes embedding_shapes(
    const torch::nn::Module& layer,
    int64_t r) {
  const auto weight = weight_of(layer); // [num_embeddings, dim]
  return {{r, weight.size(0)}, {weight.size(1), r}};
}

template <size_t D, typename Plain, typename LoRA>
AdapterShapes conv_shapes(const torch::nn::Module& layer, int64_t r) {
  const auto* plain = dynamic_cast<const Plain*>(&layer);
  const auto* lora = dynamic_cast<const LoRA*>(&layer);
  const auto& options = plain != nullptr ? plain->options : lora->options;
  const auto weight = weight_of(layer); // [out, in / groups, k...]
  std::vector<int64_t> A{r, options.in_channels()};
  std::vector<int64_t> B{options.out_channels(), r / options.groups()};
  for (size_t i = 0; i < D; ++i) {
    A.push_back(weight.size(static_cast<int64_t>(i) + 2));
    B.push_back(1);
  }
  return {A, B};
}

/// A MultiheadAttention's packed projection: A `[r, E]`, B `[3E, r]`.
inline AdapterShapes attention_shapes(
    const torch::nn::Module& layer,
    int64_t r) {
  const auto* plain =
      dynamic_cast<const torch::nn::MultiheadAttentionImpl*>(&layer);
  const auto* lora = dynamic_cast<const LoRAMultiheadAttentionImpl*>(&layer);
  const auto E =
      plain != nullptr ? plain->options.embed_dim() : lora->options.embed_dim();
  return {{r, E}, {3 * E, r}};
}

/// Every kind, Linear last: a LoRA layer of a type this table
/// does not know (a `LoRALinearImplT` over another base, say) counts as a
/// Linear one.
inline const std::vector<LayerKind>& layer_kinds() {
  static const std::vector<LayerKind> kinds = {
      make_layer_kind<torch::nn::EmbeddingImpl, LoRAEmbeddingImpl>(
          "torch::nn::Embedding",
          "torchlora::LoRAEmbedding",
          false,
          "lora_embedding_",
          false,
          embedding_shapes),
      make_layer_kind<torch::nn::Conv1dImpl, LoRAConv1dImpl>(
          "torch::nn::Conv1d",
          "torchlora::LoRAConv1d",
          false,
          "lora_",
          true,
          conv_shapes<1, torch::nn::Conv1dImpl, LoRAConv1dImpl>),
      make_layer_kind<torch::nn::Conv2dImpl, LoRAConv2dImpl>(
          "torch::nn::Conv2d",
          "torchlora::LoRAConv2d",
          false,
          "lora_",
          true,
          conv_shapes<2, torch::nn::Conv2dImpl, LoRAConv2dImpl>),
      make_layer_kind<torch::nn::Conv3dImpl, LoRAConv3dImpl>(
          "torch::nn::Conv3d",
          "torchlora::LoRAConv3d",
          false,
          "lora_",
          true,
          conv_shapes<3, torch::nn::Conv3dImpl, LoRAConv3dImpl>),
      make_layer_kind<
          torch::nn::MultiheadAttentionImpl,
          LoRAMultiheadAttentionImpl>(
          "torch::nn::MultiheadAttention",
          "torchlora::LoRAMultiheadAttention",
          false,
          "lora_",
          true,
          attention_shapes,
          "out_proj"),
      make_layer_kind<torch::nn::LinearImpl, LoRALinearImpl, LoRALayer>(
          "torch::nn::Linear",
          "torchlora::LoRALinear",
          true,
          "lora_",
          true,
          linear_shapes),
  };
  return kinds;
}

/// The kind of `module`, plain or LoRA; null when torchlora does not adapt
/// it.
inline const LayerKind* kind_of(const torch::nn::Module& module) {
  for (const auto& kind : layer_kinds()) {
    if (kind.is_plain(module) || kind.is_lora(module)) {
      return &kind;
    }
  }
  return nullptr;
}

/// True if `module` is a plain layer of a kind torchlora adapts (not yet a
/// LoRA layer).
inline bool is_plain_layer(const torch::nn::Module& module) {
  const auto* kind = kind_of(module);
  return kind != nullptr && kind->is_plain(module);
}

/// "torch::nn::Linear, Embedding, ... layers and their torchlora LoRA
/// layers", for messages: every kind of the table, Linear first; with
/// `lora_only`, "torch::nn::Linear, Embedding, ... layers".
inline std::string adaptable_kinds_text(bool lora_only = false) {
  std::vector<std::string> names;
  for (const bool linear : {true, false}) {
    for (const auto& kind : layer_kinds()) {
      if (kind.linear == linear) {
        const std::string name = kind.plain_name;
        names.push_back(
            names.empty() ? name : name.substr(name.rfind(':') + 1));
      }
    }
  }
  std::string text;
  for (size_t i = 0; i < names.size(); ++i) {
    text += (i == 0 ? "" : i + 1 == names.size() ? " and " : ", ") + names[i];
  }
  return text +
      (lora_only ? " layers" : " layers and their torchlora LoRA layers");
}

/// The path of child `name` of the module at `parent` ("" for the root).
inline std::string child_path(
    const std::string& parent,
    const std::string& name) {
  return parent.empty() ? name : parent + "." + name;
}

/// The kind whose companion child sits at `path` under a layer of that kind
/// (`<attention>.out_proj`, or `out_proj` under an attention at the root),
/// with the layer's path in `parent`; null when `path` names no kind's
/// companion.
inline const LayerKind* companion_kind(
    const std::string& path,
    std::string* parent) {
  for (const auto& kind : layer_kinds()) {
    if (kind.companion == nullptr) {
      continue;
    }
    const std::string name = kind.companion;
    if (path == name) {
      parent->clear();
      return &kind;
    }
    const auto suffix = "." + name;
    if (path.size() > suffix.size() &&
        path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0) {
      *parent = path.substr(0, path.size() - suffix.size());
      return &kind;
    }
  }
  return nullptr;
}

} // namespace detail
} // namespace torchlora
