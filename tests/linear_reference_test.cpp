// Property test of torchlora::LoRALinear (include/torchlora/linear.h)
// against the formula written with plain ops in float64: many small random
// layers, inputs and settings (fixed seeds), the forward, first-order and
// second-order gradients, merged and unmerged, through every forward path
// (the fused function folded and unfolded, and the general path).
#include "test_support.h"

#include <torchlora/detail/lora_linear_function.h>
#include <torchlora/linear.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_linear_reference_test {

using torchlora::LoRAInit;
using torchlora::LoRALinear;
using torchlora::LoRAOptions;

namespace {

/// One random setting of a layer and its input.
struct Case {
  int64_t in = 1;
  int64_t out = 1;
  std::vector<int64_t> leading; // the input's leading dimensions
  torch::Dtype dtype = torch::kFloat64;
  bool bias = true;
  bool base_trainable = false;
  bool x_needs_grad = true;
  bool training = true;
  bool merged = false;
  // Per adapter: rank, alpha, dropout, rsLoRA, its own dtype, run-time scale.
  std::vector<LoRAOptions> adapters;
  std::vector<double> scales;
  std::vector<bool> active;

  int64_t rows() const {
    int64_t rows = 1;
    for (const auto size : leading) {
      rows *= size;
    }
    return rows;
  }

  std::string describe() const {
    std::ostringstream text;
    text << "in=" << in << " out=" << out
         << " leading=" << c10::IntArrayRef(leading) << " dtype=" << dtype
         << " bias=" << bias << " base_trainable=" << base_trainable
         << " x_needs_grad=" << x_needs_grad << " training=" << training
         << " merged=" << merged << " adapters=[";
    for (size_t i = 0; i < adapters.size(); ++i) {
      const auto& a = adapters[i];
      text << (i ? "; " : "") << "r=" << a.rank() << " alpha=" << a.alpha()
           << " p=" << a.dropout() << " rslora=" << a.use_rslora()
           << " dtype=" << (a.dtype() ? c10::toString(*a.dtype()) : "base")
           << " scale=" << scales[i] << " active=" << active[i];
    }
    return text.str() + "]";
  }
};

/// The path the layer's forward takes for this case.
enum class Path { folded, activations, general, merged };

Case random_case(std::mt19937& rng) {
  auto pick = [&](int64_t low, int64_t high) {
    return std::uniform_int_distribution<int64_t>(low, high)(rng);
  };
  auto coin = [&](double p = 0.5) {
    return std::bernoulli_distribution(p)(rng);
  };
  Case c;
  c.in = pick(1, 12);
  c.out = pick(1, 12);
  // Few rows take the unfolded fused path, many rows the folded one.
  c.leading = {coin() ? pick(1, 4) : pick(5, 40)};
  if (coin(0.3)) {
    c.leading = {pick(1, 4), pick(1, 6)};
  }
  c.dtype = coin() ? torch::kFloat64 : torch::kFloat32;
  c.bias = coin(0.7);
  c.x_needs_grad = coin(0.8);
  c.training = coin(0.7);
  const auto count = coin(0.6) ? 1 : pick(2, 3);
  for (int64_t i = 0; i < count; ++i) {
    auto options = LoRAOptions(pick(1, 4))
                       .alpha(static_cast<double>(pick(1, 16)))
                       .use_rslora(coin(0.2))
                       .init(LoRAInit::random);
    if (coin(0.25)) {
      options.dropout(0.3);
    }
    if (coin(0.15)) {
      options.dtype(
          c.dtype == torch::kFloat64 ? torch::kFloat32 : torch::kFloat64);
    }
    c.adapters.push_back(options);
    c.scales.push_back(coin(0.2) ? 0.5 : 1.0);
    c.active.push_back(i == 0 || coin(0.6));
  }
  c.merged = coin(0.2);
  c.base_trainable = !c.merged && coin(0.2);
  return c;
}

Path path_of(const Case& c) {
  if (c.merged) {
    return Path::merged;
  }
  std::vector<size_t> active;
  for (size_t i = 0; i < c.adapters.size(); ++i) {
    if (c.active[i]) {
      active.push_back(i);
    }
  }
  const auto& only = c.adapters[active.front()];
  const bool dropout_works = c.training && only.dropout() > 0;
  const bool same_dtype = !only.dtype() || *only.dtype() == c.dtype;
  if (active.size() != 1 || dropout_works || !same_dtype) {
    return Path::general;
  }
  return torchlora::detail::fold_adapter_into_weight(
             c.rows(), c.in, c.out, c.dtype)
      ? Path::folded
      : Path::activations;
}

std::string adapter_name(size_t i) {
  return "adapter" + std::to_string(i);
}

/// `grads` with an undefined entry (input unused) replaced by zeros.
std::vector<torch::Tensor> defined(
    const std::vector<torch::Tensor>& grads,
    const std::vector<torch::Tensor>& inputs) {
  std::vector<torch::Tensor> result;
  for (size_t i = 0; i < grads.size(); ++i) {
    result.push_back(
        grads[i].defined() ? grads[i] : torch::zeros_like(inputs[i]));
  }
  return result;
}

/// max |a - b| / (1 + max |b|), in float64.
double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  const auto a64 = a.detach().to(torch::kFloat64);
  const auto b64 = b.detach().to(torch::kFloat64);
  if (a64.numel() == 0) {
    return 0;
  }
  return (a64 - b64).abs().max().item<double>() /
      (1 + b64.abs().max().item<double>());
}

/// Values, gradients and second-order gradients of one case.
struct Results {
  torch::Tensor y;
  std::vector<torch::Tensor> first;
  std::vector<torch::Tensor> second;
};

/// Runs `forward` on `inputs` (the tensors to differentiate): y, the
/// gradient of sum(y * w) with create_graph, then the gradient of
/// sum over k of sum(grad_k * v_k).
template <typename Forward>
Results differentiate(
    Forward forward,
    const std::vector<torch::Tensor>& inputs,
    const torch::Tensor& w,
    const std::vector<torch::Tensor>& v) {
  Results results;
  results.y = forward();
  if (inputs.empty()) {
    return results;
  }
  const auto loss = (results.y * w.to(results.y.scalar_type())).sum();
  results.first = defined(
      torch::autograd::grad(
          {loss},
          inputs,
          /*grad_outputs=*/{},
          /*retain_graph=*/true,
          /*create_graph=*/true,
          /*allow_unused=*/true),
      inputs);
  torch::Tensor second_loss = torch::zeros({}, torch::kFloat64);
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (results.first[k].requires_grad()) {
      second_loss = second_loss +
          (results.first[k] * v[k].to(results.first[k].scalar_type()))
              .sum()
              .to(torch::kFloat64);
    }
  }
  if (second_loss.requires_grad()) {
    results.second = defined(
        torch::autograd::grad(
            {second_loss},
            inputs,
            /*grad_outputs=*/{},
            /*retain_graph=*/false,
            /*create_graph=*/false,
            /*allow_unused=*/true),
        inputs);
  } else {
    for (const auto& input : inputs) {
      results.second.push_back(torch::zeros_like(input));
    }
  }
  return results;
}

/// Runs one case through torchlora and through the float64 reference and
/// checks that they agree; returns the path the layer took.
Path check_case(const Case& c, uint64_t seed) {
  torch::manual_seed(seed);
  torch::nn::Linear base(torch::nn::LinearOptions(c.in, c.out).bias(c.bias));
  base->to(c.dtype);
  LoRALinear layer(base, c.adapters.front());
  layer->delete_adapter("default");
  for (size_t i = 0; i < c.adapters.size(); ++i) {
    layer->add_adapter(adapter_name(i), c.adapters[i]);
    layer->set_scale(adapter_name(i), c.scales[i]);
  }
  std::vector<std::string> active_names;
  for (size_t i = 0; i < c.adapters.size(); ++i) {
    if (c.active[i]) {
      active_names.push_back(adapter_name(i));
    }
  }
  layer->set_active_adapters(active_names);
  layer->train(c.training);
  if (c.base_trainable) {
    layer->weight.set_requires_grad(true);
    if (c.bias) {
      layer->bias.set_requires_grad(true);
    }
  }
  // The base weight and adapters in float64, before a merge changes them.
  const auto W64 = layer->weight.detach().to(torch::kFloat64);
  const auto b64 =
      c.bias ? layer->bias.detach().to(torch::kFloat64) : torch::Tensor();
  if (c.merged) {
    layer->merge();
  }

  auto shape = c.leading;
  shape.push_back(c.in);
  const auto x = torch::randn(shape, c.dtype).requires_grad_(c.x_needs_grad);
  auto out_shape = c.leading;
  out_shape.push_back(c.out);
  const auto w = torch::randn(out_shape, torch::kFloat64);

  // What is differentiated: x, the trainable base tensors, and the active
  // adapters' matrices unless merged (a merged forward does not use them).
  std::vector<torch::Tensor> ours;
  std::vector<std::string> names;
  if (c.x_needs_grad) {
    ours.push_back(x);
    names.push_back("x");
  }
  if (c.base_trainable) {
    ours.push_back(layer->weight);
    names.push_back("W");
    if (c.bias) {
      ours.push_back(layer->bias);
      names.push_back("b");
    }
  }
  const auto params = layer->named_parameters();
  if (!c.merged) {
    for (const auto& name : active_names) {
      ours.push_back(params["lora_A." + name + ".weight"]);
      ours.push_back(params["lora_B." + name + ".weight"]);
      names.push_back("A of " + name);
      names.push_back("B of " + name);
    }
  }
  std::vector<torch::Tensor> v;
  for (const auto& input : ours) {
    v.push_back(torch::randn(input.sizes(), torch::kFloat64));
  }

  // Dropout masks: the same random draws the layer makes, in its order.
  const auto dropout_seed = seed * 7919 + 1;
  const auto rows = c.rows();
  std::vector<torch::Tensor> masks;
  torch::manual_seed(dropout_seed);
  for (size_t i = 0; i < c.adapters.size(); ++i) {
    const double p = c.adapters[i].dropout();
    if (!c.active[i] || c.merged || !c.training || p == 0) {
      masks.push_back(torch::ones({rows, c.in}, torch::kFloat64));
      continue;
    }
    masks.push_back(
        torch::nn::functional::dropout(
            torch::ones({rows, c.in}, c.dtype),
            torch::nn::functional::DropoutFuncOptions().p(p).training(true))
            .to(torch::kFloat64));
  }

  const auto actual = differentiate(
      [&] {
        torch::manual_seed(dropout_seed);
        return layer(x);
      },
      ours,
      w,
      v);

  // The reference: float64 leaves with the same values, plain ops only.
  std::vector<torch::Tensor> leaves;
  for (const auto& input : ours) {
    leaves.push_back(input.detach().to(torch::kFloat64).requires_grad_(true));
  }
  auto leaf = [&](const std::string& name, const torch::Tensor& fallback) {
    const auto found = std::find(names.begin(), names.end(), name);
    return found == names.end()
        ? fallback
        : leaves[static_cast<size_t>(found - names.begin())];
  };
  const auto x64 = leaf("x", x.detach().to(torch::kFloat64));
  const auto W = leaf("W", W64);
  const auto b = leaf("b", b64);
  const auto expected = differentiate(
      [&] {
        const auto x2 = x64.reshape({rows, c.in});
        auto weight = W;
        if (c.merged) {
          for (size_t i = 0; i < c.adapters.size(); ++i) {
            if (!c.active[i]) {
              continue;
            }
            const auto& o = c.adapters[i];
            const double scaling = o.alpha() /
                (o.use_rslora() ? std::sqrt(static_cast<double>(o.rank()))
                                : static_cast<double>(o.rank()));
            weight = weight +
                scaling * c.scales[i] *
                    params["lora_B." + adapter_name(i) + ".weight"]
                        .detach()
                        .to(torch::kFloat64)
                        .mm(params["lora_A." + adapter_name(i) + ".weight"]
                                .detach()
                                .to(torch::kFloat64));
          }
        }
        auto y = x2.mm(weight.t());
        if (b.defined()) {
          y = y + b;
        }
        if (!c.merged) {
          for (size_t i = 0; i < c.adapters.size(); ++i) {
            if (!c.active[i]) {
              continue;
            }
            const auto& o = c.adapters[i];
            const double scaling = o.alpha() /
                (o.use_rslora() ? std::sqrt(static_cast<double>(o.rank()))
                                : static_cast<double>(o.rank()));
            const auto A = leaf("A of " + adapter_name(i), torch::Tensor());
            const auto B = leaf("B of " + adapter_name(i), torch::Tensor());
            y = y +
                (x2 * masks[i]).mm(A.t()).mm(B.t()) * (scaling * c.scales[i]);
          }
        }
        return y.reshape(out_shape);
      },
      leaves,
      w,
      v);

  // fp32 layers, or fp32 adapters: products rounded to ~1e-7 relative.
  bool any_float32 = c.dtype == torch::kFloat32;
  for (const auto& o : c.adapters) {
    any_float32 = any_float32 || (o.dtype() && *o.dtype() == torch::kFloat32);
  }
  const double tolerance = any_float32 ? 2e-5 : 1e-11;
  const auto description = c.describe();
  EXPECT_EQ(actual.y.sizes(), expected.y.sizes()) << description;
  EXPECT_LT(relative_error(actual.y, expected.y), tolerance)
      << "forward, " << description;
  for (size_t k = 0; k < ours.size(); ++k) {
    EXPECT_LT(relative_error(actual.first[k], expected.first[k]), tolerance)
        << "first-order gradient of " << names[k] << ", " << description;
    EXPECT_LT(relative_error(actual.second[k], expected.second[k]), tolerance)
        << "second-order gradient of " << names[k] << ", " << description;
  }
  return path_of(c);
}

class LinearReferenceTest : public torchlora_test::Seeded {};

} // namespace

TEST_F(LinearReferenceTest, RandomLayersMatchTheFloat64ReferenceToSecondOrder) {
  constexpr int kCases = 400;
  std::mt19937 rng(20261203);
  std::map<Path, int> paths;
  for (int i = 0; i < kCases; ++i) {
    const auto c = random_case(rng);
    ++paths[check_case(c, static_cast<uint64_t>(i))];
    if (HasFailure()) {
      ADD_FAILURE() << "stopped at case " << i;
      return;
    }
  }
  std::cout << "[          ] " << kCases << " cases: folded "
            << paths[Path::folded] << ", activations "
            << paths[Path::activations] << ", general " << paths[Path::general]
            << ", merged " << paths[Path::merged] << "\n";
  // Every path was exercised, each many times.
  for (const auto path :
       {Path::folded, Path::activations, Path::general, Path::merged}) {
    EXPECT_GE(paths[path], 30) << "path " << static_cast<int>(path);
  }
}

TEST_F(LinearReferenceTest, SecondDerivativesThroughTheFusedPathAreExact) {
  // The fused backward once reused products the forward kept without
  // history (x A^T unfolded, W + s B A folded): d(dL/dB)/dA and
  // d(dL/dx)/dA came out wrong.
  for (const int64_t rows : {2, 64}) { // the unfolded and the folded path
    LoRALinear layer(
        torch::nn::Linear(4, 3),
        LoRAOptions(2).alpha(3).init(LoRAInit::random));
    layer->to(torch::kFloat64);
    const torch::Tensor A = layer->named_parameters()["lora_A.default.weight"];
    const torch::Tensor B = layer->named_parameters()["lora_B.default.weight"];
    const auto x =
        torch::randn({rows, 4}, torch::kFloat64).requires_grad_(true);
    auto second_order = [&](const torch::Tensor& y,
                            const std::vector<torch::Tensor>& inputs) {
      const auto first =
          torch::autograd::grad({y.pow(2).sum()}, inputs, {}, true, true);
      const auto sum = first[0].sum() + first[1].sum() + first[2].sum();
      return torch::autograd::grad({sum}, inputs);
    };
    const auto actual = second_order(layer(x), {x, A, B});

    const auto x2 = x.detach().clone().requires_grad_(true);
    const auto A2 = A.detach().clone().requires_grad_(true);
    const auto B2 = B.detach().clone().requires_grad_(true);
    const auto y = x2.mm(layer->weight.t()) + layer->bias +
        x2.mm(A2.t()).mm(B2.t()) * (3.0 / 2); // alpha / r
    const auto expected = second_order(y, {x2, A2, B2});
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_TRUE(torch::allclose(actual[i], expected[i], 1e-10, 1e-10))
          << "rows " << rows << ", input " << i << "\n"
          << actual[i] << "\n"
          << expected[i];
    }
  }
}

} // namespace torchlora_linear_reference_test
