// Tests of the torchlora::LoRALayer interface (include/torchlora/layer.h).
#include "test_support.h"

#include <torchlora/layer.h>
#include <torchlora/linear.h>

#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_layer_test {

namespace {
class LoRALayerTest : public torchlora_test::Seeded {};
} // namespace

TEST_F(LoRALayerTest, AModelWalkFindsLoRALayersThroughTheInterface) {
  torch::nn::Sequential model(
      torchlora::LoRALinear(torch::nn::Linear(4, 4), torchlora::LoRAOptions(2)),
      torch::nn::Linear(4, 4),
      torchlora::LoRALinear(torch::nn::LinearOptions(4, 2)));
  std::vector<size_t> adapter_counts;
  model->apply([&](torch::nn::Module& module) {
    if (auto* layer = dynamic_cast<torchlora::LoRALayer*>(&module)) {
      adapter_counts.push_back(layer->adapter_names().size());
    }
  });
  EXPECT_EQ(adapter_counts, (std::vector<size_t>{1, 0}));
}

TEST_F(LoRALayerTest, ReportsAdapterTensorsAndTheBaseBias) {
  torchlora::LoRALinear layer(
      torch::nn::Linear(6, 3), torchlora::LoRAOptions(2));
  layer->add_adapter("fr", torchlora::LoRAOptions(1));
  const torchlora::LoRALayer& view = *layer;
  const auto tensors = view.adapter_parameters();
  ASSERT_EQ(tensors.size(), 4u);
  const auto params = layer->named_parameters();
  EXPECT_TRUE(tensors[0].is_same(params["lora_A.default.weight"]));
  EXPECT_TRUE(tensors[1].is_same(params["lora_B.default.weight"]));
  EXPECT_TRUE(tensors[2].is_same(params["lora_A.fr.weight"]));
  EXPECT_TRUE(tensors[3].is_same(params["lora_B.fr.weight"]));
  EXPECT_TRUE(view.base_bias().is_same(layer->bias));
  EXPECT_TRUE(view.has_adapter("fr"));
  EXPECT_FALSE(view.has_adapter("de"));

  torchlora::LoRALinear no_bias(torch::nn::LinearOptions(6, 3).bias(false));
  EXPECT_FALSE(
      static_cast<const torchlora::LoRALayer&>(*no_bias).base_bias().defined());
}

} // namespace torchlora_layer_test
