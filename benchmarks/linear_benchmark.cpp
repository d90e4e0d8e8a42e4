// LoRALinear against a plain frozen Linear, CPU fp32, forward and
// forward + backward. Names: cpu_f32/<variant>/<rows>/<in>/<out>/<rank>/<pass>.
//
//   build/default/benchmarks/linear_benchmark
#include <torchlora/torchlora.h>

#include <benchmark/benchmark.h>

#include <functional>
#include <string>

namespace {

struct Shape {
  int64_t rows;
  int64_t in;
  int64_t out;
  int64_t rank;
};

/// A layer under test: returns the output for an input.
using Layer = std::function<torch::Tensor(const torch::Tensor&)>;

Layer make_plain(const Shape& shape) {
  torch::nn::Linear linear(shape.in, shape.out);
  for (auto& parameter : linear->parameters()) {
    parameter.set_requires_grad(false);
  }
  return [linear](const torch::Tensor& x) mutable { return linear(x); };
}

/// The seed's formulation: y = linear(x) + linear(linear(x, A), B) * s.
Layer make_seed(const Shape& shape) {
  torch::nn::Linear linear(shape.in, shape.out);
  for (auto& parameter : linear->parameters()) {
    parameter.set_requires_grad(false);
  }
  auto A = torch::randn({shape.rank, shape.in}).requires_grad_(true);
  auto B = torch::randn({shape.out, shape.rank}).requires_grad_(true);
  const double scaling = 2.0;
  return [=](const torch::Tensor& x) mutable {
    namespace F = torch::nn::functional;
    return linear(x) + F::linear(F::linear(x, A), B) * scaling;
  };
}

Layer make_torchlora(const Shape& shape) {
  torchlora::LoRALinear layer(
      torch::nn::Linear(shape.in, shape.out),
      torchlora::LoRAOptions(shape.rank)
          .alpha(2.0 * shape.rank)
          .init(torchlora::LoRAInit::random));
  return [layer](const torch::Tensor& x) mutable { return layer(x); };
}

void run(
    benchmark::State& state,
    const Layer& layer,
    const Shape& shape,
    bool backward) {
  torch::manual_seed(0);
  const auto x = torch::randn({shape.rows, shape.in}).requires_grad_(backward);
  for (auto _ : state) {
    if (backward) {
      auto y = layer(x);
      y.backward(torch::ones_like(y));
      benchmark::DoNotOptimize(x.grad().data_ptr());
    } else {
      torch::NoGradGuard no_grad;
      auto y = layer(x);
      benchmark::DoNotOptimize(y.data_ptr());
    }
  }
}

void register_all() {
  const Shape shapes[] = {{2048, 1024, 1024, 16}, {16, 1024, 1024, 16}};
  const std::pair<const char*, Layer (*)(const Shape&)> variants[] = {
      {"plain", make_plain},
      {"seed", make_seed},
      {"torchlora", make_torchlora}};
  for (const auto& shape : shapes) {
    for (const auto& [variant, make] : variants) {
      for (const bool backward : {false, true}) {
        const std::string name = std::string("cpu_f32/") + variant + "/" +
            std::to_string(shape.rows) + "/" + std::to_string(shape.in) + "/" +
            std::to_string(shape.out) + "/" + std::to_string(shape.rank) +
            (backward ? "/fwdbwd" : "/fwd");
        const auto layer = make(shape);
        benchmark::RegisterBenchmark(
            name.c_str(),
            [layer, shape, backward](benchmark::State& state) {
              run(state, layer, shape, backward);
            })
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
}

} // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
