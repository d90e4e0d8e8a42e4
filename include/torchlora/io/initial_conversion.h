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
#include <string>

namespace torchlora {
namespace detail {

/// True for the file key of an A or B matrix (`...lora_A.weight`,
/// `...lora_embedding_B`); `*is_A` tells which.
inline bool is_matrix_key(const std::string& key, bool* is_A) {
  for (const char* suffix :
       {"lora_A.weight",
        "lora_B.weight",
        "lora_embedding_A",
        "lora_embedding_B"}) {
    const std::string end(suffix);
    if (key.size() >= end.size() &&
        key.compare(key.size() - end.size(), end.size(), end) == 0) {
      *is_A = end.find("_A") != std::string::npos;
      return true;
    }
  }
  return false;
}

/// Turns `tensors` and `contents` (an adapter as trained) into a plain LoRA
/// adapter of the base before its init, from the adapter as initialized,
/// saved in `initial_dir`: `A' = [A; A0]`, `B' = [B, -B0]`, so `s B' A' = s
/// (B A - B0 A0)`, with each layer's rank doubled and its alpha doubled
/// (times sqrt(2) with rsLoRA), so that its scaling stays. The config then
/// says `init_lora_weights` true.
inline void convert_to_initial_base(
    safetensors::Tensors& tensors,
    PeftConfigContents& contents,
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
    bool is_A = false;
    if (!is_matrix_key(item.key(), &is_A)) {
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
    bool is_A = false;
    TORCHLORA_CHECK(
        !is_matrix_key(item.key(), &is_A) || tensors.contains(item.key()),
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
    bool is_A = false;
    if (!is_matrix_key(item.key(), &is_A)) {
      continue;
    }
    const auto start = initial[item.key()].to(item.value().options());
    item.value() = is_A ? torch::cat({item.value(), start}, 0)
                        : torch::cat({item.value(), -start}, 1);
  }
  for (auto& [layer_path, lora] : contents.layers) {
    const double factor = lora.use_rslora() ? std::sqrt(2.0) : 2.0;
    lora.rank(2 * lora.rank())
        .alpha(lora.alpha() * factor)
        .init(LoRAInit::kaiming_uniform)
        .pissa_niter(0);
  }
  // The config's own patterns no longer hold: the layers' doubled ranks
  // and alphas are written instead.
  contents.as_configured.reset();
}

} // namespace detail
} // namespace torchlora
