#pragma once

#include <torchlora/detail/check.h>

#include <torch/arg.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace torchlora {

/// How a new adapter's matrices start.
enum class LoRAInit {
  /// A Kaiming-uniform (a = sqrt(5)), B zeros: a fresh adapter changes nothing.
  kaiming_uniform,
  /// A normal with std 1/r, B zeros: a fresh adapter changes nothing.
  gaussian,
  /// A and B both random, so the adapter changes the output from the start.
  /// Meant for tests (peft's `init_lora_weights=False`).
  random,
  /// PiSSA: A and B from the weight's `rank` principal singular directions
  /// (`LoRAOptions::pissa_niter` > 0: a randomized SVD), and the base weight
  /// becomes the residual `W - s B A`, so the output is unchanged. Computed
  /// in float32 (float64 for a float64 weight). Linear layers only.
  pissa,
  /// OLoRA: `Q, R = qr(W)`, B the first `rank` columns of Q, A the first
  /// `rank` rows of R; the base weight becomes `W - s B A`. Linear only.
  olora,
};

/// The name of an init mode, as used in messages and `pretty_print`.
inline const char* to_string(LoRAInit init) {
  switch (init) {
    case LoRAInit::kaiming_uniform:
      return "kaiming_uniform";
    case LoRAInit::gaussian:
      return "gaussian";
    case LoRAInit::random:
      return "random";
    case LoRAInit::pissa:
      return "pissa";
    case LoRAInit::olora:
      return "olora";
  }
  return "unknown";
}

/// Options of one LoRA adapter: rank, scaling, dropout, init and dtype.
///
/// The adapter adds `scaling * (dropout(x) A^T) B^T` to the base output, with
/// `scaling = alpha / rank` (or `alpha / sqrt(rank)` with `use_rslora`).
///
/// Example:
/// ```
/// torchlora::LoRALinear q(
///     torch::nn::Linear(512, 512),
///     torchlora::LoRAOptions(8).alpha(16).dropout(0.05));
/// ```
struct LoRAOptions {
  /* implicit */ LoRAOptions(int64_t rank) : rank_(rank) {}

  /// Rank r of the update: A is `[r, in_features]`, B `[out_features, r]`.
  TORCH_ARG(int64_t, rank);

  /// Numerator of the scaling. Default: 1.
  TORCH_ARG(double, alpha) = 1.0;

  /// Dropout probability on the adapter's input only. Default: 0.
  TORCH_ARG(double, dropout) = 0.0;

  /// Scale by `alpha / sqrt(rank)` (rsLoRA) instead of `alpha / rank`.
  TORCH_ARG(bool, use_rslora) = false;

  /// How A and B start. Default: Kaiming-uniform A, zero B.
  TORCH_ARG(LoRAInit, init) = LoRAInit::kaiming_uniform;

  /// Dtype of A and B; unset means the base weight's dtype.
  TORCH_ARG(std::optional<torch::Dtype>, dtype) = std::nullopt;

  /// DoRA (weight-decomposed LoRA): a trainable magnitude `m` per output
  /// channel rescales the adapted layer, `y = (m / ||W + s B A||) (x (W + s
  /// B A)^T) + b`, the norm taken per output channel and detached from the
  /// gradient (as in peft and the DoRA paper, section 4.3).
  TORCH_ARG(bool, use_dora) = false;

  /// With `init(LoRAInit::pissa)`: 0 for an exact SVD, n > 0 for a
  /// randomized SVD with n subspace iterations (peft's "pissa_niter_<n>").
  TORCH_ARG(int64_t, pissa_niter) = 0;
};

/// The factor the adapter's product is multiplied by.
inline double lora_scaling(const LoRAOptions& options) {
  const auto rank = static_cast<double>(options.rank());
  return options.use_rslora() ? options.alpha() / std::sqrt(rank)
                              : options.alpha() / rank;
}

namespace detail {

/// Throws unless an adapter's `rank` is > 0: "<who> needs a rank > 0, got
/// <rank>" (every place that makes an adapter checks its rank here).
inline void check_adapter_rank(int64_t rank, const std::string& who) {
  TORCHLORA_CHECK(rank > 0, who, " needs a rank > 0, got ", rank);
}

/// Checks rank, alpha, dropout and dtype; throws a `torchlora:` error.
inline void check_lora_options(const LoRAOptions& options) {
  TORCHLORA_CHECK(
      options.rank() >= 0, "rank must be >= 0, got ", options.rank());
  TORCHLORA_CHECK(
      std::isfinite(options.alpha()) && options.alpha() > 0,
      "alpha must be a finite number > 0, got ",
      options.alpha());
  TORCHLORA_CHECK(
      options.dropout() >= 0 && options.dropout() < 1,
      "dropout must be in [0, 1), got ",
      options.dropout());
  // Not c10::isFloatingType: newer LibTorch counts float8 types too, which
  // have no matrix products to train with.
  const auto dtype = options.dtype();
  TORCHLORA_CHECK(
      !dtype || *dtype == torch::kFloat32 || *dtype == torch::kFloat64 ||
          *dtype == torch::kFloat16 || *dtype == torch::kBFloat16,
      "adapter dtype must be float32, float64, float16 or "
      "bfloat16, got ",
      dtype ? c10::toString(*dtype) : "none");
  TORCHLORA_CHECK(
      options.pissa_niter() >= 0,
      "pissa_niter must be >= 0 (0: an exact SVD), got ",
      options.pissa_niter());
  TORCHLORA_CHECK(
      options.pissa_niter() == 0 || options.init() == LoRAInit::pissa,
      "pissa_niter = ",
      options.pissa_niter(),
      " needs init(LoRAInit::pissa), got init ",
      to_string(options.init()));
}

} // namespace detail
} // namespace torchlora
