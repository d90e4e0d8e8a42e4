// Tests of torchlora::LoRAOptions and the init modes
// (include/torchlora/options.h).
#include "test_support.h"

#include <torchlora/linear.h>
#include <torchlora/options.h>

#include <cmath>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_options_test {

using torchlora::LoRAInit;
using torchlora::LoRAOptions;

namespace {
class LoRAOptionsTest : public torchlora_test::Seeded {};
} // namespace

TEST_F(LoRAOptionsTest, DefaultsAreTheDocumentedOnes) {
  const LoRAOptions options(8);
  EXPECT_EQ(options.rank(), 8);
  EXPECT_EQ(options.alpha(), 1.0);
  EXPECT_EQ(options.dropout(), 0.0);
  EXPECT_FALSE(options.use_rslora());
  EXPECT_EQ(options.init(), LoRAInit::kaiming_uniform);
  EXPECT_FALSE(options.dtype().has_value());
}

TEST_F(LoRAOptionsTest, SettersChainAndAnIntegerConvertsToOptions) {
  const auto options = LoRAOptions(4)
                           .alpha(16)
                           .dropout(0.1)
                           .use_rslora(true)
                           .init(LoRAInit::gaussian)
                           .dtype(torch::kBFloat16);
  EXPECT_EQ(options.alpha(), 16.0);
  EXPECT_EQ(options.dropout(), 0.1);
  EXPECT_TRUE(options.use_rslora());
  EXPECT_EQ(options.init(), LoRAInit::gaussian);
  EXPECT_EQ(options.dtype(), torch::kBFloat16);
  const LoRAOptions from_int = 3;
  EXPECT_EQ(from_int.rank(), 3);
}

TEST_F(LoRAOptionsTest, ScalingFollowsRsLoRAOrNot) {
  EXPECT_DOUBLE_EQ(torchlora::lora_scaling(LoRAOptions(8).alpha(16)), 2.0);
  EXPECT_DOUBLE_EQ(
      torchlora::lora_scaling(LoRAOptions(4).alpha(16).use_rslora(true)), 8.0);
  EXPECT_DOUBLE_EQ(torchlora::lora_scaling(LoRAOptions(2)), 0.5);
}

TEST_F(LoRAOptionsTest, InitNames) {
  EXPECT_STREQ(
      torchlora::to_string(LoRAInit::kaiming_uniform), "kaiming_uniform");
  EXPECT_STREQ(torchlora::to_string(LoRAInit::gaussian), "gaussian");
  EXPECT_STREQ(torchlora::to_string(LoRAInit::random), "random");
}

TEST_F(LoRAOptionsTest, KaimingUniformInitBoundsAAndZerosB) {
  // Kaiming-uniform with a = sqrt(5) draws from U(-1/sqrt(in), 1/sqrt(in)).
  const int64_t in = 400;
  torchlora::LoRALinear layer(torch::nn::Linear(in, 300), LoRAOptions(16));
  const auto A = layer->lora_A["default"]->as<torch::nn::Linear>()->weight;
  const auto B = layer->lora_B["default"]->as<torch::nn::Linear>()->weight;
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  EXPECT_LE(A.abs().max().item<double>(), bound);
  EXPECT_GT(A.abs().max().item<double>(), 0.95 * bound);
  EXPECT_NEAR(A.std().item<double>(), bound / std::sqrt(3.0), 0.05 * bound);
  EXPECT_TRUE(torch::equal(B, torch::zeros_like(B)));
}

TEST_F(LoRAOptionsTest, GaussianInitHasStdOneOverRank) {
  const int64_t rank = 4;
  torchlora::LoRALinear layer(
      torch::nn::Linear(2000, 50), LoRAOptions(rank).init(LoRAInit::gaussian));
  const auto A = layer->lora_A["default"]->as<torch::nn::Linear>()->weight;
  const auto B = layer->lora_B["default"]->as<torch::nn::Linear>()->weight;
  EXPECT_NEAR(A.std().item<double>(), 1.0 / rank, 0.01);
  EXPECT_NEAR(A.mean().item<double>(), 0.0, 0.01);
  EXPECT_TRUE(torch::equal(B, torch::zeros_like(B)));
}

TEST_F(LoRAOptionsTest, RandomInitMakesBNonZero) {
  torchlora::LoRALinear layer(
      torch::nn::Linear(30, 20), LoRAOptions(4).init(LoRAInit::random));
  const auto B = layer->lora_B["default"]->as<torch::nn::Linear>()->weight;
  EXPECT_GT(B.abs().min().item<double>(), 0.0);
  EXPECT_LE(B.abs().max().item<double>(), 1.0 / std::sqrt(4.0));
}

TEST_F(LoRAOptionsTest, AdaptersFollowTheBaseDtypeUnlessAsked) {
  torch::nn::Linear base(8, 4);
  base->to(torch::kFloat64);
  torchlora::LoRALinear same(base, LoRAOptions(2));
  EXPECT_EQ(
      same->lora_A["default"]->as<torch::nn::Linear>()->weight.scalar_type(),
      torch::kFloat64);
  torchlora::LoRALinear asked(
      torch::nn::Linear(8, 4), LoRAOptions(2).dtype(torch::kFloat64));
  EXPECT_EQ(
      asked->lora_B["default"]->as<torch::nn::Linear>()->weight.scalar_type(),
      torch::kFloat64);
  EXPECT_EQ(asked->weight.scalar_type(), torch::kFloat32);
}

} // namespace torchlora_options_test
