// Tests of torchlora::TargetMatcher against Python peft's matching rules
// (include/torchlora/targeting.h, ../shared/PEFT-FORMAT.md).
#include "test_support.h"

#include <torchlora/targeting.h>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_targeting_test {

using torchlora::LoRAConfig;
using torchlora::TargetMatcher;

namespace {
class TargetingTest : public torchlora_test::Seeded {};
} // namespace

TEST_F(TargetingTest, ListEntriesMatchTheWholePathOrADottedSuffix) {
  const TargetMatcher matcher(
      LoRAConfig(4).target_modules({"q_proj", "mlp.0"}));
  EXPECT_TRUE(matcher.is_target("q_proj"));
  EXPECT_TRUE(matcher.is_target("blocks.0.attn.q_proj"));
  EXPECT_TRUE(matcher.is_target("blocks.3.mlp.0"));
  EXPECT_FALSE(matcher.is_target("blocks.0.attn.xq_proj"));
  EXPECT_FALSE(matcher.is_target("blocks.0.attn.q_proj.inner"));
  EXPECT_FALSE(matcher.is_target("blocks.3.mlp.02"));
  EXPECT_FALSE(matcher.is_target("blocks.3.xmlp.0"));
}

TEST_F(TargetingTest, ListEntriesAreNeverRegexes) {
  const TargetMatcher matcher(LoRAConfig(4).target_modules({"q.proj"}));
  EXPECT_TRUE(matcher.is_target("attn.q.proj"));
  EXPECT_FALSE(matcher.is_target("attn.qxproj"));
}

TEST_F(TargetingTest, RegexMustMatchTheWholePath) {
  const TargetMatcher matcher(
      LoRAConfig(4).target_regex(R"(blocks\.\d+\.mlp\.0)"));
  EXPECT_TRUE(matcher.is_target("blocks.0.mlp.0"));
  EXPECT_TRUE(matcher.is_target("blocks.12.mlp.0"));
  EXPECT_FALSE(matcher.is_target("model.blocks.0.mlp.0"));
  EXPECT_FALSE(matcher.is_target("blocks.0.mlp.0.weight"));
  EXPECT_FALSE(matcher.is_target("blocks.0.mlp.2"));
}

TEST_F(TargetingTest, ExclusionsWinOverTargets) {
  const TargetMatcher by_name(LoRAConfig(4)
                                  .target_modules({"q_proj", "head"})
                                  .exclude_modules({"blocks.1.q_proj"}));
  EXPECT_TRUE(by_name.is_target("blocks.0.q_proj"));
  EXPECT_FALSE(by_name.is_target("blocks.1.q_proj"));
  EXPECT_TRUE(by_name.is_target("head"));

  const TargetMatcher by_regex(LoRAConfig(4)
                                   .target_regex(R"(.*proj)")
                                   .exclude_regex(R"(blocks\.0\..*)"));
  EXPECT_FALSE(by_regex.is_target("blocks.0.q_proj"));
  EXPECT_TRUE(by_regex.is_target("blocks.1.q_proj"));
  EXPECT_TRUE(by_regex.is_excluded("blocks.0.anything"));

  const TargetMatcher exact(
      LoRAConfig(4).target_modules({"head"}).exclude_modules({"head"}));
  EXPECT_FALSE(exact.is_target("head"));
}

TEST_F(TargetingTest, LayerIndexIsTheNumberOfTheLastNameDotNumber) {
  const TargetMatcher matcher(LoRAConfig(4)
                                  .target_modules({"q_proj", "up_proj"})
                                  .layers_to_transform({1, 3}));
  // peft: re.match(r".*\.[^.]*\.(\d+)\.", key), greedy: the last one.
  EXPECT_EQ(matcher.layer_index("model.layers.1.attn.q_proj"), 1);
  EXPECT_EQ(matcher.layer_index("model.layers.1.experts.0.fc"), 0);
  EXPECT_EQ(matcher.layer_index("model.layers.1.mlp.experts.0.up_proj"), 0);
  EXPECT_EQ(matcher.layer_index("model.layers.2.mlp.experts.3.up_proj"), 3);
  // A layer list at the top of the model counts too (peft finds none there).
  EXPECT_EQ(matcher.layer_index("blocks.3.attn.q_proj"), 3);
  EXPECT_EQ(matcher.layer_index("a.0.b.1.c"), 1);
  // A number needs a name before it, and a segment after it.
  EXPECT_FALSE(matcher.layer_index("0.attn.q_proj").has_value());
  EXPECT_FALSE(matcher.layer_index("attn.q_proj").has_value());
  EXPECT_FALSE(matcher.layer_index("blocks.3").has_value());
  // Beyond int64 (peft compares Python ints): equal to no listed index.
  EXPECT_FALSE(matcher.layer_index("model.layers.99999999999999999999.q_proj")
                   .has_value());

  EXPECT_TRUE(matcher.is_target("model.layers.1.attn.q_proj"));
  EXPECT_FALSE(matcher.is_target("model.layers.1.mlp.experts.0.up_proj"));
  EXPECT_TRUE(matcher.is_target("model.layers.2.mlp.experts.3.up_proj"));
  EXPECT_TRUE(matcher.is_target("blocks.3.attn.q_proj"));
  EXPECT_FALSE(matcher.is_target("model.layers.2.attn.q_proj"));
  EXPECT_FALSE(matcher.is_target("attn.q_proj")); // no index: not a target
}

TEST_F(TargetingTest, LayersPatternNamesTheLayerList) {
  const TargetMatcher matcher(LoRAConfig(4)
                                  .target_modules({"q_proj"})
                                  .layers_to_transform({2})
                                  .layers_pattern({"h", "blocks"}));
  EXPECT_EQ(matcher.layer_index("transformer.h.2.attn.q_proj"), 2);
  EXPECT_EQ(matcher.layer_index("model.h.2.experts.5.q_proj"), 2);
  // Patterns are tried in order; the first that matches wins, as in peft.
  EXPECT_EQ(matcher.layer_index("encoder.blocks.2.sub.h.4.q_proj"), 4);
  EXPECT_EQ(matcher.layer_index("blocks.2.attn.q_proj"), 2);
  // The last occurrence of the list's name, as peft's greedy pattern.
  EXPECT_EQ(matcher.layer_index("model.h.1.sub.h.2.q_proj"), 2);
  EXPECT_EQ(matcher.layer_index("model.h.1.experts.7.q_proj"), 1);
  EXPECT_FALSE(matcher.layer_index("layers.2.attn.q_proj").has_value());
  EXPECT_TRUE(matcher.is_target("transformer.h.2.attn.q_proj"));
  EXPECT_FALSE(matcher.is_target("layers.2.attn.q_proj"));
  EXPECT_FALSE(matcher.is_target("transformer.h.1.attn.q_proj"));
}

TEST_F(TargetingTest, AnExactlyNamedTargetSkipsTheLayerFilter) {
  // peft returns early for `key in target_modules`.
  const TargetMatcher matcher(LoRAConfig(4)
                                  .target_modules({"blocks.0.q_proj", "v_proj"})
                                  .layers_to_transform({1}));
  EXPECT_TRUE(matcher.is_target("blocks.0.q_proj"));
  EXPECT_FALSE(matcher.is_target("blocks.0.v_proj"));
  EXPECT_TRUE(matcher.is_target("blocks.1.v_proj"));
}

TEST_F(TargetingTest, RankAndAlphaPatternsFirstMatchWinsOnDotBoundaries) {
  const TargetMatcher matcher(
      LoRAConfig(8)
          .alpha(16)
          .target_modules({"q_proj", "v_proj", "proj"})
          .rank_pattern({{"q_proj", 16}, {".*_proj", 4}})
          .alpha_pattern({{R"(blocks\.1\.v_proj)", 2.0}}));
  EXPECT_EQ(matcher.options_for("blocks.0.q_proj").rank(), 16);
  EXPECT_EQ(matcher.options_for("blocks.0.v_proj").rank(), 4);
  EXPECT_EQ(matcher.options_for("blocks.0.proj").rank(), 8);
  // "proj" as a pattern key would not match "q_proj": no dot before it.
  const TargetMatcher suffix(
      LoRAConfig(8).target_modules({"q_proj"}).rank_pattern({{"proj", 2}}));
  EXPECT_EQ(suffix.options_for("blocks.0.q_proj").rank(), 8);
  EXPECT_EQ(suffix.options_for("blocks.0.proj").rank(), 2);

  EXPECT_EQ(matcher.options_for("blocks.1.v_proj").alpha(), 2.0);
  EXPECT_EQ(matcher.options_for("blocks.0.v_proj").alpha(), 16.0);
  EXPECT_EQ(matcher.options_for("model.blocks.1.v_proj").alpha(), 2.0);
}

TEST_F(TargetingTest, ModulesToSaveAreNeverAdapted) {
  const TargetMatcher matcher(
      LoRAConfig(4).target_regex(".*").modules_to_save({"classifier"}));
  EXPECT_TRUE(matcher.is_module_to_save("classifier"));
  EXPECT_TRUE(matcher.is_module_to_save("model.classifier"));
  EXPECT_FALSE(matcher.is_module_to_save("model.classifier.dense"));
  EXPECT_FALSE(matcher.is_target("model.classifier"));
  EXPECT_FALSE(matcher.is_target("model.classifier.dense"));
  EXPECT_TRUE(matcher.is_target("model.encoder"));
}

TEST_F(TargetingTest, AllLinearPassesEveryNameAndKeepsExclusions) {
  const TargetMatcher matcher(
      LoRAConfig(4).target_modules({"ALL-Linear"}).exclude_modules({"gate"}));
  EXPECT_TRUE(matcher.targets_all_linear());
  EXPECT_FALSE(TargetMatcher(LoRAConfig(4).target_modules({"all-linear", "q"}))
                   .targets_all_linear());
  EXPECT_TRUE(TargetMatcher::is_output_head("lm_head"));
  EXPECT_TRUE(TargetMatcher::is_output_head("model.classifier"));
  EXPECT_TRUE(TargetMatcher::is_output_head("score"));
  EXPECT_TRUE(TargetMatcher::is_output_head("net.head"));
  EXPECT_FALSE(TargetMatcher::is_output_head("heads.en"));
  EXPECT_FALSE(TargetMatcher::is_output_head("lm_head.inner"));
  EXPECT_TRUE(matcher.is_target("anything.at.all"));
  EXPECT_FALSE(matcher.is_target("mlp.gate"));
}

TEST_F(TargetingTest, BadConfigsAreErrors) {
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(0).target_modules({"q"})),
      "needs a rank > 0, got 0");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).alpha(-1).target_modules({"q"})), "got -1");
  EXPECT_TORCHLORA_ERROR(TargetMatcher(LoRAConfig(4)), "names no targets");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).target_modules({"q"}).target_regex("q")),
      "not both; got target_regex \"q\" and 1 target_modules");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).target_regex("(unclosed")),
      "target_regex is not a valid regex (ECMAScript syntax): \"(unclosed\"");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).target_modules({"q"}).exclude_regex("[")),
      "exclude_regex is not a valid regex");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).target_regex("q").layers_to_transform({1})),
      "layers_to_transform works with target_modules only, got target_regex \"q\"");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).target_modules({"q"}).layers_pattern({"h"})),
      "layers_pattern needs layers_to_transform, got layers_pattern \"h\"");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(
          LoRAConfig(4).target_modules({"q"}).rank_pattern({{"q", 0}})),
      "rank_pattern \"q\" needs a rank > 0, got 0");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(
          LoRAConfig(4).target_modules({"q"}).alpha_pattern({{"q", -2.0}})),
      "alpha_pattern \"q\" needs a finite alpha > 0, got -2");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(
          LoRAConfig(4).target_modules({"q"}).rank_pattern({{"(", 2}})),
      "rank_pattern is not a valid regex");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).target_modules({"q"}).adapter_name("a.b")),
      "adapter_name must be non-empty and contain no '.', got \"a.b\"");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).target_modules({"q"}).adapter_name("")),
      "got \"\"");
  EXPECT_TORCHLORA_ERROR(
      TargetMatcher(LoRAConfig(4).target_modules({"q"}).dropout(1.5)),
      "dropout must be in [0, 1), got 1.5");
}

} // namespace torchlora_targeting_test
