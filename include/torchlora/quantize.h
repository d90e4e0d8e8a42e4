#pragma once

#include <torchlora/config.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/text.h>
#include <torchlora/layer.h>
#include <torchlora/linear.h>
#include <torchlora/model/model_walk.h>
#include <torchlora/module_ref.h>
#include <torchlora/quantized_linear.h>
#include <torchlora/targeting.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {

/// Options of `quantize`: which Linear layers, and how to store them.
///
/// Example:
/// ```
/// auto options = torchlora::QuantizeOptions()
///                    .quantization(torchlora::QuantizedLinearOptions()
///                                      .format(torchlora::QuantizedFormat::nf4)
///                                      .double_quant(true))
///                    .exclude_modules({"head"});
/// ```
struct QuantizeOptions {
  /// The format, NF4 block size and double quantization.
  TORCH_ARG(QuantizedLinearOptions, quantization) = {};
  /// Which layers, as `LoRAConfig::target_modules` names them (suffixes of
  /// module paths). Default: `{"all-linear"}`, every Linear but an output
  /// head, as `inject_lora` reads it.
  TORCH_ARG(std::vector<std::string>, target_modules) = {"all-linear"};
  /// Layers left as they are, as `LoRAConfig::exclude_modules`.
  TORCH_ARG(std::vector<std::string>, exclude_modules) = {};
};

namespace detail {

/// One Linear layer `quantize` converts: a plain one held by the model only
/// (swapped for a `QuantizedLinear`), or a `LoRALinear` (quantized in place).
struct PlannedQuantization {
  const ModelEntry* entry;
  std::shared_ptr<torch::nn::LinearImpl> plain;
  LoRALinearImpl* lora;
};

/// Throws unless `weight`, the weight of `entry`'s layer, belongs to it
/// alone among `tensors` (`model_tensors`): quantizing a tied weight would
/// silently untie it.
inline void check_weight_not_shared(
    const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
    const ModelEntry& entry,
    const torch::Tensor& weight) {
  for (const auto& [key, tensor] : tensors) {
    TORCHLORA_CHECK(
        owns_tensor(entry, key) ||
            tensor.unsafeGetTensorImpl() != weight.unsafeGetTensorImpl(),
        "cannot quantize '",
        entry.paths.front(),
        "': its weight is also '",
        key,
        "' (tied weights), which would keep reading a float weight while "
        "this layer reads codes. Exclude one of them, or untie them first." TORCHLORA_NOTHING_CHANGED);
  }
}

/// `check_quantizable_weight`, naming the layer at `path`.
inline void check_weight_for(
    const std::string& path,
    const torch::Tensor& weight) {
  try {
    check_quantizable_weight(weight);
  } catch (const c10::Error& error) {
    TORCHLORA_CHECK(
        false,
        "cannot quantize '",
        path,
        "': ",
        without_prefix(error.what_without_backtrace()),
        "." TORCHLORA_NOTHING_CHANGED);
  }
}

inline std::vector<PlannedQuantization> plan_quantization(
    torch::nn::Module& model,
    const ModelIndex& index,
    const TargetMatcher& matcher,
    const QuantizedLinearOptions& quantization) {
  const auto tensors = model_tensors(model, index);
  std::vector<PlannedQuantization> planned;
  size_t quantized_already = 0;
  for (const auto& entry : index.entries()) {
    const auto& path = entry.paths.front();
    if (!matcher.is_target(path)) {
      continue;
    }
    auto* lora = dynamic_cast<LoRALinearImpl*>(entry.module);
    const bool linear = lora != nullptr ||
        dynamic_cast<torch::nn::LinearImpl*>(entry.module) != nullptr;
    if (matcher.targets_all_linear() &&
        (!linear || TargetMatcher::is_output_head(path))) {
      continue;
    }
    TORCHLORA_CHECK(
        linear,
        "quantize converts Linear layers; ",
        matcher.describe_targets(),
        " matched '",
        path,
        "', a ",
        entry.module->name(),
        ". Name the Linear layers inside it instead." TORCHLORA_NOTHING_CHANGED);
    if (is_quantized(*entry.module)) {
      const auto* quantized = lora != nullptr
          ? lora->quantized_base()
          : dynamic_cast<QuantizedLinearImpl*>(entry.module);
      std::ostringstream stored;
      quantized->pretty_print(stored);
      TORCHLORA_CHECK(
          quantized->same_storage(quantization),
          "cannot quantize '",
          path,
          "' as ",
          to_string(quantization.format()),
          quantization.format() == QuantizedFormat::nf4
              ? " (block_size " + std::to_string(quantization.block_size()) +
                  (quantization.double_quant() ? ", double_quant" : "") + ")"
              : std::string(),
          ": it is quantized already, as ",
          stored.str(),
          ". dequantize() it first to store it otherwise." TORCHLORA_NOTHING_CHANGED);
      ++quantized_already;
      continue;
    }
    if (lora != nullptr) {
      TORCHLORA_CHECK(
          lora->adapter_names().empty(),
          "cannot quantize '",
          path,
          "': it has adapters (",
          quoted_list(lora->adapter_names()),
          ") trained on its float weight. Quantize before inject_lora." TORCHLORA_NOTHING_CHANGED);
      TORCHLORA_CHECK(
          !lora->member_bound(),
          "cannot quantize '",
          path,
          "': a LibTorch module reads its weight through a member of its "
          "own, which must stay a float weight. Exclude it." TORCHLORA_NOTHING_CHANGED);
      check_weight_for(path, lora->weight);
      check_weight_not_shared(tensors, entry, lora->weight);
      planned.push_back(PlannedQuantization{&entry, nullptr, lora});
      continue;
    }
    const auto shared = share(entry);
    const auto outside = outside_references(entry, shared);
    TORCHLORA_CHECK(
        outside == 0,
        "cannot quantize '",
        path,
        "': this torch::nn::Linear is also held outside the model's registry "
        "and containers (",
        outside,
        " more reference(s): a typed member such as `torch::nn::Linear ",
        entry.registrations.front().name,
        "{nullptr};`, a LibTorch module's own member, or a variable), whose "
        "calls would keep using the float layer. Declare the member as "
        "`torchlora::LoRALinear` (quantized in place, same checkpoint keys), "
        "or exclude the layer." TORCHLORA_NOTHING_CHANGED);
    auto held = std::dynamic_pointer_cast<torch::nn::LinearImpl>(shared);
    check_weight_for(path, held->weight);
    check_weight_not_shared(tensors, entry, held->weight);
    planned.push_back(PlannedQuantization{&entry, held, nullptr});
  }
  TORCHLORA_CHECK(
      !planned.empty() || quantized_already > 0,
      "no Linear layer matched ",
      matcher.describe_targets(),
      " (after exclusions)." TORCHLORA_NOTHING_CHANGED);
  return planned;
}

} // namespace detail

/// Stores the frozen weights of the Linear layers `options` targets
/// quantized (int8 or NF4, `QuantizedLinearOptions`), for LoRA training over
/// a base that takes a quarter (NF4) or half (int8) of its bf16 memory, as
/// QLoRA does; returns their paths in model order. Call it on the loaded
/// float model, before `inject_lora`.
///
/// - A targeted `torch::nn::Linear` in any module or container becomes a
///   `torchlora::QuantizedLinear` (sharing its bias); a typed
///   `torchlora::LoRALinear` member without adapters gets a quantized base
///   in place and stays valid. `inject_lora` then adapts either.
/// - Refused, changing nothing: a plain Linear that something else holds (a
///   typed `torch::nn::Linear` member: declare it `torchlora::LoRALinear`),
///   LibTorch modules' own Linear members (Transformer layers,
///   MultiheadAttention's out_proj), tied weights, layers with adapters, a
///   weight with NaN or Inf, a layer quantized already in another way.
///   Layers quantized already the same way are left as they are.
/// - State-dict keys: `weight` (codes) and its scales (`weight_scale`, or
///   `weight_absmax`...), and `bias`; `torch::save`/`torch::load` round trip
///   a quantized model.
///
/// Example:
/// ```
/// torchlora::quantize(*model, torchlora::QuantizeOptions());
/// torchlora::inject_lora(*model, torchlora::LoRAConfig(8).target_modules(
///                                    {"all-linear"}));
/// ```
inline std::vector<std::string> quantize(
    ModuleRef model_ref,
    const QuantizeOptions& options = {}) {
  auto& model = model_ref.get();
  detail::check_quantized_options(options.quantization());
  const TargetMatcher matcher(LoRAConfig(1)
                                  .target_modules(options.target_modules())
                                  .exclude_modules(options.exclude_modules()));
  const detail::ModelIndex index(model);
  detail::check_not_routed(index, "quantize");
  detail::check_no_forward_running(index, "quantize");
  const auto planned =
      detail::plan_quantization(model, index, matcher, options.quantization());

  // Everything that can fail (memory) first; then the swaps, which cannot.
  std::vector<std::shared_ptr<QuantizedLinearImpl>> made;
  for (const auto& layer : planned) {
    if (layer.plain != nullptr) {
      made.push_back(std::make_shared<QuantizedLinearImpl>(
          torch::nn::Linear(layer.plain), options.quantization()));
    } else {
      made.push_back(nullptr);
    }
  }
  std::vector<std::string> paths;
  for (size_t i = 0; i < planned.size(); ++i) {
    const auto& layer = planned[i];
    if (layer.lora != nullptr) {
      layer.lora->quantize_base(options.quantization());
    } else {
      made[i]->train(layer.plain->is_training());
      detail::replace_everywhere(*layer.entry, layer.plain.get(), made[i]);
    }
    paths.push_back(layer.entry->paths.front());
  }
  return paths;
}

namespace detail {

/// The quantized layers of `index` that `dequantize` would turn into float
/// ones, checked first: a plain `QuantizedLinear` held outside the model
/// (a typed member) cannot be swapped.
inline std::vector<const ModelEntry*> plan_dequantization(
    const ModelIndex& index) {
  std::vector<const ModelEntry*> planned;
  for (const auto& entry : index.entries()) {
    if (dynamic_cast<QuantizedLinearImpl*>(entry.module) != nullptr) {
      const auto outside = outside_references(entry, share(entry));
      TORCHLORA_CHECK(
          outside == 0,
          "cannot dequantize '",
          entry.paths.front(),
          "': this torchlora::QuantizedLinear is also held outside the "
          "model's registry and containers (",
          outside,
          " more reference(s), e.g. a typed member), which would keep "
          "calling the quantized layer. Hold it in a container, or as a "
          "torchlora::LoRALinear member." TORCHLORA_NOTHING_CHANGED);
      planned.push_back(&entry);
    } else if (is_quantized(*entry.module)) {
      planned.push_back(&entry);
    }
  }
  return planned;
}

/// Carries out `plan_dequantization`'s plan; with `plain_only`, only for
/// the `QuantizedLinear` layers (not the LoRA layers over quantized bases).
inline void dequantize_planned(
    const std::vector<const ModelEntry*>& planned,
    bool plain_only = false) {
  for (const auto* entry : planned) {
    if (plain_only &&
        dynamic_cast<QuantizedLinearImpl*>(entry->module) == nullptr) {
      continue;
    }
    if (auto* lora = dynamic_cast<LoRALinearImpl*>(entry->module)) {
      lora->dequantize_base();
      continue;
    }
    auto* quantized = dynamic_cast<QuantizedLinearImpl*>(entry->module);
    auto linear =
        make_float_linear(quantized->dequantized_weight(), quantized->bias);
    linear->train(quantized->is_training());
    replace_everywhere(*entry, entry->module, linear);
  }
}

} // namespace detail

/// Turns every quantized layer of `model` back into a float one: a
/// `QuantizedLinear` into a `torch::nn::Linear`, a `LoRALinear` over a
/// quantized base into one over a float base (adapters kept), each holding
/// the dequantized weight in the dtype it computed in (frozen) and the same
/// bias: the same weights, in float. Refused, changing nothing, for a
/// `QuantizedLinear` held by a typed member.
///
/// Example:
/// ```
/// torchlora::dequantize(*model);
/// ```
inline void dequantize(ModuleRef model) {
  const detail::ModelIndex index(model.get());
  detail::check_not_routed(index, "dequantize");
  detail::check_no_forward_running(index, "dequantize");
  detail::dequantize_planned(detail::plan_dequantization(index));
}

} // namespace torchlora
