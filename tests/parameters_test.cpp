// Tests of count_parameters and mark_only_lora_as_trainable
// (include/torchlora/parameters.h) and clone_keeping_trainable (clone.h).
#include "test_support.h"

#include <torchlora/clone.h>
#include <torchlora/inject.h>
#include <torchlora/linear.h>
#include <torchlora/parameters.h>

#include <map>
#include <set>
#include <string>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_parameters_test {

using torchlora::LoRABias;
using torchlora::LoRALinear;
using torchlora::LoRAOptions;

namespace {

class ParametersTest : public torchlora_test::Seeded {};

/// A small model: an adapted layer, a plain Linear and a LayerNorm.
struct Net : torch::nn::Module {
  Net() {
    adapted = register_module(
        "adapted", LoRALinear(torch::nn::Linear(8, 8), LoRAOptions(2)));
    plain = register_module("plain", torch::nn::Linear(8, 4));
    norm = register_module(
        "norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({4})));
  }
  LoRALinear adapted{nullptr};
  torch::nn::Linear plain{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};

std::set<std::string> trainable_names(const torch::nn::Module& module) {
  std::set<std::string> names;
  for (const auto& item : module.named_parameters()) {
    if (item.value().requires_grad()) {
      names.insert(item.key());
    }
  }
  return names;
}

} // namespace

TEST_F(ParametersTest, CountsTrainableAndTotalElements) {
  Net net;
  const auto counts = torchlora::count_parameters(net);
  // adapted: 64 + 8 frozen, A 16 + B 16; plain: 32 + 4; norm: 4 + 4.
  EXPECT_EQ(counts.total, 64 + 8 + 16 + 16 + 32 + 4 + 4 + 4);
  EXPECT_EQ(counts.trainable, 16 + 16 + 32 + 4 + 4 + 4);
}

TEST_F(ParametersTest, ATensorRegisteredTwiceCountsOnce) {
  torch::nn::Linear shared(10, 10);
  torch::nn::Sequential model(shared, torch::nn::ReLU(), shared);
  EXPECT_EQ(model->named_parameters().size(), 4u);
  const auto counts = torchlora::count_parameters(*model);
  EXPECT_EQ(counts.total, 110);
  EXPECT_EQ(counts.trainable, 110);
}

TEST_F(ParametersTest, MarkOnlyLoRAAsTrainableWithBiasNone) {
  Net net;
  torchlora::mark_only_lora_as_trainable(net);
  EXPECT_EQ(
      trainable_names(net),
      (std::set<std::string>{
          "adapted.lora_A.default.weight", "adapted.lora_B.default.weight"}));
}

TEST_F(ParametersTest, MarkOnlyLoRAAsTrainableWithBiasAll) {
  Net net;
  torchlora::mark_only_lora_as_trainable(net, LoRABias::all);
  EXPECT_EQ(
      trainable_names(net),
      (std::set<std::string>{
          "adapted.lora_A.default.weight",
          "adapted.lora_B.default.weight",
          "adapted.bias",
          "plain.bias",
          "norm.bias"}));
}

TEST_F(ParametersTest, MarkOnlyLoRAAsTrainableWithBiasLoRAOnly) {
  Net net;
  net.register_module("ready", LoRALinear(torch::nn::LinearOptions(4, 4)));
  torchlora::mark_only_lora_as_trainable(net, LoRABias::lora_only);
  // "ready" has no adapter, so its bias is not a LoRA layer's bias.
  EXPECT_EQ(
      trainable_names(net),
      (std::set<std::string>{
          "adapted.lora_A.default.weight",
          "adapted.lora_B.default.weight",
          "adapted.bias"}));
}

TEST_F(ParametersTest, MarkOnlyLoRAAsTrainableCanUnfreezeAgain) {
  Net net;
  for (auto& parameter : net.parameters()) {
    parameter.set_requires_grad(false);
  }
  torchlora::mark_only_lora_as_trainable(net);
  EXPECT_EQ(trainable_names(net).size(), 2u);
}

TEST_F(ParametersTest, BiasModeNames) {
  EXPECT_STREQ(torchlora::to_string(LoRABias::none), "none");
  EXPECT_STREQ(torchlora::to_string(LoRABias::all), "all");
  EXPECT_STREQ(torchlora::to_string(LoRABias::lora_only), "lora_only");
}

TEST_F(ParametersTest, HoldersAndSharedPointersWorkToo) {
  torch::nn::Sequential seq(
      LoRALinear(torch::nn::Linear(4, 4), LoRAOptions(1)),
      torch::nn::Linear(4, 2));
  EXPECT_EQ(torchlora::count_parameters(seq).total, 16 + 4 + 4 + 4 + 8 + 2);
  torchlora::mark_only_lora_as_trainable(seq);
  EXPECT_EQ(torchlora::count_parameters(seq).trainable, 8);
  auto net = std::make_shared<Net>();
  torchlora::mark_only_lora_as_trainable(net, LoRABias::all);
  EXPECT_EQ(torchlora::count_parameters(net).trainable, 16 + 16 + 8 + 4 + 4);
}

namespace {

/// A model that LibTorch can clone: an adaptable member and a plain Linear.
struct CloneableNetImpl : torch::nn::Cloneable<CloneableNetImpl> {
  CloneableNetImpl() {
    reset();
  }
  void reset() override {
    adapted =
        register_module("adapted", LoRALinear(torch::nn::LinearOptions(8, 8)));
    plain = register_module("plain", torch::nn::Linear(8, 4));
  }
  LoRALinear adapted{nullptr};
  torch::nn::Linear plain{nullptr};
};
TORCH_MODULE(CloneableNet);

std::map<std::string, bool> trainable_flags(const torch::nn::Module& model) {
  std::map<std::string, bool> flags;
  for (const auto& item : model.named_parameters()) {
    flags[item.key()] = item.value().requires_grad();
  }
  return flags;
}

} // namespace

TEST_F(ParametersTest, CloneKeepingTrainableKeepsTheFrozenBaseFrozen) {
  CloneableNet model;
  model->adapted->add_adapter("default", LoRAOptions(2));
  torchlora::mark_only_lora_as_trainable(model);
  ASSERT_FALSE(model->plain->weight.requires_grad());

  // The trap: LibTorch's clone() makes the frozen plain layer trainable.
  const auto plain_clone = model->clone();
  EXPECT_TRUE(plain_clone->named_parameters()["plain.weight"].requires_grad());

  const std::shared_ptr<CloneableNetImpl> copy =
      torchlora::clone_keeping_trainable(model);
  ASSERT_NE(copy, nullptr);
  EXPECT_EQ(trainable_flags(*copy), trainable_flags(*model));
  EXPECT_FALSE(copy->plain->weight.requires_grad());
  EXPECT_TRUE(copy->adapted->named_parameters()["lora_A.default.weight"]
                  .requires_grad());
  // A deep copy with equal values.
  const auto originals = model->named_parameters();
  for (const auto& item : copy->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), originals[item.key()]))
        << item.key();
    EXPECT_NE(item.value().data_ptr(), originals[item.key()].data_ptr())
        << item.key();
  }
  // Training modes are kept too.
  model->eval();
  model->plain->train();
  const auto evaluated = torchlora::clone_keeping_trainable(model);
  EXPECT_FALSE(evaluated->is_training());
  EXPECT_FALSE(evaluated->adapted->is_training());
  EXPECT_TRUE(evaluated->plain->is_training());
  // The Module& form gives the same flags.
  EXPECT_EQ(
      trainable_flags(*torchlora::clone_keeping_trainable(*model)),
      trainable_flags(*model));
}

namespace {

/// reset() registers a plain Linear that only the registry holds.
struct RegistryNetImpl : torch::nn::Cloneable<RegistryNetImpl> {
  RegistryNetImpl() {
    reset();
  }
  void reset() override {
    register_module("fc", torch::nn::Linear(4, 4));
  }
};

} // namespace

TEST_F(
    ParametersTest,
    CloneKeepingTrainableClonesModelsThatRebuildPlainLayers) {
  // LibTorch's own clone fails here: reset() builds a plain Linear where
  // inject_lora put a LoRALinear.
  auto model = std::make_shared<RegistryNetImpl>();
  torchlora::inject_lora(
      *model, torchlora::LoRAConfig(2).target_modules({"fc"}));
  {
    torch::NoGradGuard no_grad;
    model->named_parameters()["fc.lora_B.default.weight"].normal_();
  }
  EXPECT_LIBTORCH_ERROR(model->clone(), "of a different type");
  const auto copy = torchlora::clone_keeping_trainable(model);
  ASSERT_NE(copy, nullptr);
  auto* fc = copy->named_children()["fc"]->as<torchlora::LoRALinear>();
  ASSERT_NE(fc, nullptr);
  const auto x = torch::randn({3, 4});
  const auto* original =
      model->named_children()["fc"]->as<torchlora::LoRALinear>();
  EXPECT_TRUE(torch::equal(
      fc->forward(x),
      const_cast<torchlora::LoRALinearImpl*>(original)->forward(x)));
  EXPECT_EQ(trainable_flags(*copy), trainable_flags(*model));
  EXPECT_NE(
      copy->named_parameters()["fc.lora_B.default.weight"].data_ptr(),
      model->named_parameters()["fc.lora_B.default.weight"].data_ptr());
}

namespace {

// A module that does not implement clone().
struct NotClonable : torch::nn::Module {
  NotClonable() {
    register_module("fc", torch::nn::Linear(4, 4));
  }
};

} // namespace

TEST_F(ParametersTest, CloneKeepingTrainableExplainsWhatLibTorchCannotClone) {
  NotClonable model;
  torchlora::inject_lora(
      model, torchlora::LoRAConfig(2).target_modules({"fc"}));
  const auto before = torchlora_test::module_tree(model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::clone_keeping_trainable(model),
      "clone_keeping_trainable: LibTorch could not clone the model (");
  EXPECT_TORCHLORA_ERROR(
      torchlora::clone_keeping_trainable(model),
      "Every module of the model must implement clone()");
  // The LoRA layer set aside for LibTorch's clone is back in place.
  EXPECT_EQ(torchlora_test::module_tree(model), before);
}

} // namespace torchlora_parameters_test
