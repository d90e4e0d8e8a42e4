// LoRA's cost against a plain frozen Linear, measured in the same run.
//
// Variants: plain (frozen Linear, the floor), full_ft (weights trainable),
// seed (y = linear(x) + linear(linear(x, A), B) * s, the seed's formulation),
// torchlora (LoRALinear, unmerged) and merged (LoRALinear after merge()).
// Each as a forward without grad and a forward + backward with the input
// requiring grad (as inside a network). CPU fp32 always; CUDA bf16 and fp32
// when a GPU is present. Benchmark names:
//   <device>/<dtype>/<rows>x<in>x<out>/r<rank>/<variant>/<fwd|fwdbwd>
//
//   linear_benchmark                        Google Benchmark output
//   linear_benchmark --report docs/perf-cpu  also a table of ratios against
//                                             plain, written as .json and .svg
//   scripts/benchmark-report.sh             the report with the settings of
//                                             docs/PERFORMANCE.md
#include "memory_benchmark.h"
#include "report.h"

#include <torchlora/torchlora.h>

#include <benchmark/benchmark.h>

#include <malloc.h>
#include <chrono>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

using bench::Case;

/// A layer under test and the tensors its backward computes gradients for.
struct Layer {
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  std::vector<torch::Tensor> trainable;
};

torch::nn::Linear base_linear(const Case& c, bool trainable) {
  torch::nn::Linear linear(c.in, c.out);
  linear->to(c.device, c.dtype);
  for (auto& parameter : linear->parameters()) {
    parameter.set_requires_grad(trainable);
  }
  return linear;
}

Layer make_layer(const std::string& variant, const Case& c) {
  torch::manual_seed(0);
  if (variant == "plain") {
    auto linear = base_linear(c, false);
    return {[linear](const torch::Tensor& x) mutable { return linear(x); }, {}};
  }
  if (variant == "full_ft") {
    auto linear = base_linear(c, true);
    return {
        [linear](const torch::Tensor& x) mutable { return linear(x); },
        linear->parameters()};
  }
  const auto options = torch::TensorOptions().device(c.device).dtype(c.dtype);
  if (variant == "seed") {
    auto linear = base_linear(c, false);
    auto A =
        (torch::randn({c.rank, c.in}, options) * 0.02).requires_grad_(true);
    auto B =
        (torch::randn({c.out, c.rank}, options) * 0.02).requires_grad_(true);
    const double scaling = 2.0;
    return {
        [=](const torch::Tensor& x) mutable {
          namespace F = torch::nn::functional;
          return linear(x) + F::linear(F::linear(x, A), B) * scaling;
        },
        {A, B}};
  }
  torchlora::LoRALinear layer(
      base_linear(c, false),
      torchlora::LoRAOptions(c.rank)
          .alpha(2.0 * static_cast<double>(c.rank))
          .init(torchlora::LoRAInit::random));
  if (variant == "merged") {
    // Serving: nothing trains, the backward reaches the input only.
    layer->merge();
    return {[layer](const torch::Tensor& x) mutable { return layer(x); }, {}};
  }
  return {
      [layer](const torch::Tensor& x) mutable { return layer(x); },
      layer->adapter_parameters()};
}

/// Calls per timed block on CUDA: small kernels are timed in groups, so that
/// launching and synchronizing do not dominate.
constexpr int kCudaCallsPerBlock = 20;

void run(
    benchmark::State& state,
    const Layer& layer,
    const Case& c,
    bool backward) {
  torch::manual_seed(1);
  const auto options = torch::TensorOptions().device(c.device).dtype(c.dtype);
  const auto x = torch::randn({c.rows, c.in}, options).requires_grad_(backward);
  const auto grad_output = torch::randn({c.rows, c.out}, options);
  std::vector<torch::Tensor> inputs = {x};
  inputs.insert(inputs.end(), layer.trainable.begin(), layer.trainable.end());
  auto call = [&] {
    if (backward) {
      const auto y = layer.forward(x);
      auto grads = torch::autograd::grad({y}, inputs, {grad_output});
      benchmark::DoNotOptimize(grads.front().data_ptr());
    } else {
      torch::NoGradGuard no_grad;
      const auto y = layer.forward(x);
      benchmark::DoNotOptimize(y.data_ptr());
    }
  };
  const bool cuda = c.device.is_cuda();
  for (auto _ : state) {
    if (!cuda) {
      call();
      continue;
    }
    torch::cuda::synchronize();
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < kCudaCallsPerBlock; ++i) {
      call();
    }
    torch::cuda::synchronize();
    const std::chrono::duration<double> elapsed =
        std::chrono::steady_clock::now() - start;
    state.SetIterationTime(elapsed.count() / kCudaCallsPerBlock);
  }
}

std::vector<Case> cases() {
  std::vector<Case> list = {
      {torch::kCPU, torch::kFloat32, 2048, 1024, 1024, 16},
      {torch::kCPU, torch::kFloat32, 16, 1024, 1024, 16},
  };
  if (torch::cuda::is_available()) {
    for (const auto dtype : {torch::kBFloat16, torch::kFloat32}) {
      list.push_back({torch::kCUDA, dtype, 8192, 4096, 4096, 16});
      list.push_back({torch::kCUDA, dtype, 8192, 4096, 4096, 64});
      list.push_back({torch::kCUDA, dtype, 32, 4096, 4096, 16});
    }
  }
  return list;
}

void register_all() {
  for (const auto& c : cases()) {
    for (const auto* variant : bench::kVariants) {
      const auto layer = make_layer(variant, c);
      for (const bool backward : {false, true}) {
        const auto name = bench::benchmark_name(c, variant, backward);
        auto* benchmark = benchmark::RegisterBenchmark(
            name.c_str(), [layer, c, backward](benchmark::State& state) {
              run(state, layer, c, backward);
            });
        benchmark->Unit(benchmark::kMillisecond)->MinWarmUpTime(0.1);
        if (c.device.is_cuda()) {
          benchmark->UseManualTime();
        }
      }
    }
  }
}

} // namespace

int main(int argc, char** argv) {
  // Large blocks from the heap, not fresh mmaps: every variant allocates
  // its output the same way, without page faults that would favour
  // whichever runs later.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  std::string report;
  std::vector<char*> arguments;
  for (int i = 0; i < argc; ++i) {
    const std::string argument = argv[i];
    if (argument == "--report" && i + 1 < argc) {
      report = argv[++i];
    } else {
      arguments.push_back(argv[i]);
    }
  }
  int count = static_cast<int>(arguments.size());
  register_all();
  benchmark::Initialize(&count, arguments.data());
  if (benchmark::ReportUnrecognizedArguments(count, arguments.data())) {
    return 1;
  }
  bench::CapturingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  if (!report.empty()) {
    const auto rows = bench::ratio_rows(reporter.times());
    const auto memory = bench::memory_rows();
    bench::print_tables(rows, memory, std::cout);
    bench::write_report(report, rows, memory);
  }
  return 0;
}
