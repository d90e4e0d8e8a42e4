#pragma once

/// torchlora: LoRA (low-rank adaptation) for LibTorch. Include this header
/// and nothing else: it brings in <torch/torch.h> too.
///
/// Example:
/// ```
/// #include <torchlora/torchlora.h>
///
/// torchlora::LoRALinear layer(torch::nn::Linear(64, 32),
///                             torchlora::LoRAOptions(8).alpha(16));
/// ```

#include <torch/torch.h>

#include <torchlora/adapted_weights.h>
#include <torchlora/adapter_io.h>
#include <torchlora/adapters.h>
#include <torchlora/attention.h>
#include <torchlora/blas_threads.h>
#include <torchlora/clone.h>
#include <torchlora/config.h>
#include <torchlora/conv.h>
#include <torchlora/embedding.h>
#include <torchlora/inject.h>
#include <torchlora/layer.h>
#include <torchlora/layer_base.h>
#include <torchlora/linear.h>
#include <torchlora/merge.h>
#include <torchlora/module_ref.h>
#include <torchlora/options.h>
#include <torchlora/parameters.h>
#include <torchlora/quantize.h>
#include <torchlora/quantized_linear.h>
#include <torchlora/routing.h>
#include <torchlora/safetensors.h>
#include <torchlora/targeting.h>
#include <torchlora/version.h>
