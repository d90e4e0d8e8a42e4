// Tests of torchlora::LoRALinear (include/torchlora/linear.h).
#include "test_support.h"

#include <torchlora/detail/lora_linear_function.h>
#include <torchlora/linear.h>
#include <torchlora/parameters.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_linear_test {

using torchlora::LoRAInit;
using torchlora::LoRALinear;
using torchlora::LoRAOptions;
using torchlora_test::expect_unchanged;
using torchlora_test::snapshot;

namespace {

class LoRALinearTest : public torchlora_test::Seeded {};

/// The adapter's term of the LoRA formula in float64: s (x A^T) B^T.
torch::Tensor reference_delta(
    const torch::Tensor& x,
    const torch::Tensor& A,
    const torch::Tensor& B,
    double scaling) {
  return scaling *
      x.to(torch::kFloat64)
          .matmul(A.to(torch::kFloat64).t())
          .matmul(B.to(torch::kFloat64).t());
}

/// The LoRA formula in float64: x W^T + b + s (x A^T) B^T.
torch::Tensor reference_forward(
    const torch::Tensor& x,
    const torch::Tensor& W,
    const torch::Tensor& b,
    const torch::Tensor& A,
    const torch::Tensor& B,
    double scaling) {
  auto y = x.to(torch::kFloat64).matmul(W.to(torch::kFloat64).t());
  if (b.defined()) {
    y = y + b.to(torch::kFloat64);
  }
  return y + reference_delta(x, A, B, scaling);
}

torch::Tensor A_of(
    const LoRALinear& layer,
    const std::string& name = "default") {
  return layer->named_parameters()["lora_A." + name + ".weight"];
}

torch::Tensor B_of(
    const LoRALinear& layer,
    const std::string& name = "default") {
  return layer->named_parameters()["lora_B." + name + ".weight"];
}

/// alpha / r (alpha / sqrt(r) with rsLoRA), from the options as given.
double factor_of(const LoRAOptions& options) {
  const auto rank = static_cast<double>(options.rank());
  return options.alpha() / (options.use_rslora() ? std::sqrt(rank) : rank);
}

torch::Tensor reference_of(const LoRALinear& layer, const torch::Tensor& x) {
  return reference_forward(
      x,
      layer->weight,
      layer->bias,
      A_of(layer),
      B_of(layer),
      factor_of(layer->adapter_options("default")));
}

} // namespace

TEST_F(LoRALinearTest, FreshAdapterIsANoOpBitForBit) {
  for (const bool bias : {true, false}) {
    torch::nn::Linear base(torch::nn::LinearOptions(48, 24).bias(bias));
    LoRALinear layer(base, LoRAOptions(8).alpha(16));
    for (const auto& x : {torch::randn({5, 48}), torch::randn({3, 7, 48})}) {
      EXPECT_TRUE(torch::equal(layer(x), base(x)))
          << "bias=" << bias << " input " << x.sizes();
    }
  }
}

TEST_F(LoRALinearTest, GaussianInitIsANoOpToo) {
  torch::nn::Linear base(32, 16);
  LoRALinear layer(base, LoRAOptions(4).init(LoRAInit::gaussian));
  const auto x = torch::randn({6, 32});
  EXPECT_TRUE(torch::equal(layer(x), base(x)));
}

TEST_F(LoRALinearTest, ForwardMatchesFloat64ReferenceOfTheSeedFormula) {
  struct Case {
    bool bias;
    std::vector<int64_t> shape;
    LoRAOptions options;
  };
  const std::vector<Case> cases = {
      {true, {5, 40}, LoRAOptions(4).alpha(4)},
      {false, {5, 40}, LoRAOptions(4).alpha(12)},
      {true, {2, 3, 40}, LoRAOptions(8).alpha(3)},
      {false, {2, 3, 40}, LoRAOptions(8).alpha(16).use_rslora(true)},
      {true, {2, 2, 2, 40}, LoRAOptions(2).alpha(5).use_rslora(true)},
      {true, {40}, LoRAOptions(3).alpha(6)},
  };
  for (const auto& c : cases) {
    torch::nn::Linear base(torch::nn::LinearOptions(40, 24).bias(c.bias));
    LoRALinear layer(base, LoRAOptions(c.options).init(LoRAInit::random));
    const auto x = torch::randn(c.shape);
    const auto y = layer(x);
    const auto expected = reference_of(layer, x);
    std::vector<int64_t> out_shape = c.shape;
    out_shape.back() = 24;
    EXPECT_EQ(y.sizes().vec(), out_shape);
    EXPECT_TRUE(torch::allclose(
        y.to(torch::kFloat64), expected, /*rtol=*/1e-5, /*atol=*/1e-5))
        << "bias=" << c.bias << " shape " << x.sizes() << " max error "
        << (y.to(torch::kFloat64) - expected).abs().max();
    // The adapter really contributes: the output is not the base's.
    EXPECT_GT((y - base(x)).abs().max().item<double>(), 1e-3);
  }
}

TEST_F(LoRALinearTest, ScalingIsAlphaOverRankOrOverSqrtRankWithRsLoRA) {
  torch::nn::Linear base(16, 16);
  LoRALinear plain(base, LoRAOptions(8).alpha(16));
  EXPECT_DOUBLE_EQ(plain->scaling("default"), 2.0);
  LoRALinear rs(
      torch::nn::Linear(16, 16), LoRAOptions(16).alpha(8).use_rslora(true));
  EXPECT_DOUBLE_EQ(rs->scaling("default"), 2.0);
  LoRALinear default_alpha(torch::nn::Linear(16, 16), LoRAOptions(4));
  EXPECT_DOUBLE_EQ(default_alpha->scaling("default"), 0.25);
}

TEST_F(LoRALinearTest, OnlyAdaptersReceiveGradientsEqualToTheReference) {
  torch::nn::Linear base(12, 7);
  LoRALinear layer(base, LoRAOptions(3).alpha(5).init(LoRAInit::random));
  layer->to(torch::kFloat64);
  const auto x = torch::randn({4, 12}, torch::kFloat64);
  const auto upstream = torch::randn({4, 7}, torch::kFloat64);
  (layer(x) * upstream).sum().backward();

  EXPECT_FALSE(layer->weight.grad().defined());
  EXPECT_FALSE(layer->bias.grad().defined());
  EXPECT_FALSE(base->weight.requires_grad());

  const auto A = A_of(layer).detach().clone().requires_grad_(true);
  const auto B = B_of(layer).detach().clone().requires_grad_(true);
  (reference_forward(
       x,
       layer->weight,
       layer->bias,
       A,
       B,
       factor_of(layer->adapter_options("default"))) *
   upstream)
      .sum()
      .backward();
  EXPECT_TRUE(torch::allclose(A_of(layer).grad(), A.grad(), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(B_of(layer).grad(), B.grad(), 1e-12, 1e-12));
}

TEST_F(LoRALinearTest, GradientsPassAFiniteDifferenceCheckInFloat64) {
  LoRALinear layer(
      torch::nn::Linear(6, 5), LoRAOptions(2).alpha(3).init(LoRAInit::random));
  layer->to(torch::kFloat64);
  const auto x = torch::randn({3, 6}, torch::kFloat64).requires_grad_(true);
  const auto upstream = torch::randn({3, 5}, torch::kFloat64);
  auto loss = [&] { return (layer(x) * upstream).sum(); };
  loss().backward();

  const double eps = 1e-6;
  torch::NoGradGuard no_grad;
  for (const auto& tensor : {A_of(layer), B_of(layer), x}) {
    const auto analytic = tensor.grad().clone();
    auto flat = tensor.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double saved = flat[i].item<double>();
      flat[i] = saved + eps;
      const double up = loss().item<double>();
      flat[i] = saved - eps;
      const double down = loss().item<double>();
      flat[i] = saved;
      const double numeric = (up - down) / (2 * eps);
      EXPECT_NEAR(analytic.view({-1})[i].item<double>(), numeric, 1e-7)
          << "element " << i << " of a tensor of shape " << tensor.sizes();
    }
  }
}

TEST_F(LoRALinearTest, DropoutAppliesToTheAdapterInputOnly) {
  torch::nn::Linear base(20, 10);
  LoRALinear layer(
      base, LoRAOptions(4).alpha(8).dropout(0.5).init(LoRAInit::random));
  layer->train();
  const auto x = torch::randn({6, 20});

  torch::manual_seed(123);
  const auto y = layer(x);
  torch::manual_seed(123);
  const auto dropped = torch::nn::functional::dropout(
      x, torch::nn::functional::DropoutFuncOptions().p(0.5).training(true));
  const auto expected = base(x).to(torch::kFloat64) +
      reference_delta(dropped, A_of(layer), B_of(layer), 2.0);
  EXPECT_TRUE(torch::allclose(y.to(torch::kFloat64), expected, 1e-5, 1e-5));

  // A zero B leaves the base path: dropout never touches it.
  LoRALinear fresh(base, LoRAOptions(4).dropout(0.5));
  fresh->train();
  EXPECT_TRUE(torch::equal(fresh(x), base(x)));
}

TEST_F(LoRALinearTest, EvalIsDeterministicAndDrawsNoRandomNumbers) {
  LoRALinear layer(
      torch::nn::Linear(20, 10),
      LoRAOptions(4).dropout(0.3).init(LoRAInit::random));
  layer->eval();
  const auto x = torch::randn({6, 20});
  torch::manual_seed(7);
  const auto first = layer(x);
  const auto draw_after = torch::rand({1});
  torch::manual_seed(7);
  const auto draw_without = torch::rand({1});
  EXPECT_TRUE(torch::equal(first, layer(x)));
  EXPECT_TRUE(torch::equal(draw_after, draw_without));
  EXPECT_TRUE(torch::allclose(
      first.to(torch::kFloat64), reference_of(layer, x), 1e-5, 1e-5));
}

TEST_F(LoRALinearTest, ZeroDropoutInTrainingDrawsNoRandomNumbers) {
  LoRALinear layer(torch::nn::Linear(20, 10), LoRAOptions(4));
  layer->train();
  const auto x = torch::randn({6, 20});
  torch::manual_seed(7);
  layer(x);
  const auto draw_after = torch::rand({1});
  torch::manual_seed(7);
  EXPECT_TRUE(torch::equal(draw_after, torch::rand({1})));
}

TEST_F(LoRALinearTest, SharesTheBaseTensorsAndFreezesThem) {
  torch::nn::Linear base(64, 32);
  LoRALinear layer(base, LoRAOptions(8).alpha(16).dropout(0.1));
  EXPECT_TRUE(layer->weight.is_same(base->weight));
  EXPECT_TRUE(layer->bias.is_same(base->bias));
  EXPECT_EQ(layer->weight.data_ptr(), base->weight.data_ptr());
  EXPECT_EQ(layer->base_layer().get(), base.get());
  EXPECT_FALSE(base->weight.requires_grad());
  EXPECT_FALSE(base->bias.requires_grad());
  {
    torch::NoGradGuard no_grad;
    base->weight.mul_(2);
  }
  EXPECT_TRUE(torch::equal(layer->weight, base->weight));
}

TEST_F(LoRALinearTest, RegistersPlainLinearNamesAndPerAdapterMatrices) {
  LoRALinear layer(torch::nn::Linear(64, 32), LoRAOptions(8));
  layer->add_adapter("fr", LoRAOptions(2));
  const auto params = layer->named_parameters();
  EXPECT_EQ(
      params.keys(),
      (std::vector<std::string>{
          "weight",
          "bias",
          "lora_A.default.weight",
          "lora_A.fr.weight",
          "lora_B.default.weight",
          "lora_B.fr.weight"}));
  EXPECT_EQ(params["lora_A.default.weight"].sizes(), (c10::IntArrayRef{8, 64}));
  EXPECT_EQ(params["lora_B.default.weight"].sizes(), (c10::IntArrayRef{32, 8}));
  EXPECT_EQ(params["lora_A.fr.weight"].sizes(), (c10::IntArrayRef{2, 64}));
  EXPECT_EQ(params["lora_B.fr.weight"].sizes(), (c10::IntArrayRef{32, 2}));
  EXPECT_EQ(
      layer->adapter_names(), (std::vector<std::string>{"default", "fr"}));
}

TEST_F(LoRALinearTest, TwoAdaptersAddBothProducts) {
  torch::nn::Linear base(10, 6);
  LoRALinear layer(base, LoRAOptions(2).alpha(2).init(LoRAInit::random));
  layer->add_adapter("fr", LoRAOptions(3).alpha(6).init(LoRAInit::random));
  const auto x = torch::randn({4, 10});
  const auto expected =
      reference_forward(
          x, layer->weight, layer->bias, A_of(layer), B_of(layer), 1.0) +
      reference_delta(x, A_of(layer, "fr"), B_of(layer, "fr"), 2.0);
  EXPECT_TRUE(
      torch::allclose(layer(x).to(torch::kFloat64), expected, 1e-5, 1e-5));
}

TEST_F(LoRALinearTest, FromLinearOptionsIsAPlainTrainableLinear) {
  LoRALinear ready(torch::nn::LinearOptions(64, 32));
  EXPECT_EQ(
      ready->named_parameters().keys(),
      (std::vector<std::string>{"weight", "bias"}));
  EXPECT_TRUE(ready->weight.requires_grad());
  EXPECT_TRUE(ready->bias.requires_grad());
  EXPECT_TRUE(ready->adapter_names().empty());
  EXPECT_EQ(ready->named_children().size(), 0u);
  const auto x = torch::randn({3, 64});
  EXPECT_TRUE(torch::equal(
      ready(x), torch::nn::functional::linear(x, ready->weight, ready->bias)));

  ready->add_adapter("default", LoRAOptions(4));
  EXPECT_FALSE(ready->weight.requires_grad());
  EXPECT_FALSE(ready->bias.requires_grad());
  EXPECT_TRUE(A_of(ready).requires_grad());

  LoRALinear no_bias(torch::nn::LinearOptions(8, 4).bias(false));
  EXPECT_FALSE(no_bias->bias.defined());
  EXPECT_EQ(
      no_bias->named_parameters().keys(), (std::vector<std::string>{"weight"}));
  LoRALinear two_ints(8, 4);
  EXPECT_EQ(two_ints->options.out_features(), 4);
}

TEST_F(LoRALinearTest, CheckpointsOfAPlainLinearLoadBothWays) {
  const auto dir = ::testing::TempDir();
  torch::nn::Linear plain(16, 8);
  torch::save(plain, dir + "/plain_linear.pt");
  LoRALinear ready(torch::nn::LinearOptions(16, 8));
  torch::load(ready, dir + "/plain_linear.pt");
  EXPECT_TRUE(torch::equal(ready->weight, plain->weight));
  EXPECT_TRUE(torch::equal(ready->bias, plain->bias));

  torch::save(ready, dir + "/lora_linear.pt");
  torch::nn::Linear back(16, 8);
  torch::load(back, dir + "/lora_linear.pt");
  EXPECT_TRUE(torch::equal(back->weight, plain->weight));
}

TEST_F(LoRALinearTest, AdaptedLayersSaveAndLoadWithTheirAdapters) {
  const auto path = ::testing::TempDir() + "/adapted_linear.pt";
  LoRALinear trained(
      torch::nn::Linear(16, 8), LoRAOptions(4).init(LoRAInit::random));
  torch::save(trained, path);
  LoRALinear restored(torch::nn::Linear(16, 8), LoRAOptions(4));
  torch::load(restored, path);
  const auto x = torch::randn({2, 16});
  EXPECT_TRUE(torch::equal(restored(x), trained(x)));
}

TEST_F(LoRALinearTest, RankZeroWrapsTheFrozenBaseWithoutAnAdapter) {
  torch::nn::Linear base(8, 4);
  LoRALinear layer(base, LoRAOptions(0));
  EXPECT_TRUE(layer->adapter_names().empty());
  EXPECT_FALSE(base->weight.requires_grad());
  EXPECT_EQ(layer->named_parameters().size(), 2u);
  const auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::equal(layer(x), base(x)));
}

TEST_F(LoRALinearTest, AdoptingKeepsTrainabilityAsItWas) {
  torch::nn::Linear base(8, 4);
  LoRALinear adopted(base);
  EXPECT_TRUE(adopted->weight.is_same(base->weight));
  EXPECT_TRUE(adopted->weight.requires_grad());
  EXPECT_TRUE(adopted->adapter_names().empty());
}

TEST_F(LoRALinearTest, TrainAndEvalNeverUnfreezeTheBase) {
  LoRALinear layer(torch::nn::Linear(8, 4), LoRAOptions(2));
  layer->eval();
  layer->train();
  layer->train(true);
  EXPECT_FALSE(layer->weight.requires_grad());
  EXPECT_FALSE(layer->bias.requires_grad());
  EXPECT_TRUE(A_of(layer).requires_grad());
  EXPECT_TRUE(layer->is_training());
}

TEST_F(LoRALinearTest, CloneIsIndependentStillFrozenAndEqual) {
  torch::nn::Linear base(12, 6);
  LoRALinear layer(base, LoRAOptions(3).dropout(0.2).init(LoRAInit::random));
  layer->add_adapter("fr", LoRAOptions(2).init(LoRAInit::random));
  layer->eval();
  auto copy =
      std::dynamic_pointer_cast<torchlora::LoRALinearImpl>(layer->clone());
  ASSERT_NE(copy, nullptr);

  EXPECT_FALSE(copy->is_training());
  EXPECT_EQ(copy->adapter_names(), layer->adapter_names());
  const auto x = torch::randn({4, 12});
  const auto y = layer(x);
  EXPECT_TRUE(torch::equal(copy->forward(x), y));
  const auto originals = layer->named_parameters();
  for (const auto& item : copy->named_parameters()) {
    const auto& original = originals[item.key()];
    EXPECT_NE(item.value().data_ptr(), original.data_ptr()) << item.key();
    EXPECT_EQ(item.value().requires_grad(), original.requires_grad())
        << item.key();
  }
  EXPECT_NE(copy->base_layer().get(), base.get());
  EXPECT_TRUE(copy->weight.is_same(copy->base_layer()->weight));

  {
    torch::NoGradGuard no_grad;
    copy->named_parameters()["lora_B.default.weight"].add_(1);
    copy->weight.add_(1);
  }
  EXPECT_TRUE(torch::equal(layer(x), y));
  EXPECT_FALSE(torch::equal(copy->forward(x), y));
  EXPECT_FALSE(torch::equal(copy->weight, base->weight));
}

TEST_F(LoRALinearTest, CloneToTheSameDeviceSharesNothing) {
  LoRALinear layer(
      torch::nn::Linear(6, 4), LoRAOptions(2).init(LoRAInit::random));
  auto copy = std::dynamic_pointer_cast<torchlora::LoRALinearImpl>(
      layer->clone(torch::Device(torch::kCPU)));
  ASSERT_NE(copy, nullptr);
  const auto originals = layer->named_parameters();
  for (const auto& item : copy->named_parameters()) {
    EXPECT_NE(item.value().data_ptr(), originals[item.key()].data_ptr())
        << item.key();
    EXPECT_TRUE(torch::equal(item.value(), originals[item.key()]))
        << item.key();
  }
}

TEST_F(LoRALinearTest, AnEmptyBatchGivesAnEmptyOutput) {
  LoRALinear layer(
      torch::nn::Linear(6, 4), LoRAOptions(2).init(LoRAInit::random));
  EXPECT_EQ(layer(torch::randn({0, 6})).sizes(), (c10::IntArrayRef{0, 4}));
  EXPECT_EQ(
      layer(torch::randn({2, 0, 6})).sizes(), (c10::IntArrayRef{2, 0, 4}));
}

TEST_F(LoRALinearTest, DeletingTheLastAdapterLeavesAPlainLinearsParameters) {
  torch::nn::Linear base(6, 4);
  LoRALinear layer(base, LoRAOptions(2).init(LoRAInit::random));
  layer->add_adapter("fr", LoRAOptions(1));
  layer->delete_adapter("default");
  EXPECT_EQ(
      layer->named_parameters().keys(),
      (std::vector<std::string>{
          "weight", "bias", "lora_A.fr.weight", "lora_B.fr.weight"}));
  EXPECT_EQ(layer->lora_A->named_children().size(), 1u);
  layer->delete_adapter("fr");
  EXPECT_EQ(
      layer->named_parameters().keys(),
      (std::vector<std::string>{"weight", "bias"}));
  EXPECT_EQ(layer->named_children().size(), 0u);
  const auto x = torch::randn({3, 6});
  EXPECT_TRUE(torch::equal(layer(x), base(x)));
  EXPECT_TORCHLORA_ERROR(
      layer->delete_adapter("fr"),
      "has no adapter named \"fr\" (it has: none)");
  layer->add_adapter("again", LoRAOptions(2));
  EXPECT_EQ(layer->adapter_names(), (std::vector<std::string>{"again"}));
}

TEST_F(LoRALinearTest, CloneInsideAContainerGivesALoRALayer) {
  torch::nn::Sequential model(
      LoRALinear(
          torch::nn::Linear(6, 6), LoRAOptions(2).init(LoRAInit::random)),
      torch::nn::ReLU());
  auto copy =
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  ASSERT_NE(copy, nullptr);
  const auto x = torch::randn({2, 6});
  EXPECT_TRUE(torch::equal(copy->forward(x), model->forward(x)));
  EXPECT_NE(copy->ptr(0)->as<torchlora::LoRALinearImpl>(), nullptr);
  EXPECT_FALSE(copy->named_parameters()["0.weight"].requires_grad());
}

TEST_F(LoRALinearTest, ToMovesAdaptersAndTheSharedBase) {
  torch::nn::Linear base(8, 4);
  LoRALinear layer(base, LoRAOptions(2).init(LoRAInit::random));
  const auto x = torch::randn({3, 8});
  const auto before = layer(x).to(torch::kFloat64);
  layer->to(torch::kFloat64);
  for (const auto& item : layer->named_parameters()) {
    EXPECT_EQ(item.value().scalar_type(), torch::kFloat64) << item.key();
  }
  EXPECT_EQ(base->weight.scalar_type(), torch::kFloat64);
  EXPECT_FALSE(layer->weight.requires_grad());
  EXPECT_TRUE(A_of(layer).requires_grad());
  EXPECT_TRUE(
      torch::allclose(layer(x.to(torch::kFloat64)), before, 1e-5, 1e-5));
}

TEST_F(LoRALinearTest, AdapterDtypeCanDifferFromTheBase) {
  torch::nn::Linear base(16, 8);
  base->to(torch::kFloat64);
  LoRALinear layer(
      base,
      LoRAOptions(4).alpha(8).dtype(torch::kFloat32).init(LoRAInit::random));
  EXPECT_EQ(A_of(layer).scalar_type(), torch::kFloat32);
  EXPECT_EQ(B_of(layer).scalar_type(), torch::kFloat32);
  const auto x = torch::randn({5, 16}, torch::kFloat64);
  const auto y = layer(x);
  EXPECT_EQ(y.scalar_type(), torch::kFloat64);
  EXPECT_TRUE(torch::allclose(y, reference_of(layer, x), 1e-5, 1e-5));
}

TEST_F(LoRALinearTest, PrettyPrintsLikeLibTorch) {
  LoRALinear layer(
      torch::nn::Linear(64, 32), LoRAOptions(8).alpha(16).dropout(0.1));
  std::ostringstream single;
  layer->pretty_print(single);
  EXPECT_EQ(
      single.str(),
      "torchlora::LoRALinear(in_features=64, out_features=32, bias=true, "
      "rank=8, alpha=16, dropout=0.1)");

  layer->add_adapter("fr", LoRAOptions(4).use_rslora(true));
  std::ostringstream several;
  layer->pretty_print(several);
  EXPECT_EQ(
      several.str(),
      "torchlora::LoRALinear(in_features=64, out_features=32, bias=true, "
      "default=(rank=8, alpha=16, dropout=0.1), "
      "fr=(rank=4, alpha=1, dropout=0, use_rslora=true))");

  std::ostringstream plain;
  LoRALinear(torch::nn::LinearOptions(3, 2).bias(false))->pretty_print(plain);
  EXPECT_EQ(
      plain.str(),
      "torchlora::LoRALinear(in_features=3, out_features=2, bias=false)");
}

TEST_F(LoRALinearTest, TheSeedsSavingExample) {
  // 4096 x 4096 at r = 8: 65,536 trainable of 16,777,216 in the weight.
  LoRALinear layer(
      torch::nn::Linear(torch::nn::LinearOptions(4096, 4096).bias(false)),
      LoRAOptions(8));
  const auto counts = torchlora::count_parameters(*layer);
  EXPECT_EQ(counts.trainable, 65536);
  EXPECT_EQ(counts.total, 16777216 + 65536);
  EXPECT_EQ((counts.total - counts.trainable) / counts.trainable, 256);
}

// ---------------------------------------------------------------- bad input

TEST_F(LoRALinearTest, NegativeRankIsAnErrorAndLeavesTheBaseAlone) {
  torch::nn::Linear base(8, 4);
  const auto before = snapshot(*base);
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(base, LoRAOptions(-1)), "rank must be >= 0, got -1");
  expect_unchanged(before, *base);

  LoRALinear layer(torch::nn::LinearOptions(8, 4));
  const auto layer_before = snapshot(*layer);
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("default", LoRAOptions(-3)),
      "needs a rank > 0, got -3");
  expect_unchanged(layer_before, *layer);
}

TEST_F(LoRALinearTest, AddAdapterWithRankZeroIsAnError) {
  LoRALinear layer(torch::nn::LinearOptions(8, 4));
  const auto before = snapshot(*layer);
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("default", LoRAOptions(0)),
      "add_adapter(\"default\") needs a rank > 0, got 0");
  expect_unchanged(before, *layer);
  EXPECT_TRUE(layer->adapter_names().empty());
}

TEST_F(LoRALinearTest, NonPositiveAlphaIsAnError) {
  torch::nn::Linear base(8, 4);
  const auto before = snapshot(*base);
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(base, LoRAOptions(2).alpha(0)),
      "alpha must be a finite number > 0, got 0");
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(base, LoRAOptions(2).alpha(-1.5)), "got -1.5");
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(base, LoRAOptions(2).alpha(std::nan(""))), "got nan");
  expect_unchanged(before, *base);

  LoRALinear layer(torch::nn::LinearOptions(8, 4));
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("x", LoRAOptions(2).alpha(-2)),
      "alpha must be a finite number > 0, got -2");
  EXPECT_TRUE(layer->adapter_names().empty());
}

TEST_F(LoRALinearTest, DropoutOutsideZeroToOneIsAnError) {
  torch::nn::Linear base(8, 4);
  const auto before = snapshot(*base);
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(base, LoRAOptions(2).dropout(1.0)),
      "dropout must be in [0, 1), got 1");
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(base, LoRAOptions(2).dropout(-0.25)),
      "dropout must be in [0, 1), got -0.25");
  expect_unchanged(before, *base);
}

TEST_F(LoRALinearTest, NonFloatingAdapterDtypeIsAnError) {
  torch::nn::Linear base(8, 4);
  const auto before = snapshot(*base);
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(base, LoRAOptions(2).dtype(torch::kInt64)),
      "adapter dtype must be float32, float64, float16 or bfloat16, got Long");
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(base, LoRAOptions(2).dtype(torch::kComplexFloat)),
      "adapter dtype must be float32, float64, float16 or bfloat16, got "
      "ComplexFloat");
  expect_unchanged(before, *base);
}

TEST_F(LoRALinearTest, WrappingAnEmptyLinearIsAnError) {
  torch::nn::Linear empty{nullptr};
  EXPECT_TORCHLORA_ERROR(
      LoRALinear(empty, LoRAOptions(4)),
      "cannot wrap an empty (nullptr) Linear");
  EXPECT_TORCHLORA_ERROR(
      LoRALinear{empty}, "cannot wrap an empty (nullptr) Linear");
}

TEST_F(LoRALinearTest, InputWithTheWrongLastDimensionIsAnError) {
  LoRALinear layer(torch::nn::Linear(64, 32), LoRAOptions(8));
  EXPECT_TORCHLORA_ERROR(
      layer(torch::randn({4, 10, 63})),
      "last dimension to be in_features = 64, got an input of shape [4, 10, 63]");
  EXPECT_TORCHLORA_ERROR(
      layer(torch::tensor(1.0f)), "got an input of shape []");
  LoRALinear plain(torch::nn::LinearOptions(5, 2));
  EXPECT_TORCHLORA_ERROR(
      plain(torch::randn({2, 4})), "got an input of shape [2, 4]");
}

TEST_F(LoRALinearTest, BadAdapterNamesAreErrors) {
  LoRALinear layer(torch::nn::Linear(8, 4), LoRAOptions(2));
  const auto before = snapshot(*layer);
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("", LoRAOptions(2)),
      "an adapter name must not be empty, got \"\"");
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("a.b", LoRAOptions(2)),
      "an adapter name must not contain '.', got \"a.b\"");
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("/tmp/x", LoRAOptions(2)),
      "an adapter name must not contain '/' or '\\' (it names a folder of "
      "adapter files), got \"/tmp/x\"");
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("default", LoRAOptions(2)),
      "already has an adapter named \"default\"");
  expect_unchanged(before, *layer);
  EXPECT_EQ(layer->adapter_names(), (std::vector<std::string>{"default"}));
}

TEST_F(LoRALinearTest, AskingForAMissingAdapterIsAnError) {
  LoRALinear layer(torch::nn::Linear(8, 4), LoRAOptions(2));
  EXPECT_TORCHLORA_ERROR(
      layer->scaling("fr"),
      "has no adapter named \"fr\" (it has: \"default\")");
}

// ---------------------------------------------------------------- CUDA

TEST_F(LoRALinearTest, ForwardBackwardAndMoves_CUDA) {
  SKIP_WITHOUT_CUDA();
  const torch::Device cuda(torch::kCUDA);
  torch::nn::Linear base(64, 32);
  base->to(cuda);
  LoRALinear layer(base, LoRAOptions(8).alpha(16).init(LoRAInit::random));
  EXPECT_TRUE(A_of(layer).is_cuda());
  EXPECT_TRUE(B_of(layer).is_cuda());
  const auto x = torch::randn({4, 10, 64}, cuda);
  const auto y = layer(x);
  EXPECT_TRUE(y.is_cuda());
  EXPECT_TRUE(torch::allclose(
      y.cpu().to(torch::kFloat64), reference_of(layer, x).cpu(), 1e-4, 1e-4));
  y.sum().backward();
  EXPECT_TRUE(A_of(layer).grad().is_cuda());
  EXPECT_FALSE(layer->weight.grad().defined());

  LoRALinear fresh(torch::nn::Linear(64, 32), LoRAOptions(4));
  fresh->to(cuda);
  for (const auto& item : fresh->named_parameters()) {
    EXPECT_TRUE(item.value().is_cuda()) << item.key();
  }
  EXPECT_TRUE(torch::equal(fresh(x), fresh->base_layer()->forward(x)));

  auto on_cpu = std::dynamic_pointer_cast<torchlora::LoRALinearImpl>(
      layer->clone(torch::Device(torch::kCPU)));
  EXPECT_TRUE(on_cpu->weight.device().is_cpu());
  EXPECT_TRUE(torch::allclose(on_cpu->forward(x.cpu()), y.cpu(), 1e-4, 1e-4));

  torch::nn::Linear bf16_base(64, 32);
  bf16_base->to(cuda, torch::kBFloat16);
  LoRALinear bf16(
      bf16_base, LoRAOptions(8).dtype(torch::kFloat32).init(LoRAInit::random));
  EXPECT_EQ(A_of(bf16).scalar_type(), torch::kFloat32);
  const auto y16 = bf16(x.to(torch::kBFloat16));
  EXPECT_EQ(y16.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::allclose(
      y16.cpu().to(torch::kFloat64),
      reference_of(bf16, x.to(torch::kBFloat16)).cpu(),
      2e-2,
      2e-2));
}

// ------------------------------------------------- the fused forward/backward

namespace {

/// Gradients of sum(y * upstream) for the LoRA formula by plain autograd,
/// and by LoRALinearFunction with `fold`, all in float64.
void expect_function_matches_reference(
    int64_t rows,
    int64_t in,
    int64_t out,
    bool bias,
    bool fold,
    bool base_trainable) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat64);
  const auto x = torch::randn({rows, in}, options).requires_grad_(true);
  const auto W =
      torch::randn({out, in}, options).requires_grad_(base_trainable);
  const auto b = bias
      ? torch::randn({out}, options).requires_grad_(base_trainable)
      : torch::empty({0}, options);
  const auto A = torch::randn({3, in}, options).requires_grad_(true);
  const auto B = torch::randn({out, 3}, options).requires_grad_(true);
  const double s = 1.7;
  const auto upstream = torch::randn({rows, out}, options);

  const auto y =
      torchlora::detail::LoRALinearFunction::apply(x, W, b, A, B, s, fold);
  auto reference = x.matmul(W.t()) + s * x.matmul(A.t()).matmul(B.t());
  if (bias) {
    reference = reference + b;
  }
  EXPECT_TRUE(torch::allclose(y, reference, 1e-12, 1e-12)) << "fold=" << fold;

  std::vector<torch::Tensor> inputs = {x, A, B};
  if (base_trainable) {
    inputs.push_back(W);
    if (bias) {
      inputs.push_back(b);
    }
  }
  const auto fused = torch::autograd::grad({(y * upstream).sum()}, inputs);
  const auto expected =
      torch::autograd::grad({(reference * upstream).sum()}, inputs);
  const char* names[] = {"x", "A", "B", "W", "b"};
  for (size_t i = 0; i < inputs.size(); ++i) {
    EXPECT_TRUE(torch::allclose(fused[i], expected[i], 1e-12, 1e-12))
        << "gradient of " << names[i] << ", fold=" << fold << ", bias=" << bias;
  }
}

} // namespace

TEST_F(LoRALinearTest, TheFusedFunctionMatchesAutogradOfTheReferenceInFloat64) {
  for (const bool fold : {false, true}) {
    for (const bool bias : {true, false}) {
      for (const bool base_trainable : {false, true}) {
        expect_function_matches_reference(
            40, 12, 9, bias, fold, base_trainable);
        expect_function_matches_reference(3, 7, 12, bias, fold, base_trainable);
      }
    }
  }
}

TEST_F(LoRALinearTest, BothStrategiesAreChosenAndAgree) {
  using torchlora::detail::fold_adapter_into_weight;
  EXPECT_TRUE(fold_adapter_into_weight(2048, 1024, 1024, torch::kFloat32));
  EXPECT_FALSE(fold_adapter_into_weight(16, 1024, 1024, torch::kFloat32));
  EXPECT_FALSE(fold_adapter_into_weight(8192, 4096, 4096, torch::kBFloat16));
  EXPECT_FALSE(fold_adapter_into_weight(8192, 4096, 4096, torch::kFloat16));
  EXPECT_TRUE(fold_adapter_into_weight(8192, 4096, 4096, torch::kFloat64));

  // A layer whose inputs take one path or the other, gradients included.
  LoRALinear layer(
      torch::nn::Linear(8, 6), LoRAOptions(2).alpha(3).init(LoRAInit::random));
  layer->to(torch::kFloat64);
  for (const int64_t rows : {2, 64}) {
    const auto x =
        torch::randn({rows, 8}, torch::kFloat64).requires_grad_(true);
    const auto upstream = torch::randn({rows, 6}, torch::kFloat64);
    const auto y = layer(x);
    EXPECT_TRUE(torch::allclose(y, reference_of(layer, x), 1e-12, 1e-12))
        << rows;
    const auto grads = torch::autograd::grad(
        {(y * upstream).sum()}, {x, A_of(layer), B_of(layer)});
    const auto A = A_of(layer).detach().requires_grad_(true);
    const auto B = B_of(layer).detach().requires_grad_(true);
    const auto expected = torch::autograd::grad(
        {(reference_forward(
              x,
              layer->weight,
              layer->bias,
              A,
              B,
              factor_of(layer->adapter_options("default"))) *
          upstream)
             .sum()},
        {x, A, B});
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_TRUE(torch::allclose(grads[i], expected[i], 1e-12, 1e-12))
          << rows << " " << i;
    }
  }
}

TEST_F(LoRALinearTest, AFreshAdapterIsANoOpOnTheFoldedPathToo) {
  torch::nn::Linear base(32, 16);
  LoRALinear layer(base, LoRAOptions(4));
  const auto x = torch::randn({128, 32}); // folded: 128 rows of 32 -> 16
  ASSERT_TRUE(torchlora::detail::fold_adapter_into_weight(
      128, 32, 16, torch::kFloat32));
  EXPECT_TRUE(torch::equal(layer(x), base(x)));
  const auto x3 = torch::randn({4, 32, 32});
  EXPECT_TRUE(torch::equal(layer(x3), base(x3)));
}

} // namespace torchlora_linear_test
