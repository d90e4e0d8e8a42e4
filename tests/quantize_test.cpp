// LoRA over a quantized base (int8, NF4, NF4 with double quantization):
// the codes against their definition (QLoRA's NF4 table from the normal
// quantiles, nearest codes, packing), the layer against a float64 reference
// of the dequantized weight written with plain ops (forward, first- and
// second-order gradients of the input, A and B, over many random shapes and
// settings), quantize/dequantize/merge_and_unload on models, files, and
// every refusal.
#include "test_support.h"

#include <torchlora/torchlora.h>

#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace torchlora_quantize_test {

using torchlora::LoRAOptions;
using torchlora::QuantizedFormat;
using torchlora::QuantizedLinearOptions;
using torchlora_test::coin;
using torchlora_test::uniform;
using torchlora_test::uniform_real;

namespace {

/// A random storage setting: int8, NF4, or NF4 double-quantized, with a
/// random even block size for NF4.
QuantizedLinearOptions random_storage(std::mt19937& rng) {
  const auto pick = uniform(rng, 0, 2);
  if (pick == 0) {
    return QuantizedLinearOptions().format(QuantizedFormat::int8);
  }
  return QuantizedLinearOptions()
      .format(QuantizedFormat::nf4)
      .block_size(2 * uniform(rng, 1, 48))
      .double_quant(pick == 2);
}

torch::Tensor nf4_table64() {
  const auto& values = torchlora::detail::nf4_values();
  return torch::tensor(std::vector<double>(values.begin(), values.end()));
}

torch::Tensor reference_weight(const torchlora::QuantizedLinearImpl& layer) {
  return torchlora_test::reference_dequantized(layer);
}

/// A LoRALinear over a quantized copy of a random Linear, with up to three
/// adapters (random ranks, alphas, rsLoRA, scales, an inactive one).
struct Case {
  torchlora::LoRALinear layer{nullptr};
  std::vector<std::string> active;
  torch::Tensor input;
};

Case random_case(std::mt19937& rng, torch::Dtype dtype) {
  const auto in = uniform(rng, 1, 40);
  const auto out = uniform(rng, 1, 40);
  torch::nn::Linear linear(torch::nn::LinearOptions(in, out).bias(coin(rng)));
  if (coin(rng, 0.2)) {
    torch::NoGradGuard no_grad;
    linear->weight.abs_().neg_(); // negative only
  }
  torchlora::QuantizedLinear quantized(linear, random_storage(rng));
  Case c;
  c.layer = torchlora::LoRALinear(quantized);
  const auto adapters = uniform(rng, 1, 3);
  for (int64_t i = 0; i < adapters; ++i) {
    const auto name = "a" + std::to_string(i);
    c.layer->add_adapter(
        name,
        LoRAOptions(uniform(rng, 1, 6))
            .alpha(uniform_real(rng, 0.5, 8))
            .use_rslora(coin(rng)));
    c.active.push_back(name);
    if (coin(rng, 0.3)) {
      c.layer->set_scale(name, uniform_real(rng, -1, 2));
    }
  }
  if (adapters > 1 && coin(rng, 0.3)) {
    c.active.pop_back();
    c.layer->set_active_adapters(c.active);
  }
  c.layer->to(dtype);
  {
    torch::NoGradGuard no_grad;
    for (const auto& name : c.layer->adapter_names()) {
      c.layer->lora_B[name]->as<torch::nn::Linear>()->weight.normal_();
    }
  }
  if (c.layer->bias.defined() && coin(rng)) {
    c.layer->bias.set_requires_grad(true);
  }
  std::vector<int64_t> shape;
  for (int64_t i = uniform(rng, 0, 2); i > 0; --i) {
    shape.push_back(uniform(rng, 1, 4));
  }
  shape.push_back(in);
  c.input = torch::randn(shape, torch::TensorOptions().dtype(dtype))
                .requires_grad_(true);
  return c;
}

/// The LoRA output in float64 with plain ops, from the stored tensors.
torch::Tensor reference_forward(
    const Case& c,
    const torch::Tensor& x,
    const std::vector<torch::Tensor>& A,
    const std::vector<torch::Tensor>& B,
    const torch::Tensor& bias) {
  const auto W = reference_weight(*c.layer->quantized_base());
  auto y = x.matmul(W.t());
  if (bias.defined()) {
    y = y + bias;
  }
  for (size_t i = 0; i < c.active.size(); ++i) {
    const auto& name = c.active[i];
    const double s = c.layer->scaling(name) * c.layer->scale(name);
    y = y + x.matmul(A[i].t()).matmul(B[i].t()) * s;
  }
  return y;
}

/// Every parameter of the case that the check differentiates, and float64
/// leaf copies of them for the reference.
struct Leaves {
  std::vector<torch::Tensor> lib;
  std::vector<torch::Tensor> ref;
};

Leaves leaves_of(Case& c) {
  Leaves leaves;
  leaves.lib.push_back(c.input);
  for (const auto& name : c.active) {
    leaves.lib.push_back(
        c.layer->lora_A[name]->as<torch::nn::Linear>()->weight);
  }
  for (const auto& name : c.active) {
    leaves.lib.push_back(
        c.layer->lora_B[name]->as<torch::nn::Linear>()->weight);
  }
  if (c.layer->bias.defined() && c.layer->bias.requires_grad()) {
    leaves.lib.push_back(c.layer->bias);
  }
  for (const auto& t : leaves.lib) {
    leaves.ref.push_back(t.detach().to(torch::kFloat64).requires_grad_(true));
  }
  return leaves;
}

/// Forward, gradients and second-order gradients (of the squared input
/// gradient) of the library against the float64 reference.
void check_case(Case c, double tolerance) {
  const auto leaves = leaves_of(c);
  const auto k = c.active.size();
  const auto split = [&](const std::vector<torch::Tensor>& all) {
    std::vector<torch::Tensor> A(all.begin() + 1, all.begin() + 1 + k);
    std::vector<torch::Tensor> B(all.begin() + 1 + k, all.begin() + 1 + 2 * k);
    torch::Tensor bias = c.layer->bias.defined()
        ? (all.size() > 1 + 2 * k ? all.back()
                                  : c.layer->bias.detach().to(torch::kFloat64))
        : torch::Tensor();
    return std::make_tuple(A, B, bias);
  };
  const auto [A, B, bias] = split(leaves.ref);
  const auto y_ref = reference_forward(c, leaves.ref[0], A, B, bias);
  const auto y = c.layer(c.input);
  const auto close = [&](const torch::Tensor& lib, const torch::Tensor& ref) {
    const auto scale = ref.abs().max().item<double>() + 1.0;
    return (lib.to(torch::kFloat64) - ref).abs().max().item<double>() <=
        tolerance * scale;
  };
  ASSERT_TRUE(close(y, y_ref)) << c.layer;

  const auto v = torch::randn_like(y_ref);
  using Tensors = std::vector<torch::Tensor>;
  const auto grads = torch::autograd::grad(
      Tensors{y}, leaves.lib, Tensors{v.to(y.scalar_type())}, true, true);
  const auto grads_ref =
      torch::autograd::grad(Tensors{y_ref}, leaves.ref, Tensors{v}, true, true);
  for (size_t i = 0; i < grads.size(); ++i) {
    ASSERT_TRUE(close(grads[i], grads_ref[i])) << "gradient " << i;
  }
  // Second order: d/d(params) of |dy/dx . v|^2.
  std::vector<torch::Tensor> params(leaves.lib.begin() + 1, leaves.lib.end());
  std::vector<torch::Tensor> params_ref(
      leaves.ref.begin() + 1, leaves.ref.end());
  const auto second = torch::autograd::grad(
      Tensors{grads[0].square().sum()}, params, Tensors{}, false, false, true);
  const auto second_ref = torch::autograd::grad(
      Tensors{grads_ref[0].square().sum()},
      params_ref,
      Tensors{},
      false,
      false,
      true);
  for (size_t i = 0; i < second.size(); ++i) {
    if (!second_ref[i].defined()) {
      continue;
    }
    ASSERT_TRUE(second[i].defined()) << "second-order " << i;
    ASSERT_TRUE(close(second[i], second_ref[i])) << "second-order " << i;
  }
}

/// A small model with a Linear in each place quantize reaches: a
/// Sequential, a ModuleList, a ModuleDict and a typed LoRALinear member.
struct NetImpl : torch::nn::Module {
  NetImpl() {
    seq = register_module(
        "seq",
        torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::Tanh()));
    list = register_module(
        "list", torch::nn::ModuleList(torch::nn::Linear(16, 16)));
    dict = register_module("dict", torch::nn::ModuleDict());
    dict->update({{"proj", std::make_shared<torch::nn::LinearImpl>(16, 12)}});
    typed = register_module("typed", torchlora::LoRALinear(12, 6));
    head = register_module("head", torch::nn::Linear(6, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = seq->forward(x);
    h = torchlora::linear_forward(*list[0], h);
    h = torchlora::layer_forward(*dict["proj"], h);
    return torchlora::layer_forward(*named_children()["head"], typed(h));
  }
  torch::nn::Sequential seq{nullptr};
  torch::nn::ModuleList list{nullptr};
  torch::nn::ModuleDict dict{nullptr};
  torchlora::LoRALinear typed{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Net);

class QuantizeTest : public torchlora_test::Seeded {};

} // namespace

TEST_F(QuantizeTest, Nf4TableIsQLoRAsNormalQuantiles) {
  // QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1)
  // at probabilities evenly spaced from 0.9677083 to 0.5 (the last left
  // out), an exact 0, scaled so the largest is 1.
  const double offset = 0.9677083;
  const auto ppf = [](const torch::Tensor& p) {
    return torch::erfinv(p * 2 - 1) * std::sqrt(2.0);
  };
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto positive =
      ppf(torch::linspace(offset, 0.5, 9, f64)).narrow(0, 0, 8);
  const auto negative =
      -ppf(torch::linspace(offset, 0.5, 8, f64)).narrow(0, 0, 7);
  auto values = std::get<0>(
      torch::cat({negative, torch::zeros({1}, f64), positive}).sort());
  values = values / values.abs().max();
  const auto table = nf4_table64();
  EXPECT_LT((values - table).abs().max().item<double>(), 2e-7);
  EXPECT_EQ(table[7].item<double>(), 0.0);
  EXPECT_EQ(table[0].item<double>(), -1.0);
  EXPECT_EQ(table[15].item<double>(), 1.0);
}

TEST_F(QuantizeTest, PackingRoundTripsEveryCode) {
  const auto codes = torch::randint(0, 16, {4096}, torch::kLong);
  const auto packed = torchlora::detail::pack_nibbles(codes);
  EXPECT_EQ(packed.scalar_type(), torch::kUInt8);
  EXPECT_EQ(packed.numel(), 2048);
  EXPECT_TRUE(torch::equal(torchlora::detail::unpack_nibbles(packed), codes));
  // Every byte: high nibble first.
  const auto bytes = torch::arange(256, torch::kLong);
  const auto unpacked =
      torchlora::detail::unpack_nibbles(bytes.to(torch::kUInt8)).view({256, 2});
  EXPECT_TRUE(torch::equal(unpacked.select(1, 0), bytes.floor_divide(16)));
  EXPECT_TRUE(torch::equal(unpacked.select(1, 1), bytes.remainder(16)));
  EXPECT_TRUE(torch::equal(
      torchlora::detail::pack_nibbles(unpacked.view(-1)),
      bytes.to(torch::kUInt8)));
}

TEST_F(QuantizeTest, CodesAreTheNearestAndDequantizeAsDefined) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 60; ++trial) {
    const auto in = uniform(rng, 1, 70);
    const auto out = uniform(rng, 1, 30);
    torch::nn::Linear linear(in, out);
    if (coin(rng, 0.2)) {
      torch::NoGradGuard no_grad;
      linear->weight.narrow(0, 0, 1).zero_(); // a zero row or block
    }
    const auto storage = random_storage(rng);
    torchlora::QuantizedLinear layer(linear, storage);
    const auto W = linear->weight.detach().to(torch::kFloat64);
    const auto reference = reference_weight(*layer);
    // The library's dequantization is the definition's, in float32.
    EXPECT_LT(
        (layer->dequantized_weight().to(torch::kFloat64) - reference)
            .abs()
            .max()
            .item<double>(),
        1e-6)
        << layer;
    const auto state = layer->named_state();
    if (storage.format() == QuantizedFormat::int8) {
      const auto scale = state[1].second.to(torch::kFloat64).unsqueeze(1);
      // Each code is W / scale rounded: within half a step.
      EXPECT_TRUE(
          ((W - reference).abs() <= scale * 0.5 + 1e-7).all().item<bool>());
      EXPECT_LE(state[0].second.abs().max().item<int64_t>(), 127);
      continue;
    }
    // NF4: each code is the nearest table value to W / (its block's scale
    // as stored): no other code is closer by more than rounding.
    const auto bs = storage.block_size();
    const auto blocks = (out * in + bs - 1) / bs;
    const auto bytes = state[0].second.to(torch::kLong);
    const auto codes =
        torch::stack({bytes.floor_divide(16), bytes.remainder(16)}, 1)
            .view(-1)
            .narrow(0, 0, out * in);
    EXPECT_EQ(bytes.numel(), blocks * bs / 2);
    const auto block_of = torch::arange(out * in).floor_divide(bs);
    const auto scale_of = [&](const torch::Tensor& absmax) {
      return absmax.index_select(0, block_of);
    };
    // The block scales as stored (double quantization: read back).
    const auto absmax = torchlora_test::reference_block_scales(*layer);
    const auto s = scale_of(absmax);
    const auto safe = torch::where(s != 0, s, torch::ones_like(s));
    const auto normalized = (W.view(-1) / safe).clamp(-1, 1);
    const auto table = nf4_table64();
    const auto distances =
        (normalized.unsqueeze(1) - table.unsqueeze(0)).abs(); // [n, 16]
    const auto chosen = distances.gather(1, codes.unsqueeze(1)).squeeze(1);
    const auto best = std::get<0>(distances.min(1));
    EXPECT_LT((chosen - best).max().item<double>(), 1e-6) << layer;
    // The scale is the block's largest magnitude: exactly, or within the
    // relative precision of double quantization (half a step of the log2
    // code, at most 2^(range / 508) - 1 for a group's range of logs).
    const auto padded =
        torch::constant_pad_nd(W.view(-1), {0, blocks * bs - out * in});
    const auto exact = std::get<0>(padded.view({blocks, bs}).abs().max(1));
    if (state.size() == 2) {
      EXPECT_LT((absmax - exact).abs().max().item<double>(), 1e-6);
    } else {
      EXPECT_TRUE(((absmax == 0) == (exact == 0)).all().item<bool>());
      const auto positive = exact > 0;
      const auto logs = exact.masked_select(positive).log2();
      const double range =
          (logs.max() - logs.min()).item<double>(); // one group here or more
      const auto ratio =
          absmax.masked_select(positive) / exact.masked_select(positive);
      // Half a step: the step covers the range from a bf16 value at most
      // 1.5 bf16 steps below the smallest logarithm, widened by 1/128 and
      // rounded to bf16.
      const double lowest = logs.abs().max().item<double>();
      EXPECT_LT(
          (ratio.log2().abs()).max().item<double>(),
          (range + lowest / 64) / 508 * 1.02 + 1e-6);
    }
  }
}

TEST_F(QuantizeTest, DoubleQuantizationKeepsSmallBlocksNextToLargeOnes) {
  // Rows 100 and 1000 times smaller than the rest: each block keeps its
  // scale's relative precision, so every row keeps NF4's error.
  torch::nn::Linear linear(64, 256);
  {
    torch::NoGradGuard no_grad;
    linear->weight.normal_();
    linear->weight[0].mul_(100);
    linear->weight[1].mul_(1e-3);
    linear->weight[2].zero_();
  }
  torchlora::QuantizedLinear layer(
      linear, QuantizedLinearOptions().double_quant(true));
  const auto W = linear->weight.detach().to(torch::kFloat64);
  const auto dq = layer->dequantized_weight().to(torch::kFloat64);
  for (int64_t row = 0; row < 4; ++row) {
    const double norm = W[row].norm().item<double>();
    const double error = (dq[row] - W[row]).norm().item<double>();
    if (row == 2) {
      EXPECT_EQ(error, 0.0);
    } else {
      EXPECT_LT(error, 0.15 * norm) << "row " << row;
    }
  }
}

TEST_F(QuantizeTest, DoubleQuantizationKeepsItsPrecisionInBf16) {
  // Rows of very different scales; a bf16 model, or a float32 one cast to
  // bf16 after quantizing: double quantization costs little over plain NF4.
  torch::nn::Linear linear(256, 64);
  {
    torch::NoGradGuard no_grad;
    linear->weight.mul_(torch::exp(torch::randn({64, 1}) * 1.5));
  }
  const auto W = linear->weight.detach().to(torch::kFloat64);
  const auto error = [&](torchlora::QuantizedLinear layer) {
    const auto dq = layer->dequantized_weight().to(torch::kFloat64);
    return ((dq - W).norm() / W.norm()).item<double>();
  };
  torchlora::QuantizedLinear f32_dq(
      linear, QuantizedLinearOptions().double_quant(true));
  f32_dq->to(torch::kBFloat16);
  linear->to(torch::kBFloat16);
  const double plain = error(torchlora::QuantizedLinear(linear));
  const double dq = error(torchlora::QuantizedLinear(
      linear, QuantizedLinearOptions().double_quant(true)));
  EXPECT_LT(dq, plain * 1.02);
  EXPECT_LT(error(f32_dq), plain * 1.02);
}

TEST_F(QuantizeTest, QuantizingTheDequantizedWeightGivesTheSameCodes) {
  std::mt19937 rng(12);
  for (int trial = 0; trial < 30; ++trial) {
    auto storage = random_storage(rng);
    storage.double_quant(false);
    torch::nn::Linear linear(uniform(rng, 1, 50), uniform(rng, 1, 20));
    torchlora::QuantizedLinear first(linear, storage);
    torch::nn::Linear again(linear->options);
    {
      torch::NoGradGuard no_grad;
      again->weight.copy_(first->dequantized_weight());
    }
    torchlora::QuantizedLinear second(again, storage);
    EXPECT_TRUE(torch::equal(first->weight, second->weight)) << first;
  }
}

TEST_F(QuantizeTest, LoRAOverAQuantizedBaseMatchesFloat64) {
  std::mt19937 rng(13);
  // The library in float64 (its scales cast by to()) against the
  // reference tightly; in float32 within float32's rounding.
  for (int trial = 0; trial < 40; ++trial) {
    SCOPED_TRACE("float64 trial " + std::to_string(trial));
    check_case(random_case(rng, torch::kFloat64), 1e-10);
  }
  for (int trial = 0; trial < 40; ++trial) {
    SCOPED_TRACE("float32 trial " + std::to_string(trial));
    check_case(random_case(rng, torch::kFloat32), 2e-5);
  }
}

TEST_F(QuantizeTest, QuantizedLinearAloneGivesInputAndBiasGradients) {
  torch::nn::Linear linear(20, 7);
  torchlora::QuantizedLinear layer(linear);
  layer->bias.set_requires_grad(true);
  const auto x = torch::randn({3, 5, 20}, torch::requires_grad());
  const auto y = layer(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{3, 5, 7}));
  const auto W = layer->dequantized_weight();
  EXPECT_TRUE(
      torch::allclose(y, torch::nn::functional::linear(x, W, layer->bias)));
  y.square().sum().backward();
  const auto g = 2 * y.detach();
  EXPECT_TRUE(torch::allclose(x.grad(), g.matmul(W), 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(
      layer->bias.grad(), g.sum(std::vector<int64_t>{0, 1}), 1e-5, 1e-5));
  EXPECT_FALSE(layer->weight.grad().defined());
  // Serving: no graph recorded.
  torch::NoGradGuard no_grad;
  EXPECT_FALSE(layer(x).requires_grad());
}

TEST_F(QuantizeTest, QuantizeConvertsTheModelAndInjectTrainsOverIt) {
  Net net;
  const auto x = torch::randn({4, 8});
  const auto paths = torchlora::quantize(net);
  EXPECT_EQ(
      paths,
      (std::vector<std::string>{"seq.0", "list.0", "dict.proj", "typed"}));
  EXPECT_NE(net->seq[0]->as<torchlora::QuantizedLinearImpl>(), nullptr);
  EXPECT_NE(net->typed->quantized_base(), nullptr);
  EXPECT_EQ(net->head->weight.scalar_type(), torch::kFloat32); // output head
  const auto keys = net->named_parameters().keys();
  for (const auto* key :
       {"seq.0.weight",
        "seq.0.weight_absmax",
        "seq.0.bias",
        "typed.weight",
        "typed.weight_absmax",
        "dict.proj.weight_absmax"}) {
    EXPECT_NE(std::find(keys.begin(), keys.end(), key), keys.end()) << key;
  }
  EXPECT_EQ(
      net->seq[0]->as<torchlora::QuantizedLinearImpl>()->weight.scalar_type(),
      torch::kUInt8);
  // Quantized already: a second call changes nothing.
  const auto before = torchlora_test::snapshot(*net);
  EXPECT_TRUE(torchlora::quantize(net).empty());
  torchlora_test::expect_unchanged(before, *net);

  // A quantized weight counts as the weights it stands for.
  EXPECT_EQ(torchlora::count_parameters(net).total, [] {
    Net plain;
    return torchlora::count_parameters(plain).total;
  }());
  const auto y_quantized = net(x);
  torchlora::inject_lora(
      net, torchlora::LoRAConfig(4).target_modules({"all-linear"}));
  EXPECT_TRUE(torch::equal(net(x), y_quantized)); // B starts at zero
  const auto codes = net->typed->weight.clone();
  torch::optim::Adam adam(net->parameters(), 1e-2); // codes included
  for (int step = 0; step < 3; ++step) {
    adam.zero_grad();
    net(x).square().mean().backward();
    adam.step();
  }
  EXPECT_TRUE(torch::equal(net->typed->weight, codes));
  const auto y_trained = net(x);
  EXPECT_FALSE(torch::allclose(y_trained, y_quantized));

  // torch::save / torch::load into a model quantized the same way.
  std::stringstream stream;
  torch::save(net, stream);
  Net copy;
  torchlora::quantize(copy);
  torchlora::inject_lora(
      copy, torchlora::LoRAConfig(4).target_modules({"all-linear"}));
  torch::load(copy, stream);
  EXPECT_TRUE(torch::equal(copy(x), y_trained));

  // clone() is deep.
  auto cloned =
      std::dynamic_pointer_cast<torchlora::LoRALinearImpl>(net->typed->clone());
  ASSERT_NE(cloned->quantized_base(), nullptr);
  EXPECT_NE(cloned->weight.data_ptr(), net->typed->weight.data_ptr());
  const auto h = torch::randn({2, 12});
  EXPECT_TRUE(torch::equal(cloned->forward(h), net->typed(h)));

  // to(dtype) casts the scales (the compute dtype), never the codes.
  net->to(torch::kFloat64);
  EXPECT_EQ(net->typed->weight.scalar_type(), torch::kUInt8);
  EXPECT_EQ(net->typed->quantized_base()->compute_dtype(), torch::kFloat64);
  EXPECT_TRUE(torch::allclose(
      net(x.to(torch::kFloat64)), y_trained.to(torch::kFloat64), 1e-5, 1e-6));
  net->to(torch::kFloat32);

  // merge_and_unload: a float model computing what the LoRA model did.
  torchlora::merge_and_unload(net);
  EXPECT_EQ(net->seq[0]->as<torchlora::QuantizedLinearImpl>(), nullptr);
  EXPECT_NE(net->seq[0]->as<torch::nn::LinearImpl>(), nullptr);
  EXPECT_EQ(net->typed->quantized_base(), nullptr);
  EXPECT_EQ(net->typed->weight.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::allclose(net(x), y_trained, 1e-5, 1e-6));
  for (const auto& item : net->named_parameters()) {
    EXPECT_EQ(item.key().find("lora_"), std::string::npos) << item.key();
    EXPECT_TRUE(item.value().is_floating_point()) << item.key();
  }
}

TEST_F(QuantizeTest, DequantizeKeepsAdaptersAndOutputs) {
  Net net;
  torchlora::quantize(
      net,
      torchlora::QuantizeOptions()
          .quantization(QuantizedLinearOptions().format(QuantizedFormat::int8))
          .target_modules({"seq.0", "typed"}));
  torchlora::inject_lora(
      net, torchlora::LoRAConfig(2).target_modules({"typed"}));
  {
    torch::NoGradGuard no_grad;
    net->typed->lora_B["default"]->as<torch::nn::Linear>()->weight.normal_();
  }
  const auto x = torch::randn({3, 8});
  const auto y = net(x);
  torchlora::dequantize(net);
  EXPECT_EQ(net->seq[0]->as<torchlora::QuantizedLinearImpl>(), nullptr);
  EXPECT_EQ(net->typed->quantized_base(), nullptr);
  EXPECT_TRUE(net->typed->has_adapter("default"));
  EXPECT_TRUE(torch::allclose(net(x), y, 1e-5, 1e-6));
  net->typed->merge(); // a float base merges again
  EXPECT_TRUE(torch::allclose(net(x), y, 1e-5, 1e-6));
}

TEST_F(QuantizeTest, AdapterFilesRoundTripOverAQuantizedBase) {
  const auto folder =
      std::filesystem::temp_directory_path() / "torchlora_quantize_adapter";
  std::filesystem::remove_all(folder);
  Net net;
  Net other;
  {
    // The same float weights, quantized the same way below.
    std::stringstream stream;
    torch::save(net, stream);
    torch::load(other, stream);
  }
  torchlora::quantize(net);
  const auto config = torchlora::LoRAConfig(3).target_modules({"all-linear"});
  torchlora::inject_lora(net, config);
  for (auto& item : net->named_parameters()) {
    if (item.key().find("lora_B") != std::string::npos) {
      torch::NoGradGuard no_grad;
      item.value().normal_();
    }
  }
  const auto x = torch::randn({2, 8});
  torchlora::save_adapter(*net, folder.string(), config);
  torchlora::quantize(other);
  torchlora::load_adapter(*other, folder.string());
  EXPECT_TRUE(torch::equal(other(x), net(x)));
  std::filesystem::remove_all(folder);
}

TEST_F(QuantizeTest, RefusalsNameTheValueAndChangeNothing) {
  torch::nn::Linear linear(10, 4);
  EXPECT_TORCHLORA_ERROR(
      torchlora::QuantizedLinear(
          linear, QuantizedLinearOptions().block_size(7)),
      "block_size must be even and at least 2, got 7");
  EXPECT_TORCHLORA_ERROR(
      torchlora::QuantizedLinear(
          linear,
          QuantizedLinearOptions()
              .format(QuantizedFormat::int8)
              .double_quant(true)),
      "double_quant applies to nf4 only, got format int8");
  EXPECT_TORCHLORA_ERROR(
      torchlora::QuantizedLinear(torch::nn::Linear(nullptr)),
      "cannot quantize an empty (nullptr) torch::nn::Linear");
  torchlora::QuantizedLinear layer(linear);
  EXPECT_TORCHLORA_ERROR(
      layer(torch::randn({2, 9})),
      "in_features = 10, got an input of shape [2, 9]");
  EXPECT_TORCHLORA_ERROR(
      layer(torch::randn({2, 10}, torch::kFloat64)),
      "computes in Float (the dtype of its scales, set by to(dtype)), got an "
      "input of Double");

  // A float checkpoint into the quantized layer.
  {
    std::stringstream stream;
    torch::save(linear, stream);
    const auto before = torchlora_test::snapshot(*layer);
    EXPECT_TORCHLORA_ERROR(
        torch::load(layer, stream),
        "cannot load 'weight' of Float and shape [4, 10] into this "
        "QuantizedLinear, which holds Byte of shape [32]");
    torchlora_test::expect_unchanged(before, *layer);
  }

  // Checkpoints of another kind into LoRA models, refused before anything
  // of the layer is read: float into quantized, quantized into float,
  // another block size.
  {
    const auto make = [](int which) {
      torch::manual_seed(5);
      torch::nn::Sequential model(torch::nn::Linear(8, 8));
      if (which > 0) {
        torchlora::quantize(
            model,
            torchlora::QuantizeOptions()
                .quantization(
                    QuantizedLinearOptions().block_size(which == 1 ? 64 : 32))
                .target_modules({"0"}));
      }
      torchlora::inject_lora(
          model, torchlora::LoRAConfig(2).target_modules({"0"}));
      return model;
    };
    const auto expect_refused =
        [&](int from, int into, const std::string& text) {
          std::stringstream stream;
          torch::save(make(from), stream);
          auto model = make(into);
          const auto x = torch::randn({2, 8});
          const auto y = model->forward(x);
          const auto before = torchlora_test::snapshot(*model);
          EXPECT_TORCHLORA_ERROR(torch::load(model, stream), text);
          torchlora_test::expect_unchanged(before, *model);
          EXPECT_TRUE(torch::equal(model->forward(x), y));
        };
    expect_refused(
        0,
        1,
        "cannot load 'weight' of Float and shape [8, 8] into this LoRALinear, which holds Byte of shape [32]");
    expect_refused(
        1,
        0,
        "cannot load 'weight' of Byte and shape [32] into this LoRALinear, which holds Float of shape [8, 8]");
    expect_refused(1, 2, "cannot load 'weight_absmax' of Float and shape [1]");
    // An archive lacking the scales.
    std::stringstream stream;
    torch::nn::Sequential partial(torch::nn::Linear(8, 8));
    {
      torch::NoGradGuard no_grad;
      auto& w = partial[0]->as<torch::nn::Linear>()->weight;
      w.set_requires_grad(false);
      w.set_data(make(1)[0]->as<torchlora::LoRALinearImpl>()->weight.clone());
    }
    torch::save(partial, stream);
    auto model = make(1);
    const auto before = torchlora_test::snapshot(*model);
    EXPECT_TORCHLORA_ERROR(
        torch::load(model, stream),
        "cannot load this LoRALinear: the archive has no 'weight_absmax'");
    torchlora_test::expect_unchanged(before, *model);
  }

  // Quantized already, another way; reset_parameters.
  {
    torch::nn::Sequential model(torch::nn::Linear(4, 4));
    torchlora::quantize(model);
    const auto before = torchlora_test::snapshot(*model);
    EXPECT_TORCHLORA_ERROR(
        torchlora::quantize(
            model,
            torchlora::QuantizeOptions().quantization(
                QuantizedLinearOptions().format(QuantizedFormat::int8))),
        "cannot quantize '0' as int8: it is quantized already, as "
        "torchlora::QuantizedLinear(in_features=4, out_features=4, bias=true, "
        "format=nf4, block_size=64)");
    EXPECT_TORCHLORA_ERROR(
        torchlora::quantize(
            model,
            torchlora::QuantizeOptions().quantization(
                QuantizedLinearOptions().double_quant(true))),
        "cannot quantize '0' as nf4 (block_size 64, double_quant)");
    EXPECT_TORCHLORA_ERROR(
        model[0]->as<torchlora::QuantizedLinearImpl>()->reset_parameters(),
        "reset_parameters on a QuantizedLinear (nf4)");
    torchlora_test::expect_unchanged(before, *model);
  }

  // modules_to_save over a quantized layer, also in save_adapter.
  {
    const auto folder =
        std::filesystem::temp_directory_path() / "torchlora_q_refused";
    std::filesystem::remove_all(folder);
    torch::nn::Sequential model(
        torch::nn::Linear(8, 8), torch::nn::Linear(8, 8));
    torchlora::quantize(model);
    torchlora::inject_lora(
        model, torchlora::LoRAConfig(2).target_modules({"0"}));
    EXPECT_TORCHLORA_ERROR(
        torchlora::save_adapter(
            *model,
            folder.string(),
            torchlora::SaveAdapterOptions().modules_to_save({"1"})),
        "save_adapter: modules_to_save takes in '1.weight', the codes of a "
        "quantized layer (Byte)");
    EXPECT_FALSE(std::filesystem::exists(folder / "adapter_model.safetensors"));
  }

  // modules_to_save over a quantized layer.
  {
    torch::nn::Sequential model(
        torch::nn::Linear(4, 4), torch::nn::Linear(4, 4));
    torchlora::quantize(model);
    const auto before = torchlora_test::snapshot(*model);
    EXPECT_TORCHLORA_ERROR(
        torchlora::inject_lora(
            model,
            torchlora::LoRAConfig(2).target_modules({"0"}).modules_to_save(
                {"1"})),
        "modules_to_save takes in '1', whose weight is quantized and cannot be "
        "trained");
    torchlora_test::expect_unchanged(before, *model);
  }

  // The codes changed in place between forward and backward: LibTorch's
  // saved-variable check, not a silently wrong gradient.
  {
    torchlora::QuantizedLinear q(torch::nn::Linear(6, 3));
    const auto x = torch::randn({2, 6}, torch::requires_grad());
    const auto y = q(x);
    {
      torch::NoGradGuard no_grad;
      q->weight.add_(1);
    }
    EXPECT_LIBTORCH_ERROR(
        y.sum().backward(), "modified by an inplace operation");
  }

  // The LoRA layer over it.
  torchlora::LoRALinear lora(layer, LoRAOptions(2));
  EXPECT_TORCHLORA_ERROR(
      lora->merge(), "cannot merge into a base weight quantized as nf4");
  EXPECT_TORCHLORA_ERROR(
      lora->add_adapter("d", LoRAOptions(2).use_dora(true)),
      "adapter \"d\" asks for DoRA (use_dora), which is not offered over a "
      "base quantized as nf4");
  EXPECT_TORCHLORA_ERROR(
      lora->add_adapter("p", LoRAOptions(2).init(torchlora::LoRAInit::pissa)),
      "adapter \"p\" asks for init pissa");
  EXPECT_FALSE(lora->has_adapter("d"));
  EXPECT_FALSE(lora->has_adapter("p"));
  EXPECT_TORCHLORA_ERROR(
      lora->reset_parameters(),
      "reset_parameters on a layer whose base is quantized (nf4)");
  EXPECT_TORCHLORA_ERROR(
      lora->quantize_base(QuantizedLinearOptions()),
      "quantize_base on a layer whose base is quantized already (nf4)");
  torchlora::LoRALinear trained(torch::nn::Linear(10, 4), LoRAOptions(2));
  EXPECT_TORCHLORA_ERROR(
      trained->quantize_base(QuantizedLinearOptions()),
      "quantize_base on a layer with adapters (\"default\")");
  {
    torch::nn::Sequential model(lora);
    const auto before = torchlora_test::snapshot(*model);
    EXPECT_TORCHLORA_ERROR(
        torchlora::merge(model),
        "cannot merge '0': cannot merge into a base weight quantized as nf4");
    EXPECT_TORCHLORA_ERROR(
        torchlora::merge(model, torchlora::MergeOptions().keep_original(false)),
        "cannot merge '0'");
    torchlora_test::expect_unchanged(before, *model);
  }

  // Model level.
  struct TypedImpl : torch::nn::Module {
    TypedImpl() {
      fc = register_module("fc", torch::nn::Linear(4, 4));
      other = register_module("other", torch::nn::Linear(4, 4));
    }
    torch::nn::Linear fc{nullptr}, other{nullptr};
  };
  auto typed = std::make_shared<TypedImpl>();
  const auto check_refused = [](torch::nn::Module& model,
                                const torchlora::QuantizeOptions& options,
                                const std::string& text) {
    const auto before = torchlora_test::snapshot(model);
    const auto tree = torchlora_test::module_tree(model);
    EXPECT_TORCHLORA_ERROR(torchlora::quantize(model, options), text);
    torchlora_test::expect_unchanged(before, model);
    EXPECT_EQ(torchlora_test::module_tree(model), tree);
  };
  check_refused(
      *typed,
      torchlora::QuantizeOptions().target_modules({"other", "fc"}),
      "cannot quantize 'fc': this torch::nn::Linear is also held outside the "
      "model's registry and containers (1 more reference(s)");
  struct TiedImpl : torch::nn::Module {
    TiedImpl() {
      seq = register_module(
          "seq", torch::nn::Sequential(torch::nn::Linear(4, 4)));
      register_parameter("tied", seq[0]->as<torch::nn::Linear>()->weight);
    }
    torch::nn::Sequential seq{nullptr};
  };
  TiedImpl tied;
  check_refused(
      tied,
      torchlora::QuantizeOptions(),
      "cannot quantize 'seq.0': its weight is also 'tied' (tied weights)");
  torch::nn::Sequential nan(torch::nn::Linear(4, 4), torch::nn::Linear(4, 4));
  {
    torch::NoGradGuard no_grad;
    nan[1]->as<torch::nn::Linear>()->weight[0][0] = NAN;
  }
  check_refused(
      *nan,
      torchlora::QuantizeOptions(),
      "cannot quantize '1': the weight (of shape [4, 4]) holds NaN or Inf");
  torch::nn::Sequential conv(
      torch::nn::Conv1d(2, 2, 1), torch::nn::Linear(4, 4));
  check_refused(
      *conv,
      torchlora::QuantizeOptions().target_modules({"0"}),
      "quantize converts Linear layers; target_modules");
  check_refused(
      *conv,
      torchlora::QuantizeOptions().target_modules({"missing"}),
      "no Linear layer matched");
  check_refused(
      *conv,
      torchlora::QuantizeOptions().quantization(
          QuantizedLinearOptions().block_size(0)),
      "block_size must be even and at least 2, got 0");
  torch::nn::Sequential adapted(torch::nn::Linear(4, 4));
  torchlora::inject_lora(
      adapted, torchlora::LoRAConfig(2).target_modules({"0"}));
  check_refused(
      *adapted,
      torchlora::QuantizeOptions(),
      "cannot quantize '0': it has adapters (\"default\") trained on its float "
      "weight. Quantize before inject_lora");
  // LibTorch's own typed members.
  torch::nn::TransformerEncoderLayer encoder(
      torch::nn::TransformerEncoderLayerOptions(8, 2).dim_feedforward(16));
  check_refused(
      *encoder,
      torchlora::QuantizeOptions().target_modules({"linear1"}),
      "cannot quantize 'linear1': this torch::nn::Linear is also held outside");
  check_refused(
      *encoder,
      torchlora::QuantizeOptions().target_modules({"out_proj"}),
      "cannot quantize 'self_attn.out_proj'");

  // A typed QuantizedLinear member cannot be swapped by merge_and_unload.
  struct HeldImpl : torch::nn::Module {
    HeldImpl() {
      q = register_module(
          "q", torchlora::QuantizedLinear(torch::nn::Linear(4, 4)));
    }
    torchlora::QuantizedLinear q{nullptr};
  };
  auto held = std::make_shared<HeldImpl>();
  EXPECT_TORCHLORA_ERROR(
      torchlora::merge_and_unload(*held),
      "cannot dequantize 'q': this torchlora::QuantizedLinear is also held "
      "outside");
  EXPECT_NE(held->q->weight.scalar_type(), torch::kFloat32);
}

TEST_F(QuantizeTest, QuantizedLoRAOnTheGpu_CUDA) {
  SKIP_WITHOUT_CUDA();
  std::mt19937 rng(14);
  for (int trial = 0; trial < 10; ++trial) {
    auto c = random_case(rng, torch::kFloat32);
    const auto y_cpu = c.layer(c.input);
    c.layer->to(torch::kCUDA);
    EXPECT_EQ(c.layer->weight.device().type(), torch::kCUDA);
    EXPECT_FALSE(c.layer->weight.is_floating_point());
    const auto y_gpu = c.layer(c.input.to(torch::kCUDA));
    EXPECT_TRUE(torch::allclose(y_gpu.cpu(), y_cpu, 1e-4, 1e-5));
    y_gpu.sum().backward();
  }
}

} // namespace torchlora_quantize_test
