#pragma once
// What a benchmark report records about the run besides its timings: the
// BLAS build and its threads, LibTorch's threads and version, the thread
// variables of the environment and the core count. The ratios depend on
// them (the pthread build of OpenBLAS next to LibTorch's threads made the
// word example 6-13x slower on Debian 13).

#include <torchlora/blas_threads.h>

#include <torch/version.h>

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <ostream>
#include <string>
#include <thread>

namespace bench {

/// The run's settings, for the report's "context" object.
inline nlohmann::ordered_json run_context() {
  const auto blas = torchlora::blas_threads();
  nlohmann::ordered_json environment = nlohmann::ordered_json::object();
  for (const char* name :
       {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}) {
    const char* value = std::getenv(name);
    environment[name] = value == nullptr ? nlohmann::ordered_json(nullptr)
                                         : nlohmann::ordered_json(value);
  }
  return {
      {"blas", torchlora::describe(blas)},
      {"openblas_build", torchlora::to_string(blas.parallel)},
      {"openblas_config", blas.openblas_config},
      {"openblas_threads", blas.openblas_threads},
      {"torch_threads", blas.torch_threads},
      {"libtorch", TORCH_VERSION},
      {"cores", std::thread::hardware_concurrency()},
      {"environment", environment}};
}

/// Adds the run's settings to Google Benchmark's own context (printed
/// above its table and written to its JSON output).
inline void add_run_context() {
  const auto context = run_context();
  for (auto item = context.begin(); item != context.end(); ++item) {
    benchmark::AddCustomContext(
        item.key(),
        item->is_string() ? item->get<std::string>() : item->dump());
  }
}

/// One line with the BLAS and thread settings, above the report's tables.
inline void print_run_context(std::ostream& out) {
  const auto context = run_context();
  out << "run: " << context["blas"].get<std::string>() << "; LibTorch "
      << context["libtorch"].get<std::string>() << ", "
      << context["cores"].get<unsigned>() << " cores; environment "
      << context["environment"].dump() << "\n";
}

} // namespace bench
