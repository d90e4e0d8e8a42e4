// Tests of merge, unmerge, merge_and_unload and unload
// (include/torchlora/merge.h and the merging part of LoRALinear).
#include "test_support.h"

#include <torchlora/adapters.h>
#include <torchlora/inject.h>
#include <torchlora/merge.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_merge_test {

using torchlora::LoRAConfig;
using torchlora::LoRAInit;
using torchlora::LoRALinear;
using torchlora::LoRAOptions;
using torchlora_test::expect_unchanged;
using torchlora_test::snapshot;

namespace {

class MergeTest : public torchlora_test::Seeded {};

/// A typed adaptable member, a Sequential and a ModuleList.
struct ModelImpl : torch::nn::Module {
  ModelImpl() {
    proj =
        register_module("proj", LoRALinear(torch::nn::LinearOptions(12, 12)));
    mlp = register_module(
        "mlp",
        torch::nn::Sequential(
            torch::nn::Linear(12, 24),
            torch::nn::Tanh(),
            torch::nn::Linear(24, 12)));
    heads = register_module(
        "heads", torch::nn::ModuleList(torch::nn::Linear(12, 3)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torchlora::linear_forward(*heads[0], mlp->forward(proj(x)));
  }
  LoRALinear proj{nullptr};
  torch::nn::Sequential mlp{nullptr};
  torch::nn::ModuleList heads{nullptr};
};
TORCH_MODULE(Model);

LoRAConfig all_layers() {
  return LoRAConfig(4)
      .alpha(8)
      .init(LoRAInit::random)
      .target_modules({"proj", "0", "2"});
}

/// A LoRA layer of `dtype` with two random adapters, one of them scaled.
LoRALinear layer_of(torch::Dtype dtype) {
  torch::nn::Linear base(32, 16);
  base->to(dtype);
  LoRALinear layer(base, LoRAOptions(4).alpha(8).init(LoRAInit::random));
  layer->add_adapter("fr", LoRAOptions(2).alpha(3).init(LoRAInit::random));
  layer->set_scale("fr", 0.5);
  return layer;
}

std::vector<std::string> sorted_keys(const torch::nn::Module& module) {
  auto keys = module.named_parameters().keys();
  std::sort(keys.begin(), keys.end());
  return keys;
}

} // namespace

TEST_F(MergeTest, MergedForwardEqualsTheUnmergedForwardInFloat32) {
  auto layer = layer_of(torch::kFloat32);
  const auto x = torch::randn({7, 32});
  const auto unmerged = layer(x);
  layer->merge();
  EXPECT_TRUE(layer->merged());
  const auto merged = layer(x);
  EXPECT_TRUE(torch::allclose(merged, unmerged, /*rtol=*/1e-5, /*atol=*/1e-5))
      << (merged - unmerged).abs().max();
  // Merged, the forward is exactly a plain Linear's on the merged weight.
  EXPECT_TRUE(torch::equal(
      merged, torch::nn::functional::linear(x, layer->weight, layer->bias)));
}

TEST_F(MergeTest, MergedForwardInBFloat16IsWithinBFloat16Rounding) {
  auto layer = layer_of(torch::kBFloat16);
  const auto x = torch::randn({7, 32}).to(torch::kBFloat16);
  const auto unmerged = layer(x).to(torch::kFloat32);
  layer->merge();
  const auto merged = layer(x).to(torch::kFloat32);
  // bf16 has an 8-bit mantissa: a relative step of 2^-8 per rounding.
  const auto tolerance =
      4.0 * std::pow(2.0, -8) * unmerged.abs().max().item<double>();
  EXPECT_LE((merged - unmerged).abs().max().item<double>(), tolerance);
}

TEST_F(MergeTest, UnmergeRestoresTheWeightBitForBitInEveryDtype) {
  for (const auto dtype :
       {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
    auto layer = layer_of(dtype);
    const auto before = layer->weight.detach().clone();
    layer->merge();
    EXPECT_FALSE(torch::equal(layer->weight, before)) << dtype;
    layer->unmerge();
    EXPECT_FALSE(layer->merged());
    EXPECT_TRUE(torch::equal(layer->weight, before)) << dtype;
    EXPECT_EQ(layer->weight.scalar_type(), dtype);
    EXPECT_TRUE(layer->weight.is_same(layer->base_layer()->weight));
  }
}

TEST_F(
    MergeTest,
    AThousandMergeUnmergeCyclesInBFloat16LeaveTheWeightBitIdentical) {
  auto layer = layer_of(torch::kBFloat16);
  const auto before = layer->weight.detach().clone();
  torch::Tensor first_merge;
  for (int cycle = 0; cycle < 1000; ++cycle) {
    layer->merge();
    if (cycle == 0) {
      first_merge = layer->weight.detach().clone();
    }
    layer->unmerge();
  }
  EXPECT_TRUE(torch::equal(layer->weight, before));
  layer->merge();
  EXPECT_TRUE(torch::equal(layer->weight, first_merge));
}

TEST_F(MergeTest, HalfPrecisionDeltasAreComputedInFloat32) {
  auto layer = layer_of(torch::kBFloat16);
  const auto params = layer->named_parameters();
  auto f32 = [&](const std::string& name) {
    return params[name].to(torch::kFloat32);
  };
  // default: alpha 8 / rank 4 = 2; fr: 3 / 2 = 1.5, times the scale 0.5.
  auto expected = layer->weight.to(torch::kFloat32);
  expected.addmm_(
      f32("lora_B.default.weight"), f32("lora_A.default.weight"), 1, 2.0);
  expected.addmm_(f32("lora_B.fr.weight"), f32("lora_A.fr.weight"), 1, 0.75);
  layer->merge();
  EXPECT_TRUE(torch::equal(layer->weight, expected.to(torch::kBFloat16)));
}

TEST_F(MergeTest, MergingTwiceOrUnmergingTwiceChangesNothing) {
  auto layer = layer_of(torch::kFloat32);
  const auto before = layer->weight.detach().clone();
  layer->merge();
  const auto once = layer->weight.detach().clone();
  layer->merge();
  EXPECT_TRUE(torch::equal(layer->weight, once));
  Model model;
  torchlora::inject_lora(model, all_layers());
  torchlora::merge(model);
  const auto merged_state = snapshot(*model);
  torchlora::merge(model);
  expect_unchanged(merged_state, *model);

  layer->unmerge();
  layer->unmerge();
  EXPECT_TRUE(torch::equal(layer->weight, before));
  torchlora::unmerge(model);
  const auto unmerged_state = snapshot(*model);
  torchlora::unmerge(model);
  expect_unchanged(unmerged_state, *model);
}

TEST_F(MergeTest, ModelMergeAndUnmergeCoverEveryLayer) {
  Model model;
  torchlora::inject_lora(model, all_layers());
  const auto x = torch::randn({5, 12});
  const auto before = snapshot(*model);
  const auto unmerged = model(x);
  torchlora::merge(model);
  EXPECT_TRUE(model->proj->merged());
  EXPECT_TRUE(model->mlp->ptr<torchlora::LoRALinearImpl>(2)->merged());
  EXPECT_TRUE(model->heads->ptr<torchlora::LoRALinearImpl>(0)->merged());
  EXPECT_TRUE(torch::allclose(model(x), unmerged, 1e-5, 1e-5));
  torchlora::unmerge(model);
  expect_unchanged(before, *model);
}

TEST_F(MergeTest, SafeMergeRefusesNaNOrInfAndTouchesNoWeight) {
  Model model;
  torchlora::inject_lora(model, all_layers());
  {
    torch::NoGradGuard no_grad;
    // The last layer in model order: a merge-as-you-go would have changed
    // the earlier ones already.
    model->heads->ptr<torchlora::LoRALinearImpl>(0)
        ->named_parameters()["lora_B.default.weight"]
        .fill_(std::numeric_limits<float>::infinity());
  }
  const auto before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::merge(model, torchlora::MergeOptions().safe(true)),
      "safe merge refused: merging the active adapters of 'heads.0' gives NaN or Inf "
      "weights; no weight was changed");
  expect_unchanged(before, *model);
  EXPECT_FALSE(model->proj->merged());
  EXPECT_TORCHLORA_ERROR(
      torchlora::merge_and_unload(model, torchlora::MergeOptions().safe(true)),
      "merging the active adapters of 'heads.0'");
  expect_unchanged(before, *model);

  auto layer = layer_of(torch::kFloat32);
  {
    torch::NoGradGuard no_grad;
    layer->named_parameters()["lora_A.fr.weight"].fill_(std::nan(""));
  }
  const auto layer_before = snapshot(*layer);
  EXPECT_TORCHLORA_ERROR(
      layer->merge(/*safe=*/true),
      "safe merge refused: merging the active adapters (\"default\", \"fr\") gives NaN or Inf");
  expect_unchanged(layer_before, *layer);
  EXPECT_FALSE(layer->merged());
}

TEST_F(MergeTest, MergeAndUnloadGivesThePlainModelWithMergedWeights) {
  Model model;
  const auto plain_keys = sorted_keys(*model);
  const auto* original_mlp0 = model->mlp->ptr(0).get();
  torchlora::inject_lora(model, all_layers());
  const auto x = torch::randn({5, 12});
  const auto adapted = model(x);

  torchlora::merge_and_unload(model);
  EXPECT_EQ(sorted_keys(*model), plain_keys);
  // Containers hold the very Linear layers that were wrapped.
  EXPECT_EQ(model->mlp->ptr(0).get(), original_mlp0);
  EXPECT_NE(model->mlp->ptr<torch::nn::LinearImpl>(2), nullptr);
  EXPECT_NE((*model->mlp->begin()).ptr()->as<torch::nn::LinearImpl>(), nullptr);
  EXPECT_NE(model->heads[0]->as<torch::nn::LinearImpl>(), nullptr);
  // The typed member stays a LoRALinear, without adapters.
  EXPECT_TRUE(model->proj->adapter_names().empty());
  EXPECT_EQ(model->proj->named_children().size(), 0u);
  const auto merged = model(x);
  EXPECT_TRUE(torch::allclose(merged, adapted, 1e-5, 1e-5));

  // Its saved file loads into the plain model, with equal outputs.
  const auto path = ::testing::TempDir() + "/merged_model.pt";
  torch::save(model, path);
  Model plain;
  torch::load(plain, path);
  EXPECT_TRUE(torch::equal(plain(x), merged));
}

TEST_F(MergeTest, UnloadGivesTheBaseOutputBitForBit) {
  Model model;
  const auto x = torch::randn({5, 12});
  const auto base = model(x);
  const auto plain_keys = sorted_keys(*model);
  torchlora::inject_lora(model, all_layers());
  EXPECT_FALSE(torch::allclose(model(x), base));
  torchlora::unload(model);
  EXPECT_TRUE(torch::equal(model(x), base));
  EXPECT_EQ(sorted_keys(*model), plain_keys);

  // Also from a merged model: the weights are restored first.
  Model merged_model;
  const auto merged_base = merged_model(x);
  torchlora::inject_lora(merged_model, all_layers());
  torchlora::merge(merged_model);
  torchlora::unload(merged_model);
  EXPECT_TRUE(torch::equal(merged_model(x), merged_base));
}

TEST_F(MergeTest, ALoRALayerHeldOutsideTheModelStaysInPlaceOnUnload) {
  torch::nn::Sequential seq(torch::nn::Linear(4, 4));
  torchlora::inject_lora(seq, LoRAConfig(2).target_modules({"0"}));
  const auto kept = seq->ptr<torchlora::LoRALinearImpl>(0);
  torchlora::unload(seq);
  EXPECT_EQ(seq->ptr(0), kept);
  EXPECT_TRUE(kept->adapter_names().empty());
}

TEST_F(MergeTest, MisusesOfAMergedLayerAreErrors) {
  auto layer = layer_of(torch::kFloat32);
  layer->merge();
  const auto before = snapshot(*layer);
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("de", LoRAOptions(2)),
      "add_adapter on a merged layer; unmerge() it first");
  EXPECT_TORCHLORA_ERROR(
      layer->delete_adapter("fr"),
      "delete_adapter on a merged layer; unmerge() it first");
  EXPECT_TORCHLORA_ERROR(
      layer->set_scale("fr", 2.0),
      "set_scale on a merged layer; unmerge() it first");
  EXPECT_TORCHLORA_ERROR(
      layer->set_active_adapters({"fr"}),
      "set_active_adapters on a merged layer; unmerge() it first");
  EXPECT_TORCHLORA_ERROR(
      layer->set_adapters_enabled(false),
      "cannot disable the adapters of a merged layer");
  EXPECT_TORCHLORA_ERROR(
      layer->reset_parameters(),
      "reset_parameters on a merged layer; unmerge() it first");
  expect_unchanged(before, *layer);

  auto disabled = layer_of(torch::kFloat32);
  disabled->set_adapters_enabled(false);
  EXPECT_TORCHLORA_ERROR(
      disabled->merge(),
      "cannot merge a layer whose adapters are disabled (DisableAdapters)");
  EXPECT_FALSE(disabled->merged());
}

TEST_F(MergeTest, CloneOfAMergedLayerCanStillUnmerge) {
  auto layer = layer_of(torch::kFloat32);
  const auto before = layer->weight.detach().clone();
  layer->merge();
  auto copy =
      std::dynamic_pointer_cast<torchlora::LoRALinearImpl>(layer->clone());
  ASSERT_TRUE(copy->merged());
  EXPECT_EQ(copy->scale("fr"), 0.5);
  copy->unmerge();
  EXPECT_TRUE(torch::equal(copy->weight, before));
  EXPECT_TRUE(layer->merged());
}

TEST_F(MergeTest, MergeAndUnmergeOnTheGpu_CUDA) {
  SKIP_WITHOUT_CUDA();
  for (const auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    auto layer = layer_of(dtype);
    layer->to(torch::kCUDA);
    const auto x = torch::randn({9, 32}, torch::kCUDA).to(dtype);
    const auto before = layer->weight.detach().clone();
    const auto unmerged = layer(x).to(torch::kFloat32);
    layer->merge(/*safe=*/true);
    EXPECT_TRUE(layer->weight.is_cuda());
    const auto merged = layer(x).to(torch::kFloat32);
    const double tolerance = dtype == torch::kFloat32 ? 1e-4 : 5e-2;
    EXPECT_LE((merged - unmerged).abs().max().item<double>(), tolerance)
        << dtype;
    for (int cycle = 0; cycle < 100; ++cycle) {
      layer->unmerge();
      layer->merge();
    }
    layer->unmerge();
    EXPECT_TRUE(torch::equal(layer->weight, before)) << dtype;
  }
}

TEST_F(MergeTest, MovingAMergedModelKeepsUnmergeExact) {
  Model model;
  torchlora::inject_lora(model, all_layers());
  const auto before = model->proj->weight.detach().clone();
  torchlora::merge(model);
  model->to(torch::kFloat64);
  torchlora::unmerge(model);
  EXPECT_TRUE(torch::equal(model->proj->weight, before.to(torch::kFloat64)));
  const auto x = torch::randn({2, 12}, torch::kFloat64);
  EXPECT_EQ(model(x).scalar_type(), torch::kFloat64);
}

TEST_F(MergeTest, AMergedModelSavesItsBaseWeightsAndLoadsBack) {
  const auto path = ::testing::TempDir() + "/merged_checkpoint.pt";
  Model model;
  torchlora::inject_lora(model, all_layers());
  const auto x = torch::randn({4, 12});
  const auto adapted = model(x);
  torchlora::merge(model);
  torch::save(model, path);
  EXPECT_TRUE(model->proj->merged());

  // Into an unmerged model with the same adapters: no delta added twice.
  Model other;
  torchlora::inject_lora(other, all_layers());
  torch::load(other, path);
  EXPECT_TRUE(torch::allclose(other(x), adapted, 1e-5, 1e-5));

  // Into a merged model: merged again with what was loaded; unmerge gives
  // the loaded base weights.
  Model merged;
  torchlora::inject_lora(merged, all_layers());
  torchlora::merge(merged);
  torch::load(merged, path);
  EXPECT_TRUE(merged->proj->merged());
  EXPECT_TRUE(torch::allclose(merged(x), adapted, 1e-5, 1e-5));
  torchlora::unmerge(merged);
  torchlora::unmerge(model);
  EXPECT_TRUE(torch::equal(merged->proj->weight, model->proj->weight));
}

TEST_F(MergeTest, ALoRALayerAsTheWholeModelIsHandledToo) {
  auto layer = layer_of(torch::kFloat32);
  const auto x = torch::randn({3, 32});
  const auto base = layer->base_layer()->forward(x);
  const auto before = layer->weight.detach().clone();
  torchlora::merge(layer);
  EXPECT_TRUE(layer->merged());
  torchlora::unmerge(layer);
  EXPECT_TRUE(torch::equal(layer->weight, before));
  {
    torchlora::DisableAdapters guard(layer);
    EXPECT_TRUE(torch::equal(layer(x), base));
  }
  torchlora::unload(layer);
  EXPECT_TRUE(layer->adapter_names().empty());
  EXPECT_TRUE(torch::equal(layer(x), base));
}

TEST_F(MergeTest, AModelWithADisabledLayerIsNotHalfMerged) {
  Model model;
  torchlora::inject_lora(model, all_layers());
  model->heads->ptr<torchlora::LoRALinearImpl>(0)->set_adapters_enabled(false);
  const auto before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::merge(model),
      "cannot merge 'heads.0': its adapters are disabled (DisableAdapters); merge after the "
      "guard's scope. Nothing was merged");
  EXPECT_FALSE(model->proj->merged());
  expect_unchanged(before, *model);
  {
    Model guarded;
    torchlora::inject_lora(guarded, all_layers());
    torchlora::DisableAdapters guard(guarded);
    EXPECT_TORCHLORA_ERROR(
        torchlora::merge_and_unload(guarded), "its adapters are disabled");
    EXPECT_TRUE(guarded->proj->has_adapter("default"));
  }
}

TEST_F(MergeTest, CloneOfAMergedLayerLeavesTheOriginalMerged) {
  auto layer = layer_of(torch::kFloat32);
  layer->merge();
  const auto merged_weight = layer->weight.detach().clone();
  auto copy =
      std::dynamic_pointer_cast<torchlora::LoRALinearImpl>(layer->clone());
  copy->unmerge();
  EXPECT_TRUE(layer->merged());
  EXPECT_TRUE(torch::equal(layer->weight, merged_weight));
}

TEST_F(MergeTest, ChangingAnAdapterOfAMergedLayerMakesItsForwardAnError) {
  auto layer = layer_of(torch::kFloat32);
  layer->merge();
  const auto x = torch::randn({2, 32});
  const auto merged = layer(x);
  // Moves and clones keep the merged weight current.
  layer->to(torch::kFloat64);
  layer->to(torch::kFloat32);
  EXPECT_TRUE(torch::allclose(layer(x), merged));
  auto copy =
      std::dynamic_pointer_cast<torchlora::LoRALinearImpl>(layer->clone());
  EXPECT_TRUE(torch::allclose(copy->forward(x), merged));

  // An in-place change (an optimizer step, copy_, a load) would be ignored.
  {
    torch::NoGradGuard no_grad;
    layer->named_parameters()["lora_B.fr.weight"].add_(1.0);
  }
  EXPECT_TORCHLORA_ERROR(
      layer(x),
      "torchlora: an adapter of this merged layer (\"default\", \"fr\") was changed "
      "after merge(), so the merged weight is stale; unmerge() before changing "
      "adapters and merge() again after");
  // Unmerging restores the exact base; merging again takes the change.
  layer->unmerge();
  layer->merge();
  EXPECT_FALSE(torch::allclose(layer(x), merged));
  EXPECT_TRUE(torch::allclose(copy->forward(x), merged));
}

TEST_F(MergeTest, InjectingIntoAMergedModelIsRefusedWithNothingChanged) {
  Model model;
  torchlora::inject_lora(model, all_layers());
  torchlora::merge(*model);
  const auto before = snapshot(*model);
  const auto tree = torchlora_test::module_tree(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::inject_lora(*model, all_layers().adapter_name("second")),
      "'proj' is merged; unmerge the model before adding an adapter. Nothing "
      "was changed.");
  expect_unchanged(before, *model);
  EXPECT_EQ(torchlora_test::module_tree(*model), tree);
}

TEST_F(MergeTest, AStaleMergedWeightIsNeverKeptOrUnmergedInSilence) {
  const auto x = torch::randn({2, 32});
  auto bump_A = [](const LoRALinear& layer) {
    torch::NoGradGuard no_grad;
    layer->named_parameters()["lora_A.fr.weight"].add_(1.0);
  };
  const auto stale =
      "an adapter of this merged layer (\"default\", \"fr\") was changed after "
      "merge()";
  // merge_and_unload and unload(merge) would keep the stale merged weight.
  {
    auto layer = layer_of(torch::kFloat32);
    torch::nn::Sequential model(layer);
    torchlora::merge(model);
    bump_A(layer);
    const auto before = snapshot(*model);
    EXPECT_TORCHLORA_ERROR(torchlora::merge_and_unload(model), stale);
    EXPECT_TORCHLORA_ERROR(torchlora::merge(model), stale);
    EXPECT_TORCHLORA_ERROR(layer->unload(/*merge_first=*/true), stale);
    expect_unchanged(before, *model);
    // Unmerging is always possible; merging again takes the change.
    torchlora::unmerge(model);
    torchlora::merge_and_unload(model);
  }
  // set_data keeps the version counter: the data pointer tells.
  {
    auto layer = layer_of(torch::kFloat32);
    layer->merge();
    auto B = layer->named_parameters()["lora_B.default.weight"];
    B.set_data(B.detach() * 3);
    EXPECT_TORCHLORA_ERROR(layer(x), "was changed after merge()");
  }
  // The merged weight itself trained in place: unmerge, unload and save
  // would restore the weight from before merge() and lose that.
  {
    auto layer = layer_of(torch::kFloat32);
    layer->merge();
    {
      torch::NoGradGuard no_grad;
      layer->weight.add_(0.5);
    }
    const auto changed = layer(x); // the forward uses it
    const auto text =
        "the weight of this merged layer was changed after merge() (an "
        "optimizer step or an in-place op on it), so ";
    EXPECT_TORCHLORA_ERROR(
        layer->unmerge(), std::string(text) + "unmerge() would restore");
    EXPECT_TORCHLORA_ERROR(
        layer->unload(/*merge_first=*/false),
        std::string(text) + "unload() would restore");
    std::stringstream stream;
    EXPECT_TORCHLORA_ERROR(
        torch::save(layer, stream), std::string(text) + "saving it would");
    EXPECT_TRUE(layer->merged());
    // merge_and_unload keeps the weight as it is now.
    layer->unload(/*merge_first=*/true);
    EXPECT_TRUE(torch::allclose(layer(x), changed));
  }
}

} // namespace torchlora_merge_test
