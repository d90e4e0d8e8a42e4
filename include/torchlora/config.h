#pragma once

#include <torchlora/options.h>
#include <torchlora/parameters.h>

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

/// Declares a chained setter and a getter that forward to the `LoRAOptions`
/// member `lora_`, so that `LoRAConfig(8).alpha(16).target_modules(...)` works.
#define TORCHLORA_LORA_OPTION(T, name)              \
  auto name(const T& new_##name)->decltype(*this) { \
    lora_.name(new_##name);                         \
    return *this;                                   \
  }                                                 \
  const T& name() const noexcept {                  \
    return lora_.name();                            \
  }

namespace torchlora {

/// Everything `inject_lora` needs: the adapter's options (as in `LoRAOptions`)
/// and which layers of a model get it, with Python peft's semantics.
///
/// Example:
/// ```
/// auto config = torchlora::LoRAConfig(8)
///                   .alpha(16)
///                   .dropout(0.05)
///                   .target_modules({"q_proj", "v_proj"})
///                   .rank_pattern({{"v_proj", 4}});
/// ```
struct LoRAConfig {
  /// Ordered `{regex, rank}` overrides; the first match wins.
  using RankPattern = std::vector<std::pair<std::string, int64_t>>;
  /// Ordered `{regex, alpha}` overrides; the first match wins.
  using AlphaPattern = std::vector<std::pair<std::string, double>>;

  /* implicit */ LoRAConfig(int64_t rank) : lora_(rank) {}

  /// Rank r (see `LoRAOptions::rank`); > 0.
  TORCHLORA_LORA_OPTION(int64_t, rank)
  /// Scaling numerator (see `LoRAOptions::alpha`). Default: 1.
  TORCHLORA_LORA_OPTION(double, alpha)
  /// Dropout on the adapter input (see `LoRAOptions::dropout`). Default: 0.
  TORCHLORA_LORA_OPTION(double, dropout)
  /// rsLoRA scaling `alpha / sqrt(r)`. Default: false.
  TORCHLORA_LORA_OPTION(bool, use_rslora)
  /// How A and B start (see `LoRAInit`).
  TORCHLORA_LORA_OPTION(LoRAInit, init)
  /// Adapter dtype; unset means each base weight's dtype.
  TORCHLORA_LORA_OPTION(std::optional<torch::Dtype>, dtype)
  /// DoRA's magnitude rescaling (see `LoRAOptions::use_dora`).
  TORCHLORA_LORA_OPTION(bool, use_dora)
  /// Randomized PiSSA's iterations (see `LoRAOptions::pissa_niter`).
  TORCHLORA_LORA_OPTION(int64_t, pissa_niter)

  /// Module names to adapt: a module matches when its dotted path equals an
  /// entry or ends with "." + entry. `{"all-linear"}` means every Linear but
  /// output heads (last path segment "lm_head", "head", "classifier" or
  /// "score"; peft leaves out the model's output layer).
  TORCH_ARG(std::vector<std::string>, target_modules) = {};

  /// A regex that must match a module's whole dotted path (ECMAScript syntax;
  /// peft's single-string `target_modules`). Use it or `target_modules`.
  TORCH_ARG(std::string, target_regex) = "";

  /// Names never to adapt, matched like `target_modules`; they win.
  TORCH_ARG(std::vector<std::string>, exclude_modules) = {};

  /// A regex of paths never to adapt (whole-path match); it wins.
  TORCH_ARG(std::string, exclude_regex) = "";

  /// Layer indices to adapt (with `target_modules` only): a module's layer
  /// index is the number of the last `<name>.<n>.` in its path, `<name>`
  /// being any segment or one of `layers_pattern` (peft's rule; unlike peft,
  /// a list that is the path's first segment, `blocks.0.fc`, counts too).
  TORCH_ARG(std::vector<int64_t>, layers_to_transform) = {};

  /// Names of the layer lists (e.g. "layers", "blocks") that
  /// `layers_to_transform` counts in.
  TORCH_ARG(std::vector<std::string>, layers_pattern) = {};

  /// Per-module ranks: the first regex, in order, that matches the path or a
  /// dot-bounded suffix of it sets the rank.
  TORCH_ARG(RankPattern, rank_pattern) = {};

  /// Per-module alphas, matched like `rank_pattern`.
  TORCH_ARG(AlphaPattern, alpha_pattern) = {};

  /// The adapter's name. Default: "default".
  TORCH_ARG(std::string, adapter_name) = "default";

  /// Modules trained in full (never adapted): as in peft, those whose path
  /// ends with an entry, without a dot boundary ("head" names "lm_head").
  TORCH_ARG(std::vector<std::string>, modules_to_save) = {};

  /// Which biases stay trainable. Default: none.
  TORCH_ARG(LoRABias, bias) = LoRABias::none;

  // TORCH_ARG leaves the access private.
 public:
  /// The options every adapted layer gets before rank/alpha patterns.
  const LoRAOptions& lora_options() const noexcept {
    return lora_;
  }

 private:
  LoRAOptions lora_;
};

} // namespace torchlora

#undef TORCHLORA_LORA_OPTION
