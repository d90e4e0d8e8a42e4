// Tests of torchlora::LoRAConfig (include/torchlora/config.h).
#include "test_support.h"

#include <torchlora/config.h>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_config_test {

using torchlora::LoRAConfig;

namespace {
class LoRAConfigTest : public torchlora_test::Seeded {};
} // namespace

// torchlora's defaults (docs/layer-kinds.md, "API"): peft's, except alpha,
// which is 1 as in LoRAOptions (peft's LoraConfig has lora_alpha 8, which
// load_adapter applies to a file without it: adapter_io_test's
// AMissingLoraAlphaIsPeftsDefaultAndANullOneIsAnError).
TEST_F(LoRAConfigTest, DefaultsAreTheDocumentedOnes) {
  const LoRAConfig config(8);
  EXPECT_EQ(config.rank(), 8);
  EXPECT_EQ(config.alpha(), 1.0);
  EXPECT_EQ(config.alpha(), torchlora::LoRAOptions(8).alpha());
  EXPECT_EQ(config.dropout(), 0.0);
  EXPECT_FALSE(config.use_rslora());
  EXPECT_EQ(config.init(), torchlora::LoRAInit::kaiming_uniform);
  EXPECT_FALSE(config.dtype().has_value());
  EXPECT_TRUE(config.target_modules().empty());
  EXPECT_TRUE(config.target_regex().empty());
  EXPECT_TRUE(config.exclude_modules().empty());
  EXPECT_TRUE(config.layers_to_transform().empty());
  EXPECT_TRUE(config.rank_pattern().empty());
  EXPECT_EQ(config.adapter_name(), "default");
  EXPECT_TRUE(config.modules_to_save().empty());
  EXPECT_EQ(config.bias(), torchlora::LoRABias::none);
}

TEST_F(LoRAConfigTest, AdapterOptionsAndTargetingChainInAnyOrder) {
  const auto config = LoRAConfig(4)
                          .target_modules({"q_proj", "v_proj"})
                          .alpha(16)
                          .dropout(0.05)
                          .use_rslora(true)
                          .init(torchlora::LoRAInit::gaussian)
                          .dtype(torch::kFloat64)
                          .exclude_modules({"head"})
                          .layers_to_transform({0, 2})
                          .layers_pattern({"blocks"})
                          .rank_pattern({{"v_proj", 2}})
                          .alpha_pattern({{"q_proj", 8.0}})
                          .adapter_name("fr")
                          .modules_to_save({"classifier"})
                          .bias(torchlora::LoRABias::lora_only);
  const auto& lora = config.lora_options();
  EXPECT_EQ(lora.rank(), 4);
  EXPECT_EQ(lora.alpha(), 16.0);
  EXPECT_EQ(lora.dropout(), 0.05);
  EXPECT_TRUE(lora.use_rslora());
  EXPECT_EQ(lora.init(), torchlora::LoRAInit::gaussian);
  EXPECT_EQ(lora.dtype(), torch::kFloat64);
  EXPECT_EQ(
      config.target_modules(), (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(config.exclude_modules(), (std::vector<std::string>{"head"}));
  EXPECT_EQ(config.layers_to_transform(), (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(config.layers_pattern(), (std::vector<std::string>{"blocks"}));
  ASSERT_EQ(config.rank_pattern().size(), 1u);
  EXPECT_EQ(config.rank_pattern()[0].second, 2);
  EXPECT_EQ(config.alpha_pattern()[0].second, 8.0);
  EXPECT_EQ(config.adapter_name(), "fr");
  EXPECT_EQ(config.bias(), torchlora::LoRABias::lora_only);
}

} // namespace torchlora_config_test
