#pragma once

// Giving every rank rank 0's copy of a whole model, so that only rank 0
// needs its files.

#include <torchlora/detail/check.h>
#include <torchlora/distributed/agreement.h>
#include <torchlora/distributed/collective.h>
#include <torchlora/distributed/world.h>
#include <torchlora/module_ref.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/types.h>

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
/// is an error naming it, on every rank, before anything is sent, as is a
/// tensor that cannot be sent (a quantized dtype) or written (an expanded
/// one). bool, int16, complex, fp16 and bf16 tensors travel converted, and
/// arrive exact. For a single-process World it does nothing.
///
/// Example:
/// ```
/// if (world.is_main()) {
///   torch::load(model, "base_model.pt");
/// }
/// torchlora::distributed::broadcast_state(model, world);
/// ```
namespace detail {

/// The dtype a tensor travels as through Gloo (which has no bool, int16,
/// complex or, on LibTorch 1.x, bf16), or Undefined when it cannot.
inline c10::ScalarType transport_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
    case at::kDouble:
    case at::kByte:
    case at::kChar:
    case at::kInt:
    case at::kLong:
      return dtype;
    case at::kHalf:
    case at::kBFloat16:
      return at::kFloat; // holds their values exactly
    case at::kBool:
      return at::kByte;
    case at::kShort:
      return at::kInt;
    case at::kComplexFloat:
      return at::kFloat; // as (real, imaginary) pairs
    case at::kComplexDouble:
      return at::kDouble;
    default:
      return at::ScalarType::Undefined;
  }
}

/// Whether some elements of `tensor` share memory (an expanded tensor), so
/// that it cannot be written element by element.
inline bool elements_share_memory(const at::Tensor& tensor) {
  for (int64_t dim = 0; dim < tensor.dim(); ++dim) {
    if (tensor.size(dim) > 1 && tensor.stride(dim) == 0) {
      return true;
    }
  }
  return false;
}

} // namespace detail

inline void broadcast_state(ModuleRef model, const World& world) {
  if (!world.is_distributed()) {
    return;
  }
  const auto generation = detail::next_agreement();
  std::vector<std::string> lines;
  std::vector<at::Tensor> tensors;
  // What this rank cannot do, told to the others before anything is sent.
  std::string problem;
  auto add = [&](const std::string& name, const at::Tensor& tensor) {
    if (!tensor.defined()) {
      return;
    }
    lines.push_back(detail::describe_tensor(name, tensor));
    tensors.push_back(tensor);
    if (!problem.empty()) {
      return;
    }
    if (detail::transport_dtype(tensor.scalar_type()) ==
        at::ScalarType::Undefined) {
      problem = TORCHLORA_PREFIX "broadcast_state cannot send " +
          detail::describe_tensor(name, tensor) +
          ": Gloo carries floating-point, integer, bool and complex tensors";
    } else if (detail::elements_share_memory(tensor)) {
      problem = TORCHLORA_PREFIX "broadcast_state cannot write into " +
          detail::describe_tensor(name, tensor) +
          ": its elements share memory (an expanded tensor); register a "
          "copy of its own (.contiguous()) instead";
    }
  };
  for (const auto& item : model.get().named_parameters(/*recurse=*/true)) {
    add(item.key(), item.value());
  }
  for (const auto& item : model.get().named_buffers(/*recurse=*/true)) {
    add(item.key(), item.value());
  }
  const auto all = detail::exchange_lines(
      world, "broadcast_state", generation, lines, problem);
  TORCH_CHECK(problem.empty(), problem);
  detail::check_same_tensors(
      all, 0, "broadcast_state cannot copy rank 0's", "tensor");
  at::NoGradGuard no_grad;
  for (auto& tensor : tensors) {
    auto flat = tensor.detach();
    if (flat.is_complex()) {
      flat = at::view_as_real(flat.contiguous());
    }
    std::vector<at::Tensor> buffers{
        flat.to(detail::transport_dtype(tensor.scalar_type())).contiguous()};
    detail::run_collective(
        world.group(),
        world.describe(),
        world.timeout(),
        "broadcast_state",
        [&] { return world.group()->broadcast(buffers); });
    if (world.is_main()) {
      continue; // rank 0's tensors are what was sent
    }
    auto received = buffers[0];
    if (tensor.is_complex()) {
      received = at::view_as_complex(received.to(
          tensor.scalar_type() == at::kComplexFloat ? at::kFloat
                                                    : at::kDouble));
    }
    tensor.detach().copy_(received);
  }
}

} // namespace distributed
} // namespace torchlora
