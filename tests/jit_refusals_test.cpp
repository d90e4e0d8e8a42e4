// torchlora::jit: what is refused, with its message, and the guards.
#include "jit_support.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace {

using namespace jit_test;
using torchlora_test::message_of;

// ---------------------------------------------------------------- refusals

TEST(JitRefusals, ForwardOutsideTorchloraIsAnError) {
  auto module = load_model("mlp", "scripted");
  auto lora = torchlora::jit::inject_lora(module, fixture_config({"2"}));
  EXPECT_SCRIPT_ERROR(
      module.forward({torch::randn({2, 6})}),
      "'2.weight' of this TorchScript module is its base weight plus LoRA "
      "adapters");
  // And after the error, torchlora's own call still works.
  EXPECT_NO_THROW(lora.forward({torch::randn({2, 6})}));
}

// Its own suite, so that CTest runs it in a process of its own: there the
// first guard torchlora makes has four dimensions (the check that the
// guards reach torchlora's fallback once ran an operator that only takes
// matrices, and refused every convolution then).
TEST(JitGuards, ConvolutionsAreGuardedToo) {
  auto module = load_model("cnn", "traced");
  auto lora = torchlora::jit::inject_lora(
      module, torchlora::LoRAConfig(2).target_modules({"conv2", "emb"}));
  const auto input = reference("cnn").at("input");
  // Never the base weights in silence (a convolution may fail on the
  // guard's missing memory before it reaches torchlora's message).
  EXPECT_THROW(module.forward({input}), std::exception);
  EXPECT_NO_THROW(lora.forward({input}));
  lora.merge();
  EXPECT_NO_THROW(module.forward({input}));
}

TEST(JitRefusals, SavingTheModuleWithUnmergedAdaptersIsAnError) {
  auto module = load_model("mlp", "traced");
  auto lora = torchlora::jit::inject_lora(module, fixture_config({"0"}));
  std::stringstream stream;
  EXPECT_SCRIPT_ERROR(
      module.save(stream), "merge it through its ScriptLoRA first");
  lora.merge();
  std::stringstream merged;
  EXPECT_NO_THROW(module.save(merged));
}

TEST(JitRefusals, FrozenModuleNamesFreezing) {
  auto module = load_model("mlp", "scripted");
  auto frozen = torch::jit::freeze(module);
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(frozen, fixture_config({"0"})),
      "torch.jit.freeze");
}

TEST(JitRefusals, LoneLayerDropoutAndModulesToSave) {
  auto module = load_model("mlp", "scripted");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(
          module.attr("0").toModule(), fixture_config({"0"})),
      "is itself a torch.nn.modules.linear.Linear");
  const auto before = module.named_parameters().size();
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(module, fixture_config({"0"}).dropout(0.1)),
      "dropout must be 0 for a TorchScript module, got 0.1");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(
          module, fixture_config({"0"}).modules_to_save({"2"})),
      "modules_to_save (got 1)");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(module, fixture_config({"0"}).use_dora(true)),
      "jit::inject_lora: DoRA (use_dora) is not offered for TorchScript "
      "modules yet");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(
          module, fixture_config({"0"}).init(torchlora::LoRAInit::olora)),
      "jit::inject_lora: init olora, which changes the base weights, is not "
      "offered for TorchScript modules yet");
  // Nothing was adapted: the module runs by itself.
  EXPECT_EQ(module.named_parameters().size(), before);
  EXPECT_NO_THROW(module.forward({torch::randn({2, 6})}));
}

TEST(JitRefusals, TargetThatCannotBeAdaptedIsNamed) {
  auto module = load_model("encoder", "scripted");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(
          module, torchlora::LoRAConfig(2).target_modules({"norm1"})),
      "a torch.nn.modules.normalization.LayerNorm");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(
          module, torchlora::LoRAConfig(2).target_modules({"nothing"})),
      "no module matched");
  EXPECT_NO_THROW(module.forward({torch::randn({1, 3, 16})}));
}

TEST(JitRefusals, AttributeReplacedBehindTorchlorasBack) {
  auto module = load_model("mlp", "scripted");
  auto lora = torchlora::jit::inject_lora(module, fixture_config({"2"}));
  auto layer = module.attr("2").toModule();
  layer.setattr("weight", torch::zeros({16, 16}));
  EXPECT_TORCHLORA_ERROR(
      lora.forward({torch::randn({2, 6})}),
      "'2.weight' of the TorchScript module was replaced behind torchlora's "
      "back");
  EXPECT_TORCHLORA_ERROR(lora.merge(), "replaced behind torchlora's back");
}

TEST(JitRefusals, SecondScriptLoRAOnAnAdaptedModule) {
  auto module = load_model("mlp", "scripted");
  auto lora = torchlora::jit::inject_lora(module, fixture_config({"2"}));
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(module, fixture_config({"0"})),
      "the TorchScript module already has a torchlora::jit::ScriptLoRA");
  // Merged, the module holds no guards; it is still that ScriptLoRA's.
  lora.merge();
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(module, fixture_config({"0"})),
      "already has a torchlora::jit::ScriptLoRA");
  // A submodule of it too.
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::ScriptLoRA(module.attr("2").toModule()),
      "the TorchScript module already has");
  EXPECT_NO_THROW(lora.unmerge());
}

TEST(JitRefusals, ChangesWhileAdaptedWeightsLive) {
  auto module = load_model("mlp", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module, fixture_config({"2"}).init(torchlora::LoRAInit::random));
  torch::optim::SGD optimizer(lora.parameters(), 0.1);
  {
    torchlora::jit::AdaptedWeights adapted(lora);
    EXPECT_TORCHLORA_ERROR(
        lora.merge(), "jit::merge while 1 torchlora::jit::AdaptedWeights");
    EXPECT_TORCHLORA_ERROR(
        lora.inject(fixture_config({"0"}).adapter_name("b")),
        "jit::inject_lora while 1");
    EXPECT_TORCHLORA_ERROR(
        adapted.run_method("missing", {}), "has no method \"missing\"");
    // A backward after the adapters changed belongs to the old ones.
    const auto loss = adapted.forward({torch::randn({4, 6})}).toTensor().sum();
    loss.backward({}, /*retain_graph=*/true);
    optimizer.step();
    EXPECT_TORCHLORA_ERROR(loss.backward(), "before its adapters changed");
  }
  EXPECT_NO_THROW(lora.merge());
}

TEST(JitRefusals, AdapterFileWithDropout) {
  const auto dir = std::filesystem::temp_directory_path() /
      ("torchlora_jit_dropout_" + std::to_string(::getpid()));
  {
    torch::nn::Sequential plain(
        torch::nn::Linear(6, 16), torch::nn::ReLU(), torch::nn::Linear(16, 16));
    torchlora::inject_lora(
        *plain, torchlora::LoRAConfig(2).target_modules({"2"}).dropout(0.05));
    torchlora::save_adapter(*plain, dir.string());
  }
  auto module = load_model("mlp", "scripted");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::load_adapter(module, dir.string()),
      "has lora_dropout 0.05");
  EXPECT_NO_THROW(module.forward({torch::randn({2, 6})}));
  std::filesystem::remove_all(dir);
}

TEST(JitRefusals, LayersThatCannotBeAdaptedSayWhy) {
  for (const auto& form : forms()) {
    SCOPED_TRACE(form);
    auto module = load_model("odd", form);
    EXPECT_TORCHLORA_ERROR(
        torchlora::jit::inject_lora(
            module, torchlora::LoRAConfig(2).target_modules({"renorm"})),
        "Embedding with max_norm (its forward renormalizes the weight in "
        "place)");
  }
  for (const auto& form : forms()) {
    SCOPED_TRACE(form);
    auto module = load_model("odd", form);
    EXPECT_TORCHLORA_ERROR(
        torchlora::jit::inject_lora(
            module, torchlora::LoRAConfig(2).target_modules({"buffered"})),
        "'buffered', a torch.nn.modules.linear.Linear whose weight is not a "
        "parameter");
    // A second name the code never calls: an adapter there would be
    // trained in vain.
    EXPECT_TORCHLORA_ERROR(
        torchlora::jit::inject_lora(
            module, torchlora::LoRAConfig(2).target_modules({"alias"})),
        "jit::inject_lora: the TorchScript module's code never runs 'alias'");
    const auto dir = std::filesystem::temp_directory_path() /
        ("torchlora_jit_alias_" + std::to_string(::getpid()));
    {
      torch::nn::Sequential plain;
      plain->push_back("alias", torch::nn::Linear(4, 4));
      torchlora::inject_lora(
          *plain, torchlora::LoRAConfig(2).target_modules({"alias"}));
      torchlora::save_adapter(*plain, dir.string());
    }
    EXPECT_TORCHLORA_ERROR(
        torchlora::jit::load_adapter(module, dir.string()),
        "jit::load_adapter: the TorchScript module's code never runs 'alias'");
    std::filesystem::remove_all(dir);
    // The name it calls takes the adapter.
    EXPECT_EQ(
        torchlora::jit::inject_lora(
            module, torchlora::LoRAConfig(2).target_modules({"nobias"}))
            .adapted_paths(),
        std::vector<std::string>{"nobias"});
  }
  auto traced = load_model("odd", "traced");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::inject_lora(
          traced, torchlora::LoRAConfig(2).target_modules({"cross"})),
      "MultiheadAttention with separate q/k/v weights");
}

TEST(JitRefusals, LayersReachedOtherwiseThanByNameAreNotRefused) {
  // A ModuleList element chosen by an argument, a layer only a forward
  // pre-hook runs.
  auto module = load_model("dynamic", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(2)
          .target_modules({"layers.1", "hooked.inner"})
          .init(torchlora::LoRAInit::random));
  const auto x = torch::randn({3, 4});
  const torch::NoGradGuard no_grad;
  const auto adapted = lora.forward({x, int64_t{1}}).toTensor();
  lora.unload();
  EXPECT_FALSE(
      torch::allclose(module.forward({x, int64_t{1}}).toTensor(), adapted));
  // A traced convolution with padding "same" keeps its groups elsewhere.
  auto same = load_model("same", "traced");
  EXPECT_NO_THROW(torchlora::jit::inject_lora(
      same, torchlora::LoRAConfig(2).target_modules({"conv"})));
}

TEST(JitRefusals, AScopeMadeWhileDisabledRefusesOnceReEnabled) {
  auto module = load_model("typed", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(2).target_modules({"proj"}).init(
          torchlora::LoRAInit::random));
  std::optional<torchlora::jit::AdaptedWeights> adapted;
  {
    torchlora::DisableAdapters off(lora.model());
    adapted.emplace(lora);
  }
  EXPECT_TORCHLORA_ERROR(
      adapted->forward({torch::randn({2, 6})}),
      "the adapters of 'proj' were enabled (torchlora::DisableAdapters) since "
      "this torchlora::jit::AdaptedWeights computed its weights");
}

TEST(JitRefusals, AHalfConvertedModuleIsConvertedTheRestOfTheWay) {
  auto module = load_model("mlp", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module, fixture_config({"2"}).init(torchlora::LoRAInit::random));
  // The module's own to() stops at the guard of "2.weight", after "0.*".
  EXPECT_ANY_THROW(module.to(torch::kDouble));
  EXPECT_TORCHLORA_ERROR(
      lora.forward({torch::randn({2, 6})}),
      "'0.weight' of the TorchScript module was converted behind torchlora's "
      "back");
  lora.to(torch::kDouble);
  EXPECT_EQ(
      lora.forward({torch::randn({2, 6}, torch::kDouble)})
          .toTensor()
          .scalar_type(),
      torch::kDouble);
}

} // namespace
