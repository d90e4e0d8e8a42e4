#pragma once
// Training memory of LoRA against full fine-tuning: a stack of 8 Linear
// layers 1024 wide (with ReLU between, whose activations autograd keeps)
// trained for a few Adam steps. Counted everywhere: bytes of parameters,
// gradients and optimizer state; on CUDA also the allocator's peak.

#include "report.h"

#include <torchlora/torchlora.h>

#if defined(TORCHLORA_BENCH_CUDA_STATS)
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <malloc.h>
#include <string>
#include <vector>

namespace bench {

inline int64_t bytes_of(const torch::Tensor& tensor) {
  return tensor.defined()
      ? tensor.numel() * static_cast<int64_t>(tensor.element_size())
      : 0;
}

/// What `train_and_measure` trains: every weight, or LoRA/DoRA adapters;
/// LoRA also over a bf16 model and over int8 and NF4 (plain and
/// double-quantized) bases (`torchlora::quantize`).
enum class Method {
  full,
  lora,
  dora,
  lora_bf16,
  lora_int8,
  lora_nf4,
  lora_nf4_dq
};

inline MemoryRow train_and_measure(torch::Device device, Method method) {
  const bool lora = method != Method::full;
  torch::manual_seed(0);
  torch::nn::Sequential model;
  for (int i = 0; i < 8; ++i) {
    model->push_back(torch::nn::Linear(1024, 1024));
    model->push_back(torch::nn::ReLU());
  }
  model->to(device);
  const auto dtype =
      method == Method::lora_bf16 ? torch::kBFloat16 : torch::kFloat32;
  model->to(dtype);
  if (method == Method::lora_int8 || method == Method::lora_nf4 ||
      method == Method::lora_nf4_dq) {
    torchlora::quantize(
        model,
        torchlora::QuantizeOptions().quantization(
            torchlora::QuantizedLinearOptions()
                .format(
                    method == Method::lora_int8
                        ? torchlora::QuantizedFormat::int8
                        : torchlora::QuantizedFormat::nf4)
                .double_quant(method == Method::lora_nf4_dq)));
  }
  if (lora) {
    torchlora::inject_lora(
        model,
        torchlora::LoRAConfig(8)
            .alpha(16)
            .use_dora(method == Method::dora)
            .target_modules({"all-linear"}));
  }
  std::vector<torch::Tensor> trainable;
  for (const auto& parameter : model->parameters()) {
    if (parameter.requires_grad()) {
      trainable.push_back(parameter);
    }
  }
#if defined(TORCHLORA_BENCH_CUDA_STATS)
  if (device.is_cuda()) {
    torch::cuda::synchronize();
    c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  }
#endif
  torch::optim::Adam optimizer(trainable, torch::optim::AdamOptions(1e-4));
  const auto x = torch::randn(
      {256, 1024}, torch::TensorOptions().device(device).dtype(dtype));
  for (int step = 0; step < 3; ++step) {
    optimizer.zero_grad();
    model->forward(x).pow(2).mean().backward();
    optimizer.step();
  }
  MemoryRow row;
  row.device = device.is_cuda() ? "cuda" : "cpu";
  row.method = method == Method::dora ? "DoRA r=8"
      : method == Method::lora_bf16   ? "LoRA r=8, bf16 model"
      : method == Method::lora_int8   ? "LoRA r=8, int8 base"
      : method == Method::lora_nf4    ? "LoRA r=8, NF4 base"
      : method == Method::lora_nf4_dq ? "LoRA r=8, NF4 base, double quant"
      : lora                          ? "LoRA r=8"
                                      : "full fine-tune";
  for (const auto& parameter : model->parameters()) {
    row.parameter_bytes += bytes_of(parameter);
    row.gradient_bytes += bytes_of(parameter.grad());
  }
  for (const auto& item : optimizer.state()) {
    const auto& state =
        static_cast<const torch::optim::AdamParamState&>(*item.second);
    row.optimizer_bytes += bytes_of(state.exp_avg()) +
        bytes_of(state.exp_avg_sq()) + bytes_of(state.max_exp_avg_sq());
  }
#if defined(TORCHLORA_BENCH_CUDA_STATS)
  if (device.is_cuda()) {
    torch::cuda::synchronize();
    row.peak_bytes = c10::cuda::CUDACachingAllocator::getDeviceStats(0)
                         .allocated_bytes[0]
                         .peak;
  }
#endif
  return row;
}

/// Full fine-tuning, LoRA and DoRA on the CPU, and on CUDA when present.
inline std::vector<MemoryRow> memory_rows() {
  std::vector<MemoryRow> rows;
  std::vector<torch::Device> devices = {torch::kCPU};
  if (torch::cuda::is_available()) {
    devices.emplace_back(torch::kCUDA);
  }
  for (const auto& device : devices) {
    rows.push_back(train_and_measure(device, Method::full));
    rows.push_back(train_and_measure(device, Method::lora));
    rows.push_back(train_and_measure(device, Method::dora));
    for (const auto method :
         {Method::lora_bf16,
          Method::lora_int8,
          Method::lora_nf4,
          Method::lora_nf4_dq}) {
      rows.push_back(train_and_measure(device, method));
    }
  }
  return rows;
}

/// Bytes the heap has handed out now (malloc's own count).
inline int64_t heap_in_use() {
  const auto info = mallinfo2();
  return static_cast<int64_t>(info.uordblks + info.hblkhd);
}

/// What `merge` holds beyond the model's tensors, with and without the copy
/// of each weight that makes `unmerge` exact.
inline MergeMemoryRow merge_and_measure(bool keep_original) {
  torch::manual_seed(0);
  torch::nn::Sequential model;
  for (int i = 0; i < 8; ++i) {
    model->push_back(torch::nn::Linear(1024, 1024));
  }
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(8)
          .alpha(16)
          .init(torchlora::LoRAInit::random)
          .target_modules({"all-linear"}));
  MergeMemoryRow row;
  row.method = keep_original ? "merge (copy kept, exact unmerge)"
                             : "merge, keep_original(false)";
  for (const auto& parameter : model->parameters()) {
    row.parameter_bytes += bytes_of(parameter);
  }
  const auto before = heap_in_use();
  torchlora::merge(
      model, torchlora::MergeOptions().keep_original(keep_original));
  row.extra_bytes = heap_in_use() - before;
  return row;
}

inline std::vector<MergeMemoryRow> merge_memory_rows() {
  return {merge_and_measure(true), merge_and_measure(false)};
}

} // namespace bench
