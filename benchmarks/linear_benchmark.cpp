// LoRA's cost against a plain frozen Linear, measured in the same run.
//
// Variants: plain (frozen Linear, the floor), full_ft (weights trainable),
// unfused (y = linear(x) + linear(linear(x, A), B) * s, the straightforward
// formulation), torchlora (LoRALinear, unmerged) and merged (LoRALinear after
// merge()), and the Linear inside a TorchScript module, trainable
// (script_full_ft) or with torchlora::jit's LoRA (script_lora, a
// torchlora::jit::AdaptedWeights per call, as per training step). Each as a
// forward without grad and a forward + backward with the
// input requiring grad (as inside a network). CPU fp32 always; CUDA bf16 and
// fp32 when a GPU is present. Benchmark names:
//   <device>/<dtype>/<rows>x<in>x<out>/r<rank>/<variant>/<fwd|fwdbwd>
//
//   linear_benchmark                        Google Benchmark output
//   linear_benchmark --report docs/perf-cpu  also a table of ratios against
//                                             plain, written as .json and .svg;
//                                             the ratios timed in pairs
//                                             (--paired_rounds,
//                                             --paired_block_s,
//                                             --paired_precision,
//                                             --paired_max_rounds)
//   scripts/benchmark-report.sh             the report with the settings of
//                                             docs/PERFORMANCE.md
#include "memory_benchmark.h"
#include "report.h"

#include <torchlora/jit.h>

#include <torch/csrc/jit/passes/tensorexpr_fuser.h>
#include <torchlora/torchlora.h>

#include <benchmark/benchmark.h>

#include <malloc.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
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

/// The case's Linear (the values `base_linear` gives) inside a TorchScript
/// module, as scripting a Python model holding an `nn.Linear` named `fc`
/// makes it: the child's class is PyTorch's Linear.
torch::jit::Module script_model(const Case& c, bool trainable) {
  const auto linear = base_linear(c, trainable);
  torch::jit::Module fc(
      c10::QualifiedName("__torch__.torch.nn.modules.linear.Linear"));
  fc.register_parameter("weight", linear->weight, false);
  fc.register_parameter("bias", linear->bias, false);
  fc.define(
      "def forward(self, x):\n"
      "  return torch.linear(x, self.weight, self.bias)\n");
  torch::jit::Module model(c10::QualifiedName("__torch__.Model"));
  model.register_module("fc", fc);
  model.define("def forward(self, x):\n  return self.fc.forward(x)\n");
  model.eval();
  return model;
}

Layer make_layer(const std::string& variant, const Case& c) {
  torch::manual_seed(0);
  if (variant == "script_full_ft") {
    auto model = script_model(c, true);
    std::vector<torch::Tensor> trainable;
    for (const auto& parameter : model.parameters()) {
      trainable.push_back(parameter);
    }
    return {
        [model](const torch::Tensor& x) mutable {
          return model.forward({x}).toTensor();
        },
        trainable};
  }
  if (variant == "script_lora") {
    auto lora = torchlora::jit::inject_lora(
        script_model(c, false),
        torchlora::LoRAConfig(c.rank)
            .alpha(2.0 * static_cast<double>(c.rank))
            .target_modules({"fc"})
            .init(torchlora::LoRAInit::random));
    return {
        [lora](const torch::Tensor& x) mutable {
          return lora.forward({x}).toTensor();
        },
        lora.parameters()};
  }
  if (variant == "plain" || variant == "plain_again") {
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
  if (variant == "unfused") {
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
  const bool dora = variant.rfind("dora", 0) == 0;
  torch::nn::Linear base = base_linear(c, false);
  if (variant == "int8_lora" || variant == "nf4_lora") {
    // LoRA over a quantized base: the weight dequantized in each forward
    // and again for the input's gradient.
    base = torchlora::QuantizedLinear(
        base,
        torchlora::QuantizedLinearOptions().format(
            variant == "int8_lora" ? torchlora::QuantizedFormat::int8
                                   : torchlora::QuantizedFormat::nf4));
  }
  torchlora::LoRALinear layer(
      base,
      torchlora::LoRAOptions(c.rank)
          .alpha(2.0 * static_cast<double>(c.rank))
          .use_dora(dora)
          .init(torchlora::LoRAInit::random));
  if (variant == "merged" || variant == "dora_merged") {
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

/// Times `call` in the benchmark's loop: each call on the CPU, blocks of
/// calls between two synchronizations on CUDA.
template <typename Call>
void time_calls(benchmark::State& state, torch::Device device, Call& call) {
  for (auto _ : state) {
    if (!device.is_cuda()) {
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

/// One call of `layer` on the case's input: a forward without grad, or a
/// forward and the gradients of the input and the trainable tensors.
std::function<void()> make_call(
    const Layer& layer,
    const Case& c,
    bool backward) {
  torch::manual_seed(1);
  const auto options = torch::TensorOptions().device(c.device).dtype(c.dtype);
  const auto x = torch::randn({c.rows, c.in}, options).requires_grad_(backward);
  const auto grad_output = torch::randn({c.rows, c.out}, options);
  std::vector<torch::Tensor> inputs = {x};
  inputs.insert(inputs.end(), layer.trainable.begin(), layer.trainable.end());
  return [layer, x, grad_output, inputs, backward] {
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
}

void run(
    benchmark::State& state,
    const Layer& layer,
    const Case& c,
    bool backward) {
  auto call = make_call(layer, c, backward);
  time_calls(state, c.device, call);
}

/// Settings of the paired ratios (`--paired_rounds`, `--paired_block_s`,
/// `--paired_precision`, `--paired_max_rounds`).
struct PairedSettings {
  int rounds = 40;
  double block_seconds = 0.05;
  /// More rounds are timed, 20 at a time, while the median's estimated
  /// relative standard error is above this and fewer than `max_rounds`
  /// have been timed.
  double precision = 0.005;
  int max_rounds = 200;
};

/// Seconds for `calls` calls of `call`, synchronized on CUDA.
double time_block(
    const std::function<void()>& call,
    int calls,
    torch::Device device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize();
  }
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) {
    call();
  }
  if (device.is_cuda()) {
    torch::cuda::synchronize();
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

/// The quotients of `variant_call`'s time over `reference_call`'s, timed in
/// pairs: a block of reference calls and a block of variant calls, next to
/// each other (in turn reference first and variant first), each pair giving
/// one quotient.
void add_paired_quotients(
    const std::function<void()>& reference_call,
    const std::function<void()>& variant_call,
    torch::Device device,
    int rounds,
    double block_seconds,
    std::vector<double>& quotients) {
  for (int i = 0; i < 2; ++i) { // warm-up
    time_block(reference_call, 1, device);
    time_block(variant_call, 1, device);
  }
  const double one = std::max(1e-6, time_block(reference_call, 1, device));
  const int calls = std::max(1, static_cast<int>(block_seconds / one));
  for (int round = 0; round < rounds; ++round) {
    double reference_time = 0;
    double variant_time = 0;
    if (round % 2 == 0) {
      reference_time = time_block(reference_call, calls, device);
      variant_time = time_block(variant_call, calls, device);
    } else {
      variant_time = time_block(variant_call, calls, device);
      reference_time = time_block(reference_call, calls, device);
    }
    quotients.push_back(variant_time / reference_time);
  }
}

/// Makes a layer and its input anew and returns one call of it.
using CallFactory = std::function<std::function<void()>()>;

/// The median and the spread (interquartile range over median) of sorted
/// quotients.
std::pair<double, double> median_and_spread(const std::vector<double>& sorted) {
  const auto at = [&](double q) {
    return sorted[static_cast<size_t>(q * (sorted.size() - 1) + 0.5)];
  };
  const double median = at(0.5);
  return {median, (at(0.75) - at(0.25)) / median};
}

/// The ratio of the variant's time to the reference's: the median of the
/// paired quotients (see `add_paired_quotients`), and their spread
/// (interquartile range over median).
///
/// Both calls are made anew 10 times per batch of rounds, the rounds shared
/// among them: where tensors happen to lie in memory moves a memory-bound
/// call's time by several percent, and a change of the machine's speed
/// during the run (clock, other processes) touches both blocks of a pair
/// alike, which a quotient of two medians timed minutes apart does not
/// cancel. Before each construction a block of random size is allocated and
/// kept, and the order of the two constructions alternates, so that the
/// reference's tensors do not land in the same place every time.
///
/// After `settings.rounds`, batches of 20 more rounds follow while the
/// median's relative standard error, estimated from the spread as for a
/// normal sample (1.253 sigma / sqrt(n), sigma = IQR / 1.349), is above
/// `settings.precision`, up to `settings.max_rounds`: a noisy pair is timed
/// longer, a steady one is not.
bench::PairedRatio paired_ratio(
    const CallFactory& make_reference,
    const CallFactory& make_variant,
    torch::Device device,
    const PairedSettings& settings) {
  constexpr int kConstructions = 10;
  constexpr int kMoreRounds = 20;
  std::mt19937 random(12345);
  std::uniform_int_distribution<int64_t> spacer_bytes(0, int64_t{8} << 20);
  std::vector<double> quotients;
  const auto add_rounds = [&](int total) {
    for (int i = 0; i < kConstructions; ++i) {
      // The rounds spread over the constructions.
      const int rounds = (total + kConstructions - 1 - i) / kConstructions;
      if (rounds == 0) {
        continue;
      }
      // Each construction allocates anew; the earlier ones are freed first.
      const auto spacer = torch::empty({spacer_bytes(random)}, torch::kUInt8);
      std::function<void()> reference_call;
      std::function<void()> variant_call;
      if (i % 2 == 0) {
        reference_call = make_reference();
        variant_call = make_variant();
      } else {
        variant_call = make_variant();
        reference_call = make_reference();
      }
      add_paired_quotients(
          reference_call,
          variant_call,
          device,
          rounds,
          settings.block_seconds,
          quotients);
    }
  };
  add_rounds(settings.rounds);
  while (true) {
    std::sort(quotients.begin(), quotients.end());
    const auto [median, spread] = median_and_spread(quotients);
    const double standard_error = 1.253 * (spread / 1.349) /
        std::sqrt(static_cast<double>(quotients.size()));
    const int timed = static_cast<int>(quotients.size());
    if (standard_error <= settings.precision || timed >= settings.max_rounds) {
      return {median, spread, timed};
    }
    add_rounds(std::min(kMoreRounds, settings.max_rounds - timed));
  }
}

/// Makes `variant`'s layer for the case and returns one call of it.
CallFactory layer_call(
    const std::string& variant,
    const Case& c,
    bool backward) {
  return [variant, c, backward] {
    return make_call(make_layer(variant, c), c, backward);
  };
}

/// Replaces each row's ratios with paired ones against plain (see
/// `paired_ratio`).
void add_paired_ratios(
    std::vector<bench::Row>& rows,
    const PairedSettings& settings) {
  for (auto& row : rows) {
    if (row.variant == "plain") {
      row.fwd_pair = row.fwdbwd_pair = {1, 0, 0};
      continue;
    }
    for (const bool backward : {false, true}) {
      const auto paired = paired_ratio(
          layer_call("plain", row.c, backward),
          layer_call(row.variant, row.c, backward),
          row.c.device,
          settings);
      (backward ? row.fwdbwd_ratio : row.fwd_ratio) = paired.ratio;
      (backward ? row.fwdbwd_pair : row.fwd_pair) = paired;
    }
  }
}

/// A LoRALinear with K adapters "t0".."t<K-1>" (r = the case's rank), and
/// the adapter of each row: spread evenly, every other row "__base__" with
/// `half_base`.
struct MixedLayer {
  torchlora::LoRALinear layer{nullptr};
  std::vector<std::string> names;
};

MixedLayer make_mixed(const bench::MixedKey& key) {
  torch::manual_seed(0);
  const auto& c = key.c;
  MixedLayer mixed;
  mixed.layer = torchlora::LoRALinear(base_linear(c, false));
  for (int k = 0; k < key.adapters; ++k) {
    mixed.layer->add_adapter(
        "t" + std::to_string(k),
        torchlora::LoRAOptions(c.rank)
            .alpha(2.0 * static_cast<double>(c.rank))
            .init(torchlora::LoRAInit::random));
  }
  int64_t next = 0;
  for (int64_t row = 0; row < c.rows; ++row) {
    if (key.half_base && row % 2 == 1) {
      mixed.names.emplace_back("__base__");
    } else {
      mixed.names.push_back("t" + std::to_string(next++ % key.adapters));
    }
  }
  return mixed;
}

/// One forward of a mixed batch without grad: routed (one routing per batch,
/// its construction timed) or naive (one forward per adapter's rows).
std::function<void()> make_mixed_call(const bench::MixedKey& key) {
  const auto mixed = std::make_shared<MixedLayer>(make_mixed(key));
  const auto& c = key.c;
  const auto options = torch::TensorOptions().device(c.device).dtype(c.dtype);
  torch::manual_seed(1);
  const auto x = torch::randn({c.rows, c.in}, options);
  // The naive way's groups, made once.
  std::map<std::string, torch::Tensor> groups;
  for (const auto& name :
       std::set<std::string>(mixed->names.begin(), mixed->names.end())) {
    std::vector<int64_t> rows;
    for (size_t row = 0; row < mixed->names.size(); ++row) {
      if (mixed->names[row] == name) {
        rows.push_back(static_cast<int64_t>(row));
      }
    }
    groups[name] = torch::tensor(rows, torch::kLong).to(c.device);
  }
  return [mixed, key, x, groups, options] {
    torch::NoGradGuard no_grad;
    auto& layer = mixed->layer;
    torch::Tensor y;
    if (key.variant == "mixed") {
      torchlora::AdapterRouting routing(*layer, mixed->names);
      y = layer(x);
    } else {
      y = torch::empty({key.c.rows, key.c.out}, options);
      for (const auto& [name, index] : groups) {
        if (name == "__base__") {
          layer->set_adapters_enabled(false);
        } else {
          layer->set_active_adapters({name});
        }
        y.index_copy_(0, index, layer(x.index_select(0, index)));
        layer->set_adapters_enabled(true);
      }
    }
    benchmark::DoNotOptimize(y.data_ptr());
  };
}

void run_mixed(benchmark::State& state, const bench::MixedKey& key) {
  auto call = make_mixed_call(key);
  time_calls(state, key.c.device, call);
}

/// Replaces each mixed row's ratios with paired ones: against one adapter
/// over all rows (`torchlora`'s forward) timed in pairs, and against plain
/// as that quotient times `torchlora`'s paired ratio to plain.
void add_paired_mixed_ratios(
    std::vector<bench::MixedRow>& mixed,
    const std::vector<bench::Row>& rows,
    const PairedSettings& settings) {
  for (auto& row : mixed) {
    const auto single =
        std::find_if(rows.begin(), rows.end(), [&](const auto& r) {
          return r.variant == "torchlora" &&
              bench::case_name(r.c) == bench::case_name(row.key.c);
        });
    if (single == rows.end()) {
      continue;
    }
    const auto key = row.key;
    row.fwd_pair = paired_ratio(
        layer_call("torchlora", key.c, /*backward=*/false),
        [key] { return make_mixed_call(key); },
        key.c.device,
        settings);
    row.fwd_ratio_to_single = row.fwd_pair.ratio;
    row.fwd_ratio = row.fwd_ratio_to_single * single->fwd_ratio;
  }
}

/// The mixed-batch measurements: K = 1, 4, 16, 64 adapters over the rows
/// (up to the row count), and 16 adapters with half of the rows base only.
std::vector<bench::MixedKey> mixed_keys(const std::vector<Case>& list) {
  std::vector<bench::MixedKey> keys;
  for (const auto& c : list) {
    if (c.rank != 16 || (c.device.is_cuda() && c.dtype != torch::kBFloat16) ||
        (c.device.is_cuda() && c.rows < 8192)) {
      continue;
    }
    for (const auto* variant : {"mixed", "mixed_naive"}) {
      for (const int k : {1, 4, 16, 64}) {
        if (k <= c.rows) {
          keys.push_back({c, variant, k, false});
        }
      }
      keys.push_back({c, variant, 16, true});
    }
  }
  return keys;
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
  for (const auto& key : mixed_keys(cases())) {
    const auto name = bench::mixed_benchmark_name(key);
    auto* benchmark = benchmark::RegisterBenchmark(
        name.c_str(),
        [key](benchmark::State& state) { run_mixed(state, key); });
    benchmark->Unit(benchmark::kMillisecond)->MinWarmUpTime(0.1);
    if (key.c.device.is_cuda()) {
      benchmark->UseManualTime();
    }
  }
}

} // namespace

int main(int argc, char** argv) {
  // TorchScript's CPU fuser off (docs/torchscript.md): Debian 13's LibTorch
  // 2.6 hangs compiling the fused backward of the script_* rows.
  torch::jit::setTensorExprFuserEnabled(false);
  // Large blocks from the heap, not fresh mmaps: every variant allocates
  // its output the same way, without page faults that would favour
  // whichever runs later.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  std::string report;
  PairedSettings paired;
  std::vector<char*> arguments;
  for (int i = 0; i < argc; ++i) {
    const std::string argument = argv[i];
    if (argument == "--report" && i + 1 < argc) {
      report = argv[++i];
    } else if (argument == "--paired_rounds" && i + 1 < argc) {
      paired.rounds = std::max(1, std::stoi(argv[++i]));
    } else if (argument == "--paired_block_s" && i + 1 < argc) {
      paired.block_seconds = std::stod(argv[++i]);
    } else if (argument == "--paired_precision" && i + 1 < argc) {
      paired.precision = std::stod(argv[++i]);
    } else if (argument == "--paired_max_rounds" && i + 1 < argc) {
      paired.max_rounds = std::max(1, std::stoi(argv[++i]));
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
  bench::add_run_context();
  bench::CapturingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  if (!report.empty()) {
    auto rows = bench::ratio_rows(reporter.times(), reporter.stddevs());
    add_paired_ratios(rows, paired);
    const auto memory = bench::memory_rows();
    auto mixed = bench::mixed_rows(reporter.times(), rows);
    add_paired_mixed_ratios(mixed, rows, paired);
    const auto merge_memory = bench::merge_memory_rows();
    bench::print_run_context(std::cout);
    bench::print_tables(rows, memory, std::cout);
    bench::print_serving_tables(mixed, merge_memory, std::cout);
    bench::write_report(report, rows, memory, mixed, merge_memory);
  }
  return 0;
}
