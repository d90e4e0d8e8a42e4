#pragma once

/// torchlora for TorchScript modules: LoRA on a model scripted or traced in
/// Python and loaded with `torch::jit::load`. Not included by
/// <torchlora/torchlora.h> (it brings in LibTorch's TorchScript headers);
/// include it next to it.
///
/// Example:
/// ```
/// #include <torchlora/jit.h>
///
/// auto module = torch::jit::load("model.pt");
/// auto lora = torchlora::jit::inject_lora(
///     module, torchlora::LoRAConfig(8).alpha(16).target_modules({"fc1"}));
/// ```

#include <torch/script.h>

#include <torchlora/jit/script_lora.h>
#include <torchlora/torchlora.h>
