#pragma once

// Moving a module's own tensors without casting integer ones: LibTorch's
// `Module::to(dtype)` casts every tensor, quantized codes included. Not
// part of the API.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <c10/util/Optional.h>

namespace torchlora {
namespace detail {

/// Moves `module`'s own tensors (not its children's) to `device` and casts
/// the floating-point ones to `dtype`: integer tensors keep their dtype
/// (LibTorch's `Module::to` would cast quantized codes to float).
inline void move_own_tensors(
    torch::nn::Module& module,
    const c10::optional<torch::Device>& device,
    const c10::optional<torch::Dtype>& dtype,
    bool non_blocking) {
  torch::NoGradGuard no_grad;
  const auto move = [&](torch::Tensor& tensor) {
    if (!tensor.defined()) {
      return;
    }
    auto options = tensor.options();
    if (device) {
      options = options.device(*device);
    }
    if (dtype && tensor.is_floating_point()) {
      options = options.dtype(*dtype);
    }
    tensor.set_data(tensor.to(options, non_blocking));
  };
  for (auto& item : module.named_parameters(/*recurse=*/false)) {
    move(item.value());
  }
  for (auto& item : module.named_buffers(/*recurse=*/false)) {
    move(item.value());
  }
}

} // namespace detail
} // namespace torchlora
