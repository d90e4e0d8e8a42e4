#pragma once

#include <torchlora/detail/check.h>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <c10/util/Exception.h>

#include <memory>

namespace torchlora {

/// A model argument: a `torch::nn::Module&`, a `std::shared_ptr` to a module,
/// or a module holder (`torch::nn::Sequential`, a `TORCH_MODULE` type). Model
/// functions take it so that every form works alike.
///
/// Example:
/// ```
/// torch::nn::Sequential seq(torch::nn::Linear(4, 4));
/// torchlora::merge(seq);        // a holder
/// torchlora::merge(*seq);       // a reference
/// torchlora::merge(seq.ptr());  // a shared_ptr
/// ```
class ModuleRef {
 public:
  /* implicit */ ModuleRef(torch::nn::Module& module) : module_(&module) {}

  template <typename ModuleType>
  /* implicit */ ModuleRef(const std::shared_ptr<ModuleType>& module)
      : module_(module.get()) {
    TORCHLORA_CHECK(
        module_ != nullptr,
        "got a null std::shared_ptr where a model was expected");
  }

  template <typename ModuleType>
  /* implicit */ ModuleRef(const torch::nn::ModuleHolder<ModuleType>& module)
      : module_(module.is_empty() ? nullptr : module.ptr().get()) {
    TORCHLORA_CHECK(
        module_ != nullptr,
        "got an empty module holder (nullptr) where a model was "
        "expected");
  }

  torch::nn::Module& get() const {
    return *module_;
  }

 private:
  torch::nn::Module* module_;
};

} // namespace torchlora
