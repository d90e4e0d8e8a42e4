// Data-parallel training steps, LoRA against full fine-tuning, on 1 and 2
// processes, measured in the same run: start it with
//
//   scripts/launch.sh 2 build/default/benchmarks/distributed_benchmark
//   [--report PATH]
//
// Rank 0 first times one process alone on the whole batch, with 1 thread
// and with every core (rank 1 waits), then both ranks time the
// data-parallel step on half of it each, the cores shared between them:
// forward, backward, AdapterSync::all_reduce_gradients and the optimizer's
// step. The report gives ms per step, the bytes each all-reduce carries and
// the ratio of 2 processes to the faster single process. Google Benchmark runs
// each case a fixed number of iterations, so that the ranks' collectives pair
// up.

#include <torchlora/distributed.h>
#include <torchlora/torchlora.h>

#include "run_context.h"

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace dist = torchlora::distributed;

constexpr int64_t kWidth = 1024;
constexpr int64_t kLayers = 4;
constexpr int64_t kBatch = 64;
constexpr int64_t kRank = 16;
int iterations = 30;
constexpr int kWarmup = 5;
int repetitions = 5;

dist::World& world() {
  static dist::World instance;
  return instance;
}

/// kLayers Linear layers of kWidth, with LoRA r = kRank on each, or all
/// trainable for full fine-tuning.
torch::nn::Sequential make_model(bool lora) {
  torch::manual_seed(0);
  torch::nn::Sequential model;
  for (int64_t i = 0; i < kLayers; ++i) {
    model->push_back(torch::nn::Linear(kWidth, kWidth));
    model->push_back(torch::nn::ReLU());
  }
  if (lora) {
    std::vector<std::string> targets;
    for (int64_t i = 0; i < kLayers; ++i) {
      targets.push_back(std::to_string(2 * i));
    }
    torchlora::inject_lora(
        model, torchlora::LoRAConfig(kRank).target_modules(targets));
  }
  return model;
}

/// One training step per iteration: `processes` 1 is rank 0 alone on the
/// whole batch, 2 is every rank on its share with the gradients averaged;
/// each process runs `threads` intra-op threads.
void training_step(
    benchmark::State& state,
    bool lora,
    int processes,
    int threads) {
  const bool alone = processes == 1;
  const dist::World single;
  const dist::World& ranks = alone ? single : world();
  if (!alone) {
    // Rank 1 waits here while rank 0 times the 1-process cases: on the
    // store, which blocks in a read (a Gloo barrier would poll a core).
    const auto& store = world().store();
    if (world().is_main()) {
      store->set("distributed_benchmark/alone_done", std::vector<uint8_t>{1});
    } else {
      store->wait({"distributed_benchmark/alone_done"});
    }
  }
  torch::set_num_threads(threads);
  auto model = make_model(lora);
  dist::AdapterSync sync(model, ranks);
  std::vector<torch::Tensor> trainable;
  for (const auto& p : model->parameters()) {
    if (p.requires_grad()) {
      trainable.push_back(p);
    }
  }
  torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(1e-4));
  torch::manual_seed(1);
  const auto x = dist::shard_rows(torch::randn({kBatch, kWidth}), ranks);
  const auto target = dist::shard_rows(torch::randn({kBatch, kWidth}), ranks);
  const auto step = [&] {
    optimizer.zero_grad();
    torch::mse_loss(model->forward(x), target).backward();
    sync.all_reduce_gradients();
    optimizer.step();
  };
  for (int i = 0; i < kWarmup; ++i) {
    step(); // threads, allocations and Adam's state made before timing
  }
  for (auto _ : state) {
    step();
  }
  state.counters["bytes_per_step"] = static_cast<double>(sync.bytes_per_step());
  state.counters["processes"] = processes;
  state.counters["threads"] = torch::get_num_threads();
}

/// The cores of this machine, at least 2 threads' worth of work to share.
int cores() {
  return std::max(2, static_cast<int>(std::thread::hardware_concurrency()));
}

std::string case_name(const std::string& variant, int processes, int threads) {
  return "step/" + variant + "/processes:" + std::to_string(processes) +
      "/threads:" + std::to_string(threads);
}

/// Rank 0 alone with 1 thread and with every core, then both ranks with
/// the cores shared between them.
void register_cases() {
  const int size = world().world_size();
  std::vector<std::pair<int, int>> cases; // processes, threads
  if (world().is_main()) {
    cases = {{1, 1}, {1, cores()}};
  }
  cases.emplace_back(size, std::max(1, cores() / size));
  for (const auto& [processes, threads] : cases) {
    for (const bool lora : {true, false}) {
      benchmark::RegisterBenchmark(
          case_name(lora ? "lora" : "full", processes, threads).c_str(),
          [lora, processes = processes, threads = threads](
              benchmark::State& state) {
            training_step(state, lora, processes, threads);
          })
          ->Iterations(iterations)
          ->Repetitions(repetitions)
          ->ReportAggregatesOnly(true)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
}

/// Keeps each case's median time and its counters for the report.
class Reporter : public benchmark::ConsoleReporter {
 public:
  struct Result {
    double ms = 0;
    double bytes = 0;
    double threads = 0;
  };
  void ReportRuns(const std::vector<Run>& reports) override {
    benchmark::ConsoleReporter::ReportRuns(reports);
    for (const auto& run : reports) {
      if (run.run_type != Run::RT_Aggregate || run.aggregate_name != "median") {
        continue;
      }
      Result result;
      result.ms = run.GetAdjustedRealTime(); // every case is in ms
      result.bytes = run.counters.at("bytes_per_step").value;
      result.threads = run.counters.at("threads").value;
      results[run.run_name.function_name] = result;
    }
  }
  std::map<std::string, Result> results;
};

} // namespace

int main(int argc, char** argv) {
  std::string report;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::string(argv[i]) == "--report" && i + 1 < argc) {
      report = argv[++i];
    } else if (std::string(argv[i]) == "--smoke") {
      iterations = 2; // proves the report is made; the timings mean nothing
      repetitions = 1;
    } else {
      args.push_back(argv[i]);
    }
  }
  int count = static_cast<int>(args.size());
  world() = dist::init_from_env();
  if (world().world_size() != 2) {
    std::cerr << "distributed_benchmark: start it with scripts/launch.sh 2 "
              << argv[0] << " (got " << world().world_size()
              << " process(es))\n";
    return 2;
  }
  benchmark::Initialize(&count, args.data());
  bench::add_run_context();
  register_cases();
  Reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  world().barrier();
  if (!world().is_main()) {
    return 0;
  }
  nlohmann::json rows = nlohmann::json::array();
  std::cout << "\nper training step (" << kLayers << " Linear " << kWidth << "x"
            << kWidth << ", batch " << kBatch << ", LoRA r = " << kRank
            << ", fp32, CPU, " << cores() << " cores)\n"
            << std::left << std::setw(8) << "variant" << std::right
            << std::setw(11) << "processes" << std::setw(9) << "threads"
            << std::setw(11) << "ms/step" << std::setw(14) << "bytes/step"
            << std::setw(26) << "vs best single process\n";
  const std::vector<std::pair<int, int>> cases = {
      {1, 1}, {1, cores()}, {2, std::max(1, cores() / 2)}};
  for (const std::string variant : {"lora", "full"}) {
    double best_single = 0;
    for (const auto& [processes, threads] : cases) {
      const auto& result =
          reporter.results[case_name(variant, processes, threads)];
      if (processes == 1 && (best_single == 0 || result.ms < best_single)) {
        best_single = result.ms;
      }
    }
    for (const auto& [processes, threads] : cases) {
      const auto& result =
          reporter.results[case_name(variant, processes, threads)];
      nlohmann::json row = {
          {"variant", variant},
          {"processes", processes},
          {"threads_per_process", threads},
          {"ms_per_step", result.ms},
          {"bytes_per_step", result.bytes},
          {"layers", kLayers},
          {"width", kWidth},
          {"batch", kBatch},
          {"rank", kRank}};
      std::ostringstream ratio;
      if (processes > 1) {
        row["ratio_to_best_single_process"] = result.ms / best_single;
        ratio << std::fixed << std::setprecision(2) << result.ms / best_single
              << "x";
      } else {
        ratio << "-";
      }
      rows.push_back(row);
      std::cout << std::left << std::setw(8) << variant << std::right
                << std::setw(11) << processes << std::setw(9) << threads
                << std::setw(11) << std::fixed << std::setprecision(2)
                << result.ms << std::setw(14)
                << static_cast<int64_t>(result.bytes) << std::setw(25)
                << ratio.str() << "\n";
    }
  }
  bench::print_run_context(std::cout);
  if (!report.empty()) {
    const nlohmann::json written = {
        {"context", bench::run_context()}, {"rows", rows}};
    std::ofstream(report) << written.dump(2) << "\n";
    std::cout << "distributed_benchmark: wrote " << report << "\n";
  }
  return 0;
}
