#pragma once

// save_adapter's conversion of an adapter that changed its base (PiSSA,
// OLoRA) into a plain LoRA adapter of the untouched base, from the adapter
// as it was initialized (peft's `path_initial_model_for_weight_conversion`).
// Not part of the API.

#include <torchlora/detail/check.h>
#include <torchlora/io/peft_config_write.h>
#include <torchlora/options.h>
#include <torchlora/safetensors.h>

#include <torch/types.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <string>

namespace torchlora {
namespace detail {

/// Turns `tensors` and `contents` (an adapter as trained) into a plain LoRA
/// adapter of the base before its init, from the adapter as initialized,
/// saved in `initial_dir`: `A' = [A; A0]`, `B' = [B, -B0]`, so `s B' A' = s
/// (B A - B0 A0)`, with each layer's rank doubled and its alpha doubled
/// (times sqrt(2) with rsLoRA), so that its scaling stays. The config then
/// says `init_lora_weights` true.
/// `matrix_keys` are the file keys of the adapter's matrices, each with
/// whether it is an A.
inline void convert_to_initial_base(
    safetensors::Tensors& tensors,
    PeftConfigContents& contents,
    const std::map<std::string, bool>& matrix_keys,
    const std::string& initial_dir) {
  const auto path =
      (std::filesystem::path(initial_dir) / "adapter_model.safetensors")
          .string();
  TORCHLORA_CHECK(
      std::filesystem::exists(path),
      "save_adapter: no adapter_model.safetensors in the initial adapter's "
      "folder '",
      initial_dir,
      "' (save the adapter there right after inject_lora)");
  const auto initial = safetensors::load(path);
  size_t matched = 0;
  for (const auto& item : tensors) {
    TORCHLORA_CHECK(
        item.key().find("lora_magnitude_vector") == std::string::npos,
        "save_adapter: a DoRA adapter ('",
        item.key(),
        "') cannot be converted to a plain LoRA adapter of the initial base: "
        "its rescaling is no sum of products. Save it as trained");
    if (matrix_keys.count(item.key()) == 0) {
      continue;
    }
    const auto* first = initial.find(item.key());
    TORCHLORA_CHECK(
        first != nullptr && first->sizes() == item.value().sizes(),
        "save_adapter: the initial adapter in '",
        initial_dir,
        "' has no tensor \"",
        item.key(),
        "\" of shape ",
        item.value().sizes(),
        first != nullptr ? " (it has shape " : "",
        first != nullptr ? c10::str(first->sizes()) : std::string(),
        first != nullptr ? ")" : "",
        "; it must be this adapter as it was initialized");
    ++matched;
  }
  for (const auto& item : initial) {
    const bool matrix = item.key().find(".lora_") != std::string::npos &&
        item.key().find(".lora_magnitude_vector") == std::string::npos;
    TORCHLORA_CHECK(
        !matrix || matrix_keys.count(item.key()) > 0,
        "save_adapter: the initial adapter in '",
        initial_dir,
        "' has \"",
        item.key(),
        "\", which this adapter lacks; it must be this adapter as it was "
        "initialized");
  }
  TORCHLORA_CHECK(
      matched > 0, "save_adapter: the adapter has no matrices to convert");
  for (auto& item : tensors) {
    const auto found = matrix_keys.find(item.key());
    if (found == matrix_keys.end()) {
      continue;
    }
    const auto start = initial[item.key()].to(item.value().options());
    item.value() = found->second ? torch::cat({item.value(), start}, 0)
                                 : torch::cat({item.value(), -start}, 1);
  }
  for (auto& [layer_path, lora] : contents.layers) {
    const double factor = lora.use_rslora() ? std::sqrt(2.0) : 2.0;
    lora.rank(2 * lora.rank())
        .alpha(lora.alpha() * factor)
        .init(LoRAInit::kaiming_uniform)
        .pissa_niter(0);
  }
}

} // namespace detail
} // namespace torchlora
