#pragma once

// A LibTorch module tree that stands for a TorchScript module's layers: the
// same paths, and for each Linear, Embedding, Conv1d/2d/3d and
// MultiheadAttention a LibTorch layer of that kind holding the very tensors
// the TorchScript module reads. torchlora's model functions (inject, save,
// load, merge) run on it unchanged; torchlora::jit::ScriptLoRA
// (script_lora.h) hands the weights they compute to the TorchScript module.

#include <torchlora/detail/check.h>
#include <torchlora/detail/member_sentinel.h>
#include <torchlora/jit/script_kinds.h>

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace jit {
namespace detail {

/// Makes `target` (a freshly made, tiny tensor of a LibTorch layer) the
/// tensor `source` of the TorchScript module: same memory, sizes, dtype,
/// device and trainable flag. The TorchScript module is then given `target`
/// itself (`ScriptMirror` does), so both hold one tensor.
inline void adopt(torch::Tensor& target, const torch::Tensor& source) {
  const torch::NoGradGuard no_grad;
  target.set_data(source.detach());
  target.set_requires_grad(source.requires_grad());
}

/// One layer of the mirror that stands for a TorchScript layer.
struct MirroredLayer {
  std::string path;
  ScriptKind kind;
  /// The TorchScript module that owns the adapted attribute.
  torch::jit::Module owner;
};

/// The mirror of a TorchScript module (see the top of this file). Making it
/// points the TorchScript module's parameter attributes of the mirrored
/// layers at the mirror's tensors (the same memory as before, so the
/// module's outputs do not change).
class ScriptMirror {
 public:
  explicit ScriptMirror(torch::jit::Module module)
      : module_(std::move(module)) {
    TORCHLORA_CHECK(
        module_.parameters().size() > 0,
        "jit::inject_lora: the TorchScript module '",
        script_type_name(module_),
        "' has no parameters. A module made by "
        "torch.jit.freeze (or torch.jit.optimize_for_inference) keeps its "
        "weights as constants inside its code, which LoRA cannot adapt: "
        "save the model from Python without freezing it (torch.jit.script or "
        "torch.jit.trace, then torch.jit.save)");
    root_ = std::make_shared<torch::nn::Module>(script_type_name(module_));
    TORCHLORA_CHECK(
        !script_kind(module_),
        "jit::inject_lora: the TorchScript module is itself a ",
        script_type_name(module_),
        "; adapt a model that holds it (peft, too, adapts the layers of a "
        "model, not a lone layer)");
    for (const auto& parameter : module_.named_parameters(/*recurse=*/true)) {
      TORCHLORA_CHECK(
          !torchlora::detail::is_member_sentinel(parameter.value),
          "jit::inject_lora: the TorchScript module's '",
          parameter.name,
          "' holds adapters of another torchlora::jit::ScriptLoRA; add "
          "adapters through that one (ScriptLoRA::inject), or "
          "merge_and_unload() it first");
    }
    for (const auto& parameter : module_.named_parameters(/*recurse=*/false)) {
      root_->register_parameter(
          parameter.name, parameter.value, parameter.value.requires_grad());
    }
    std::map<const c10::ivalue::Object*, std::shared_ptr<torch::nn::Module>>
        mirrors;
    mirror_children(module_, *root_, "", mirrors);
  }

  /// The mirror's root: torchlora's model functions take it.
  torch::nn::Module& model() const {
    return *root_;
  }

  /// The TorchScript module at `path` ("" is the root).
  const torch::jit::Module& script_module(const std::string& path) const {
    const auto found = script_modules_.find(path);
    TORCHLORA_INTERNAL_ASSERT(
        found != script_modules_.end(), "no TorchScript module at ", path);
    return found->second;
  }

  /// The kind of the mirrored layer at `path`, if one is there.
  std::optional<ScriptKind> kind_at(const std::string& path) const {
    const auto found = kinds_.find(path);
    if (found == kinds_.end()) {
      return std::nullopt;
    }
    return found->second;
  }

 private:
  /// Mirrors `module`'s children under `mirror`; `mirrors` holds the mirror
  /// of each TorchScript object met so far (a module used at two paths has
  /// one mirror), only while the mirror is made: a reference kept
  /// afterwards would look to inject_lora like a typed member holding the
  /// layer.
  void mirror_children(
      const torch::jit::Module& module,
      torch::nn::Module& mirror,
      const std::string& prefix,
      std::map<const c10::ivalue::Object*, std::shared_ptr<torch::nn::Module>>&
          mirrors) {
    for (const auto& child : module.named_children()) {
      const auto path = prefix.empty() ? child.name : prefix + "." + child.name;
      script_modules_.emplace(path, child.value);
      const auto seen = mirrors.find(child.value._ivalue().get());
      if (seen != mirrors.end()) {
        // One module at two paths: one mirror, registered at both.
        mirror.register_module(child.name, seen->second);
        continue;
      }
      if (auto* attention = mirror.as<torch::nn::MultiheadAttentionImpl>();
          attention != nullptr && child.name == "out_proj") {
        // The attention's own out_proj (made with it below).
        auto out_proj = attention->out_proj;
        if (cannot_adapt(child.value, ScriptKind::linear).empty()) {
          adopt_linear(child.value, *out_proj, path);
          kinds_.emplace(path, ScriptKind::linear);
        }
        mirrors.emplace(child.value._ivalue().get(), out_proj.ptr());
        continue;
      }
      auto made = make_mirror(child.value, path);
      mirrors.emplace(child.value._ivalue().get(), made);
      mirror.register_module(child.name, made);
      mirror_children(child.value, *made, path, mirrors);
    }
  }

  /// A LibTorch layer for a layer torchlora adapts, or a plain module
  /// holding the TorchScript module's own parameters (named by its class,
  /// which errors show).
  std::shared_ptr<torch::nn::Module> make_mirror(
      const torch::jit::Module& module,
      const std::string& path) {
    const auto kind = script_kind(module);
    if (kind) {
      const auto why_not = cannot_adapt(module, *kind);
      if (why_not.empty()) {
        kinds_.emplace(path, *kind);
        return make_layer(module, *kind, path);
      }
      return holder_of(module, script_type_name(module) + why_not);
    }
    return holder_of(module, script_type_name(module));
  }

  std::shared_ptr<torch::nn::Module> holder_of(
      const torch::jit::Module& module,
      const std::string& name) {
    auto holder = std::make_shared<torch::nn::Module>(name);
    for (const auto& parameter : module.named_parameters(/*recurse=*/false)) {
      holder->register_parameter(
          parameter.name, parameter.value, parameter.value.requires_grad());
    }
    return holder;
  }

  /// Why a layer of a kind torchlora adapts cannot be (as a phrase that
  /// follows its class name in errors), or empty.
  static std::string cannot_adapt(
      const torch::jit::Module& module,
      ScriptKind kind) {
    const auto type = module.type();
    const std::string attribute = adapted_attribute(kind);
    if (type->hasConstant(attribute)) {
      return " whose " + attribute + " is a constant of its code";
    }
    const auto slot = type->findAttributeSlot(attribute);
    if (!slot || !type->is_parameter(*slot) ||
        !module.attr(attribute).isTensor()) {
      return kind == ScriptKind::attention
          ? " with separate q/k/v weights (kdim or vdim differs from "
            "embed_dim; torchlora, like peft, adapts the packed "
            "in_proj_weight)"
          : " whose " + attribute + " is not a parameter";
    }
    const auto weight = module.attr(attribute).toTensor();
    if (weight.layout() != torch::kStrided || weight.is_quantized()) {
      return " whose " + attribute + " is not a dense tensor";
    }
    if (kind == ScriptKind::embedding) {
      const auto max_norm = setting_of(module, "max_norm");
      if ((max_norm && !max_norm->isNone()) ||
          graph_calls(module, "aten::embedding_renorm_")) {
        return " with max_norm (its forward renormalizes the weight in place)";
      }
      const auto sparse = setting_of(module, "sparse");
      if (sparse && sparse->isBool() && sparse->toBool()) {
        return " with sparse gradients";
      }
    }
    if (kind == ScriptKind::conv1d || kind == ScriptKind::conv2d ||
        kind == ScriptKind::conv3d) {
      const auto groups = conv_groups(module);
      if (!groups) {
        return " whose groups cannot be read (a traced layer without a "
               "convolution in its code)";
      }
      if (*groups != 1) {
        return " with groups = " + std::to_string(*groups) +
            " (a LoRA adapter joins channels across groups, which a grouped "
            "weight cannot hold, and a TorchScript module's layers are "
            "adapted through their weights)";
      }
    }
    return std::string();
  }

  /// A convolution's groups: its setting (scripted) or the argument of the
  /// convolution in its code (traced).
  static std::optional<int64_t> conv_groups(const torch::jit::Module& module) {
    const auto setting = setting_of(module, "groups");
    if (setting && setting->isInt()) {
      return setting->toInt();
    }
    // aten::_convolution(input, weight, bias, stride, padding, dilation,
    // transposed, output_padding, groups, ...); aten::conv<n>d and
    // aten::_convolution_mode(input, weight, bias, stride, padding,
    // dilation, groups).
    auto groups = graph_constant(module, {"aten::_convolution"}, 8);
    if (!groups) {
      groups = graph_constant(
          module,
          {"aten::conv1d",
           "aten::conv2d",
           "aten::conv3d",
           // padding given as a string ("same"), traced
           "aten::_convolution_mode"},
          6);
    }
    if (groups && groups->isInt()) {
      return groups->toInt();
    }
    return std::nullopt;
  }

  std::shared_ptr<torch::nn::Module> make_layer(
      const torch::jit::Module& module,
      ScriptKind kind,
      const std::string& path) {
    switch (kind) {
      case ScriptKind::linear: {
        torch::nn::Linear linear(
            torch::nn::LinearOptions(1, 1).bias(has_tensor(module, "bias")));
        adopt_linear(module, *linear, path);
        return linear.ptr();
      }
      case ScriptKind::embedding:
        return make_embedding(module, path);
      case ScriptKind::conv1d:
        return make_conv<torch::nn::Conv1d, 1>(module, path);
      case ScriptKind::conv2d:
        return make_conv<torch::nn::Conv2d, 2>(module, path);
      case ScriptKind::conv3d:
        return make_conv<torch::nn::Conv3d, 3>(module, path);
      case ScriptKind::attention:
        return make_attention(module, path);
    }
    TORCHLORA_INTERNAL_ASSERT(false, "unknown ScriptKind");
  }

  /// Points the TorchScript module's parameter `name` at `tensor` (the
  /// mirror's, holding the same memory).
  static void share(
      const torch::jit::Module& module,
      const std::string& name,
      torch::Tensor& tensor) {
    adopt(tensor, module.attr(name).toTensor());
    auto owner = module;
    owner.setattr(name, tensor);
  }

  /// The layer's `weight`, checked to have `dims` dimensions.
  static torch::Tensor weight_of(
      const torch::jit::Module& module,
      const std::string& path,
      int64_t dims) {
    const auto weight = module.attr("weight").toTensor();
    TORCHLORA_CHECK(
        weight.dim() == dims,
        "jit::inject_lora: the weight of the ",
        script_type_name(module),
        " '",
        path,
        "' has ",
        weight.dim(),
        " dimensions, expected ",
        dims);
    return weight;
  }

  static void adopt_linear(
      const torch::jit::Module& module,
      torch::nn::LinearImpl& linear,
      const std::string& path) {
    const auto weight = weight_of(module, path, 2);
    linear.options.in_features(weight.size(1)).out_features(weight.size(0));
    share(module, "weight", linear.weight);
    if (has_tensor(module, "bias")) {
      share(module, "bias", linear.bias);
    }
  }

  std::shared_ptr<torch::nn::Module> make_embedding(
      const torch::jit::Module& module,
      const std::string& path) {
    const auto weight = weight_of(module, path, 2);
    torch::nn::Embedding embedding(torch::nn::EmbeddingOptions(1, 1));
    embedding->options.num_embeddings(weight.size(0))
        .embedding_dim(weight.size(1));
    const auto padding = setting_of(module, "padding_idx");
    if (padding && padding->isInt()) {
      embedding->options.padding_idx(padding->toInt());
    }
    share(module, "weight", embedding->weight);
    return embedding.ptr();
  }

  template <typename Conv, size_t D>
  std::shared_ptr<torch::nn::Module> make_conv(
      const torch::jit::Module& module,
      const std::string& path) {
    const auto weight = weight_of(module, path, static_cast<int64_t>(D) + 2);
    const auto groups = *conv_groups(module);
    Conv conv(torch::nn::ConvOptions<D>(groups, groups, 1)
                  .groups(groups)
                  .bias(has_tensor(module, "bias")));
    torch::ExpandingArray<D> kernel(1);
    for (size_t i = 0; i < D; ++i) {
      (*kernel)[i] = weight.size(static_cast<int64_t>(i) + 2);
    }
    conv->options.in_channels(weight.size(1) * groups)
        .out_channels(weight.size(0))
        .kernel_size(kernel);
    share(module, "weight", conv->weight);
    if (has_tensor(module, "bias")) {
      share(module, "bias", conv->bias);
    }
    return conv.ptr();
  }

  std::shared_ptr<torch::nn::Module> make_attention(
      const torch::jit::Module& module,
      const std::string& path) {
    const auto weight = module.attr("in_proj_weight").toTensor();
    const auto embed_dim = weight.size(1);
    TORCHLORA_CHECK(
        weight.dim() == 2 && weight.size(0) == 3 * embed_dim,
        "jit::inject_lora: the in_proj_weight of the MultiheadAttention '",
        path,
        "' has shape ",
        weight.sizes(),
        ", expected [3 * embed_dim, embed_dim]");
    const auto has = [&](const char* name) { return has_tensor(module, name); };
    const auto heads = setting_of(module, "num_heads");
    const int64_t num_heads = heads && heads->isInt() ? heads->toInt() : 1;
    TORCHLORA_CHECK(
        num_heads > 0 && embed_dim % num_heads == 0,
        "jit::inject_lora: the MultiheadAttention '",
        path,
        "' has num_heads ",
        num_heads,
        ", which does not divide its embed_dim ",
        embed_dim);
    torch::nn::MultiheadAttention attention(
        torch::nn::MultiheadAttentionOptions(1, 1)
            .bias(has("in_proj_bias"))
            .add_bias_kv(has("bias_k")));
    attention->options.embed_dim(embed_dim)
        .num_heads(num_heads)
        .kdim(embed_dim)
        .vdim(embed_dim);
    attention->head_dim = embed_dim / num_heads;
    share(module, "in_proj_weight", attention->in_proj_weight);
    if (has("in_proj_bias")) {
      share(module, "in_proj_bias", attention->in_proj_bias);
    }
    if (has("bias_k")) {
      share(module, "bias_k", attention->bias_k);
      share(module, "bias_v", attention->bias_v);
    }
    return attention.ptr();
  }

  torch::jit::Module module_;
  std::shared_ptr<torch::nn::Module> root_;
  /// The TorchScript modules by path.
  std::map<std::string, torch::jit::Module> script_modules_;
  /// The kinds of the mirrored layers by path.
  std::map<std::string, ScriptKind> kinds_;
};

} // namespace detail
} // namespace jit
} // namespace torchlora
