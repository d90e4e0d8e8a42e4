#pragma once

// Checking an archive against a module before `load` reads it: LibTorch's
// `Module::load` replaces each tensor as it goes (`set_`, whatever the
// dtype or shape), so a checkpoint of another kind would leave quantized
// codes half replaced. Not part of the API.

#include <torchlora/detail/check.h>

#include <torch/nn/module.h>
#include <torch/serialize/input-archive.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <string>

namespace torchlora {
namespace detail {

/// Throws unless `archive` holds, for each of `module`'s own parameters
/// (not its children's), a tensor it can take: a floating-point one where
/// it holds floats, an integer one of the same dtype and shape where it
/// holds codes; when it holds codes, every tensor present and of its shape.
/// `what` names the module in the message.
inline void check_archive_fits(
    const torch::nn::Module& module,
    torch::serialize::InputArchive& archive,
    const std::string& what) {
  bool codes = false;
  for (const auto& item : module.named_parameters(/*recurse=*/false)) {
    codes =
        codes || (item.value().defined() && !item.value().is_floating_point());
  }
  for (const auto& item : module.named_parameters(/*recurse=*/false)) {
    const auto& name = item.key();
    const auto& tensor = item.value();
    if (!tensor.defined()) {
      continue;
    }
    torch::Tensor stored;
    if (!archive.try_read(name, stored)) {
      TORCHLORA_CHECK(
          !codes,
          "cannot load this ",
          what,
          ": the archive has no '",
          name,
          "', which its quantized weight needs. This layer was not "
          "changed.");
      continue;
    }
    // With codes, every shape depends on the format and block size.
    const bool fits = tensor.is_floating_point()
        ? stored.is_floating_point() &&
            (!codes || stored.sizes() == tensor.sizes())
        : stored.scalar_type() == tensor.scalar_type() &&
            stored.sizes() == tensor.sizes();
    TORCHLORA_CHECK(
        fits,
        "cannot load '",
        name,
        "' of ",
        c10::toString(stored.scalar_type()),
        " and shape ",
        stored.sizes(),
        " into this ",
        what,
        ", which holds ",
        c10::toString(tensor.scalar_type()),
        " of shape ",
        tensor.sizes(),
        ". A float checkpoint loads before torchlora::quantize; a quantized "
        "one into a model quantized the same way (format, block size). This "
        "layer was not changed.");
  }
}

} // namespace detail
} // namespace torchlora
