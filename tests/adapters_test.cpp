// Tests of several adapters: set_adapter, delete_adapter, set_scale and
// DisableAdapters (include/torchlora/adapters.h).
#include "test_support.h"

#include <torchlora/adapters.h>
#include <torchlora/inject.h>
#include <torchlora/merge.h>

#include <stdexcept>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_adapters_test {

using torchlora::LoRAConfig;
using torchlora::LoRAInit;
using torchlora_test::expect_unchanged;
using torchlora_test::snapshot;

namespace {

class AdaptersTest : public torchlora_test::Seeded {
 protected:
  void SetUp() override {
    Seeded::SetUp();
    model = torch::nn::Sequential(
        torch::nn::Linear(10, 10), torch::nn::Tanh(), torch::nn::Linear(10, 6));
    x = torch::randn({4, 10});
    base_output = model->forward(x);
    torchlora::inject_lora(
        model,
        LoRAConfig(4)
            .alpha(4)
            .init(LoRAInit::random)
            .target_modules({"0", "2"}));
    torchlora::inject_lora(
        model,
        LoRAConfig(2)
            .alpha(4)
            .init(LoRAInit::random)
            .target_modules({"2"})
            .adapter_name("fr"));
  }

  torchlora::LoRALinearImpl& layer(size_t index) {
    return *model->ptr<torchlora::LoRALinearImpl>(index);
  }

  torch::Tensor param(const std::string& name) {
    return model->named_parameters()[name];
  }

  /// The model's output computed by hand from the adapters' tensors, with
  /// the given multipliers of "default" and "fr" (0 leaves one out).
  torch::Tensor expected_output(double default_factor, double fr_factor) {
    auto term = [&](int index,
                    const std::string& adapter,
                    const torch::Tensor& input) {
      if (!model->ptr<torchlora::LoRALinearImpl>(index)->has_adapter(adapter)) {
        return torch::zeros({input.size(0), index == 0 ? 10 : 6});
      }
      const auto prefix = std::to_string(index) + ".lora_";
      const auto A = param(prefix + "A." + adapter + ".weight");
      const auto B = param(prefix + "B." + adapter + ".weight");
      return input.mm(A.t()).mm(B.t());
    };
    auto first = model->ptr<torchlora::LoRALinearImpl>(0);
    auto h = torch::nn::functional::linear(x, first->weight, first->bias) +
        default_factor * term(0, "default", x);
    h = torch::tanh(h);
    auto last = model->ptr<torchlora::LoRALinearImpl>(2);
    return torch::nn::functional::linear(h, last->weight, last->bias) +
        default_factor * term(2, "default", h) +
        fr_factor * 2.0 * term(2, "fr", h);
  }

  torch::nn::Sequential model{nullptr};
  torch::Tensor x;
  torch::Tensor base_output;
};

} // namespace

TEST_F(AdaptersTest, EveryAdapterIsActiveUntilSetAdapterChooses) {
  EXPECT_EQ(
      torchlora::adapter_names(model),
      (std::vector<std::string>{"default", "fr"}));
  EXPECT_EQ(
      layer(2).active_adapters(), (std::vector<std::string>{"default", "fr"}));
  EXPECT_TRUE(
      torch::allclose(model->forward(x), expected_output(1, 1), 1e-5, 1e-5));
}

TEST_F(AdaptersTest, SetAdapterChoosesTheActiveSetAndFreezesTheRest) {
  torchlora::set_adapter(model, "fr");
  EXPECT_TRUE(
      torch::allclose(model->forward(x), expected_output(0, 1), 1e-5, 1e-5));
  EXPECT_FALSE(param("2.lora_A.default.weight").requires_grad());
  EXPECT_FALSE(param("0.lora_B.default.weight").requires_grad());
  EXPECT_TRUE(param("2.lora_A.fr.weight").requires_grad());
  EXPECT_TRUE(layer(0).active_adapters().empty());

  torchlora::set_adapter(model, {"default", "fr"});
  EXPECT_TRUE(
      torch::allclose(model->forward(x), expected_output(1, 1), 1e-5, 1e-5));
  EXPECT_TRUE(param("2.lora_A.default.weight").requires_grad());

  torchlora::set_adapter(model, "default");
  EXPECT_TRUE(
      torch::allclose(model->forward(x), expected_output(1, 0), 1e-5, 1e-5));

  // mark_only_lora_as_trainable keeps inactive adapters frozen.
  torchlora::mark_only_lora_as_trainable(model);
  EXPECT_FALSE(param("2.lora_A.fr.weight").requires_grad());
  EXPECT_TRUE(param("2.lora_A.default.weight").requires_grad());
}

TEST_F(AdaptersTest, OnlyTheActiveAdapterLearns) {
  torchlora::set_adapter(model, "fr");
  const auto frozen = param("2.lora_B.default.weight").detach().clone();
  std::vector<torch::Tensor> trainable;
  for (const auto& parameter : model->parameters()) {
    if (parameter.requires_grad()) {
      trainable.push_back(parameter);
    }
  }
  torch::optim::SGD optimizer(trainable, torch::optim::SGDOptions(0.1));
  const auto fr_before = param("2.lora_B.fr.weight").detach().clone();
  model->forward(x).pow(2).sum().backward();
  optimizer.step();
  EXPECT_TRUE(torch::equal(param("2.lora_B.default.weight"), frozen));
  EXPECT_FALSE(torch::equal(param("2.lora_B.fr.weight"), fr_before));
}

TEST_F(AdaptersTest, DeleteAdapterRemovesItsTensors) {
  torchlora::delete_adapter(model, "fr");
  for (const auto& key : model->named_parameters().keys()) {
    EXPECT_EQ(key.find(".fr."), std::string::npos) << key;
  }
  EXPECT_FALSE(layer(2).lora_A->contains("fr"));
  EXPECT_EQ(layer(2).lora_A->named_children().size(), 1u);
  EXPECT_TRUE(
      torch::allclose(model->forward(x), expected_output(1, 0), 1e-5, 1e-5));

  torchlora::delete_adapter(model, "default");
  EXPECT_EQ(model->named_parameters().size(), 4u);
  EXPECT_TRUE(torch::equal(model->forward(x), base_output));
}

TEST_F(AdaptersTest, DeletingTheOnlyActiveAdapterActivatesTheFirstRemaining) {
  torchlora::set_adapter(model, "fr");
  torchlora::delete_adapter(model, "fr");
  EXPECT_EQ(layer(2).active_adapters(), (std::vector<std::string>{"default"}));
  EXPECT_TRUE(param("2.lora_A.default.weight").requires_grad());
  // Layer 0 has no "fr": set_adapter left it without an active adapter.
  EXPECT_TRUE(layer(0).active_adapters().empty());
}

TEST_F(AdaptersTest, SetScaleMultipliesAnAdaptersContribution) {
  torchlora::set_scale(model, "fr", 0.5);
  EXPECT_EQ(layer(2).scale("fr"), 0.5);
  EXPECT_TRUE(
      torch::allclose(model->forward(x), expected_output(1, 0.5), 1e-5, 1e-5));
  torchlora::set_scale(model, "fr", 0.0);
  EXPECT_TRUE(
      torch::allclose(model->forward(x), expected_output(1, 0), 1e-5, 1e-5));
  torchlora::set_scale(model, "default", -1.0);
  EXPECT_TRUE(
      torch::allclose(model->forward(x), expected_output(-1, 0), 1e-5, 1e-5));
  // A merge uses the scales too.
  const auto scaled = model->forward(x);
  torchlora::merge(model);
  EXPECT_TRUE(torch::allclose(model->forward(x), scaled, 1e-5, 1e-5));
}

TEST_F(AdaptersTest, DisableAdaptersGivesTheBaseOutputBitForBitThenRestores) {
  const auto adapted = model->forward(x);
  {
    torchlora::DisableAdapters guard(model);
    EXPECT_TRUE(torch::equal(model->forward(x), base_output));
    EXPECT_FALSE(layer(0).adapters_enabled());
  }
  EXPECT_TRUE(layer(0).adapters_enabled());
  EXPECT_TRUE(torch::equal(model->forward(x), adapted));
}

TEST_F(AdaptersTest, DisableAdaptersUnmergesAndMergesAgain) {
  torchlora::merge(model);
  const auto merged_weights = snapshot(*model);
  const auto merged_output = model->forward(x);
  {
    torchlora::DisableAdapters guard(*model);
    EXPECT_FALSE(layer(2).merged());
    EXPECT_TRUE(torch::equal(model->forward(x), base_output));
  }
  EXPECT_TRUE(layer(2).merged());
  expect_unchanged(merged_weights, *model);
  EXPECT_TRUE(torch::equal(model->forward(x), merged_output));
}

TEST_F(AdaptersTest, DisableAdaptersRestoresOnAnException) {
  torchlora::merge(model);
  const auto merged_weights = snapshot(*model);
  try {
    torchlora::DisableAdapters guard(model.ptr());
    EXPECT_TRUE(torch::equal(model->forward(x), base_output));
    throw std::runtime_error("inside the guard");
  } catch (const std::runtime_error&) {
  }
  EXPECT_TRUE(layer(0).merged());
  EXPECT_TRUE(layer(0).adapters_enabled());
  expect_unchanged(merged_weights, *model);
}

TEST_F(AdaptersTest, DisableAdaptersKeepsADisabledLayerDisabled) {
  layer(0).set_adapters_enabled(false);
  { torchlora::DisableAdapters guard(model); }
  EXPECT_FALSE(layer(0).adapters_enabled());
  EXPECT_TRUE(layer(2).adapters_enabled());
}

TEST_F(AdaptersTest, MisusesAreErrorsThatChangeNothing) {
  const auto before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::set_adapter(model, "de"),
      "set_adapter: the model has no adapter named \"de\" (its adapters: \"default\", \"fr\")");
  EXPECT_TORCHLORA_ERROR(
      torchlora::set_adapter(model, std::vector<std::string>{}),
      "set_adapter needs at least one adapter name, got none");
  EXPECT_TORCHLORA_ERROR(
      torchlora::delete_adapter(model, "de"),
      "delete_adapter: the model has no adapter named \"de\"");
  EXPECT_TORCHLORA_ERROR(
      torchlora::set_scale(model, "de", 1.0),
      "set_scale: the model has no adapter named \"de\"");
  EXPECT_TORCHLORA_ERROR(
      torchlora::set_scale(model, "fr", std::nan("")),
      "set_scale(\"fr\") needs a finite scale, got nan");
  EXPECT_TORCHLORA_ERROR(
      layer(2).set_scale("fr", std::numeric_limits<double>::infinity()),
      "needs a finite scale, got inf");
  expect_unchanged(before, *model);
  EXPECT_EQ(
      layer(2).active_adapters(), (std::vector<std::string>{"default", "fr"}));

  torchlora::merge(model);
  const auto merged = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::set_adapter(model, "fr"),
      "set_adapter: '0' is merged; unmerge the model first");
  EXPECT_TORCHLORA_ERROR(
      torchlora::delete_adapter(model, "fr"),
      "delete_adapter: '2' is merged; unmerge the model first");
  EXPECT_TORCHLORA_ERROR(
      torchlora::set_scale(model, "fr", 2.0),
      "set_scale: '2' is merged; unmerge the model first");
  expect_unchanged(merged, *model);
}

} // namespace torchlora_adapters_test
