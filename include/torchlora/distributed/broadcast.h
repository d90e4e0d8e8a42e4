#pragma once

// Giving every rank rank 0's copy of a whole model, so that only rank 0
// needs its files.

#include <torchlora/distributed/agreement.h>
#include <torchlora/distributed/collective.h>
#include <torchlora/distributed/world.h>
#include <torchlora/module_ref.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>

#include <string>
#include <vector>

namespace torchlora {
namespace distributed {

/// Copies rank 0's parameters and buffers, all of them, trainable or not,
/// into the same tensors of every other rank's `model`, in place. For
/// models that rank 0 alone has trained or loaded from its own files: the
/// other machines need no copy of the checkpoint. Every rank must call it,
/// with a model of the same structure: the ranks first compare their
/// tensors' names, shapes and dtypes through the store, and a difference
/// is an error naming it, on every rank, before anything is sent. For a
/// single-process World it does nothing.
///
/// Example:
/// ```
/// if (world.is_main()) {
///   torch::load(model, "base_model.pt");
/// }
/// torchlora::distributed::broadcast_state(model, world);
/// ```
inline void broadcast_state(ModuleRef model, const World& world) {
  if (!world.is_distributed()) {
    return;
  }
  const auto generation = detail::next_agreement();
  std::vector<std::string> lines;
  std::vector<at::Tensor> tensors;
  auto add = [&](const std::string& name, const at::Tensor& tensor) {
    if (tensor.defined()) {
      lines.push_back(detail::describe_tensor(name, tensor));
      tensors.push_back(tensor);
    }
  };
  for (const auto& item : model.get().named_parameters(/*recurse=*/true)) {
    add(item.key(), item.value());
  }
  for (const auto& item : model.get().named_buffers(/*recurse=*/true)) {
    add(item.key(), item.value());
  }
  const auto all = detail::exchange_lines(
      world,
      "torchlora/broadcast_state/" + std::to_string(generation) + "/",
      lines,
      "",
      "broadcast_state");
  detail::check_same_tensors(
      all, 0, "broadcast_state cannot copy rank 0's", "tensor");
  at::NoGradGuard no_grad;
  for (auto& tensor : tensors) {
    // Gloo sends contiguous tensors; fp16 and bf16 go as fp32 (1.x's
    // Gloo has no bf16), which holds their values exactly.
    const bool half = tensor.scalar_type() == at::kHalf ||
        tensor.scalar_type() == at::kBFloat16;
    std::vector<at::Tensor> buffers{
        half ? tensor.detach().to(at::kFloat) : tensor.detach().contiguous()};
    detail::run_collective(
        world.group(),
        world.describe(),
        world.timeout(),
        "broadcast_state",
        [&] { return world.group()->broadcast(buffers); });
    if (buffers[0].data_ptr() != tensor.data_ptr()) {
      tensor.detach().copy_(buffers[0]);
    }
  }
}

} // namespace distributed
} // namespace torchlora
