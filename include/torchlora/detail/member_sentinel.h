#pragma once

// A tensor that refuses every operator with a torchlora: message of its own:
// what an adapted member of LibTorch's modules (TransformerEncoderLayer's
// `linear1->weight`, MultiheadAttention's `in_proj_weight`) holds outside a
// torchlora::AdaptedWeights scope, so that a forward which forgot the scope
// fails loudly instead of using a weight without its adapters. Not part of
// the API.
//
// How: the tensor carries only the dispatch key PrivateUse3 (a key reserved
// for out-of-tree backends, which nothing in LibTorch registers). Any
// operator that receives it is dispatched to the fallback registered here for
// that key, which throws the sentinel's message. Its sizes, dtype and
// `defined()` are those of the weight it stands for, so code that only looks
// at shapes keeps working. Reading its memory without an operator (the
// TorchScript serializer) is LibTorch's "Cannot access storage of" error,
// followed by the message.

#include <torchlora/detail/check.h>

#include <torch/library.h>
#include <torch/types.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>

#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace torchlora {
namespace detail {

/// The sentinel's implementation: no storage, its message.
class MemberSentinelImpl final : public c10::TensorImpl {
 public:
  MemberSentinelImpl(const torch::Tensor& like, std::string message)
      : c10::TensorImpl(
            c10::DispatchKeySet(c10::DispatchKey::PrivateUse3),
            like.dtype(),
            like.device()),
        message_(std::move(message)) {
    set_sizes_contiguous(like.sizes());
    // What reads memory without an operator (saving a TorchScript module
    // that holds it) gets an error naming it too, not a null storage.
    set_storage_access_should_throw();
  }

  const std::string& message() const {
    return message_;
  }

 protected:
  /// The name LibTorch's "Cannot access storage of ..." error gives.
  const char* tensorimpl_type_name() const override {
    return message_.c_str();
  }

 private:
  std::string message_;
};

/// The message of the first sentinel among `stack`'s tensors, if any.
inline const std::string* sentinel_message(const torch::jit::Stack& stack) {
  for (const auto& value : stack) {
    if (value.isTensor()) {
      const auto* sentinel = dynamic_cast<const MemberSentinelImpl*>(
          value.toTensor().unsafeGetTensorImpl());
      if (sentinel != nullptr) {
        return &sentinel->message();
      }
    } else if (value.isTensorList()) {
      for (const auto& tensor : value.toTensorVector()) {
        const auto* sentinel = dynamic_cast<const MemberSentinelImpl*>(
            tensor.unsafeGetTensorImpl());
        if (sentinel != nullptr) {
          return &sentinel->message();
        }
      }
    }
  }
  return nullptr;
}

inline void refuse_sentinel(
    const c10::OperatorHandle& op,
    torch::jit::Stack* stack) {
  const auto* message = sentinel_message(*stack);
  TORCH_CHECK(
      false,
      message != nullptr
          ? *message
          : std::string(TORCHLORA_PREFIX "a weight computed from "
                                         "LoRA adapters was used outside "
                                         "torchlora::AdaptedWeights"),
      " (",
      op.schema().name(),
      " received it)");
}

/// Registers the fallback once per process. Another library's fallback for
/// PrivateUse3 is an error that says so.
inline void register_sentinel_fallback() {
  static std::once_flag once;
  static std::unique_ptr<torch::Library> library;
  std::call_once(once, [] {
    try {
      library = std::make_unique<torch::Library>(
          torch::Library::IMPL,
          "_",
          c10::DispatchKey::PrivateUse3,
          __FILE__,
          __LINE__);
      library->fallback(
          torch::CppFunction::makeFromBoxedFunction<&refuse_sentinel>());
    } catch (const c10::Error&) {
      // Registered already: by another copy of these headers in another
      // shared library (it throws the same messages), or by a backend of
      // its own, which `check_sentinel_fallback` tells apart.
    }
  });
}

/// Throws when operators on a sentinel do not reach a torchlora fallback
/// (another library took the key PrivateUse3 for a backend of its own).
inline void check_sentinel_fallback(const torch::Tensor& sentinel) {
  static const bool ours = [&] {
    try {
      // An operator that every shape accepts and that has no kernel for
      // all backends at once (those would run before the fallback).
      (void)at::as_strided(sentinel, sentinel.sizes(), sentinel.strides());
    } catch (const c10::Error& error) {
      return std::string(error.what_without_backtrace())
                 .rfind(TORCHLORA_PREFIX, 0) == 0;
    }
    return false;
  }();
  TORCHLORA_CHECK(
      ours,
      "the dispatch key PrivateUse3 is taken by another library's "
      "backend, so torchlora cannot guard the weights it computes into "
      "LibTorch's modules (AdaptedWeights); merge() such models instead");
}

/// A sentinel standing for `like` (its sizes, dtype and device): every
/// operator that receives it throws `message`.
inline torch::Tensor member_sentinel(
    const torch::Tensor& like,
    std::string message) {
  register_sentinel_fallback();
  auto sentinel =
      at::detail::make_tensor<MemberSentinelImpl>(like, std::move(message));
  check_sentinel_fallback(sentinel);
  return sentinel;
}

/// True when `tensor` is a sentinel.
inline bool is_member_sentinel(const torch::Tensor& tensor) {
  return tensor.defined() &&
      dynamic_cast<const MemberSentinelImpl*>(tensor.unsafeGetTensorImpl()) !=
      nullptr;
}

} // namespace detail
} // namespace torchlora
