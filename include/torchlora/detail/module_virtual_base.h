#pragma once

#include <torch/nn/module.h>
#include <torch/version.h>

#include <type_traits>
#include <utility>

/// LibTorch before 2.2 derives `torch::nn::Cloneable` from
/// `torch::nn::Module` virtually: there the most-derived class constructs
/// `Module`, so a LoRA kind's constructor names it too. From 2.2 on `Module`
/// is an ordinary base, constructed (and named) by `LoRALayerImpl`, and
/// naming it in the kind would not compile.
#if TORCH_VERSION_MAJOR < 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 2)
#define TORCHLORA_MODULE_IS_VIRTUAL_BASE 1
#define TORCHLORA_NAME_VIRTUAL_MODULE(name) torch::nn::Module(name),
#else
#define TORCHLORA_MODULE_IS_VIRTUAL_BASE 0
#define TORCHLORA_NAME_VIRTUAL_MODULE(name)
#endif

namespace torchlora {
namespace detail {

/// True when `torch::nn::Module` is a virtual base of `T` (a downcast from a
/// virtual base is ill-formed, so the specialization drops out).
template <typename T, typename = void>
struct module_is_virtual_base : std::true_type {};
template <typename T>
struct module_is_virtual_base<
    T,
    std::void_t<decltype(static_cast<T*>(std::declval<torch::nn::Module*>()))>>
    : std::false_type {};

} // namespace detail
} // namespace torchlora
