// States that compose: train/eval mode, optimizer steps that bypass version
// counters, nested AdaptedWeights scopes, adapter folders with several
// adapters, tied weights, live routings, DisableAdapters over merged
// layers and whole-model clones. Each test once failed against the
// library; the stateful random test (stateful_test.cpp) runs these
// operations in random sequences.

#include "test_support.h"

#include <torchlora/torchlora.h>

#include <filesystem>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_state_composition_test {

namespace {

using namespace torchlora;
using torchlora_test::base_tensors;
using torchlora_test::same_values;
using torchlora_test::snapshot;

namespace nn = torch::nn;

class StateCompositionTest : public torchlora_test::Seeded {};

/// Gives every adapter matrix random values, so that no delta is zero.
void randomize_adapters(nn::Module& model, double std = 0.3) {
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    if (item.key().find("lora_") != std::string::npos) {
      item.value().normal_(0, std);
    }
  }
}

nn::TransformerEncoder make_encoder(double dropout, torch::Dtype dtype) {
  torch::manual_seed(11);
  nn::TransformerEncoder encoder(nn::TransformerEncoderOptions(
      nn::TransformerEncoderLayerOptions(16, 4).dim_feedforward(24).dropout(
          dropout),
      2));
  encoder->to(dtype);
  return encoder;
}

torch::Tensor scoped_forward(
    nn::TransformerEncoder& encoder,
    const torch::Tensor& x) {
  AdaptedWeights adapted(*encoder);
  return encoder(x);
}

// Item 1: eval() and train() reach the MultiheadAttention a
// LoRAMultiheadAttention holds, so LibTorch's attention dropout is off in
// eval and on in training, whatever the mode at injection.
TEST_F(StateCompositionTest, ModeReachesTheAttentionInsideALoRALayer) {
  const auto x = torch::randn({5, 3, 16}, torch::kFloat64);
  for (const bool injected_in_training : {true, false}) {
    SCOPED_TRACE(
        injected_in_training ? "injected in train" : "injected in eval");
    auto encoder = make_encoder(0.3, torch::kFloat64);
    auto plain = make_encoder(0.3, torch::kFloat64);
    plain->eval();
    encoder->train(injected_in_training);
    inject_lora(encoder, LoRAConfig(2).target_modules({"self_attn"}));
    encoder->eval();
    torch::NoGradGuard no_grad;
    const auto first = scoped_forward(encoder, x);
    const auto second = scoped_forward(encoder, x);
    EXPECT_TRUE(torch::equal(first, second));
    // A fresh adapter changes nothing: the plain model's eval output.
    EXPECT_TRUE(torch::allclose(first, plain(x), 0, 1e-12));
    merge(*encoder);
    EXPECT_TRUE(torch::allclose(encoder(x), plain(x), 0, 1e-12));
    unmerge(*encoder);
    encoder->train();
    // Training: the attention's dropout draws anew on every call.
    EXPECT_FALSE(
        torch::equal(scoped_forward(encoder, x), scoped_forward(encoder, x)));
  }
}

// Item 1, every kind: a LoRA layer's base module and adapter matrices
// follow the layer's mode, and a layer made for a module in eval mode
// starts in eval mode.
TEST_F(StateCompositionTest, EveryKindsBaseFollowsTheLayersMode) {
  std::vector<std::shared_ptr<nn::Module>> layers;
  nn::Linear linear(4, 3);
  nn::Embedding embedding(5, 3);
  nn::Conv2d conv(nn::Conv2dOptions(2, 3, 3));
  nn::MultiheadAttention attention(nn::MultiheadAttentionOptions(8, 2));
  for (nn::Module* base : std::vector<nn::Module*>{
           linear.get(), embedding.get(), conv.get(), attention.get()}) {
    base->eval();
  }
  layers.push_back(LoRALinear(linear, LoRAOptions(2)).ptr());
  layers.push_back(LoRAEmbedding(embedding, LoRAOptions(2)).ptr());
  layers.push_back(LoRAConv2d(conv, LoRAOptions(2)).ptr());
  layers.push_back(LoRAMultiheadAttention(attention, LoRAOptions(2)).ptr());
  for (const auto& layer : layers) {
    SCOPED_TRACE(layer->name());
    auto* lora = dynamic_cast<LoRALayer*>(layer.get());
    ASSERT_NE(lora, nullptr);
    EXPECT_FALSE(layer->is_training()) << "made for a base in eval mode";
    for (const bool mode : {true, false, true}) {
      layer->train(mode);
      EXPECT_EQ(lora->base_module()->is_training(), mode);
      for (const auto& child : layer->modules(/*include_self=*/false)) {
        EXPECT_EQ(child->is_training(), mode) << child->name();
      }
    }
  }
}

// Item 2: an optimizer step through `.data()` (LibTorch 1.13's SGD, or user
// code) changes no version counter. A merged layer sees it by value: the
// forward refuses the stale merge, and unmerge removes exactly the delta
// that merge added, so the base weight comes back and the unmerged forward
// uses the new adapters.
TEST_F(StateCompositionTest, AStepThroughDataIsSeenByMergedLayers) {
  for (const bool keep_original : {true, false}) {
    SCOPED_TRACE(keep_original ? "merge" : "merge in place");
    torch::manual_seed(3);
    nn::Sequential model(nn::Linear(6, 5), nn::Tanh(), nn::Linear(5, 4));
    model->to(torch::kFloat64);
    const auto base = base_tensors(*model);
    inject_lora(model, LoRAConfig(2).alpha(4).target_modules({"0", "2"}));
    randomize_adapters(*model);
    const auto x = torch::randn({3, 6}, torch::kFloat64);
    merge(*model, MergeOptions().keep_original(keep_original));
    {
      torch::NoGradGuard no_grad;
      for (auto& item : model->named_parameters()) {
        if (item.key().find("lora_") != std::string::npos) {
          item.value().data().add_(0.25); // as SGD in LibTorch 1.13 does
        }
      }
    }
    EXPECT_TORCHLORA_ERROR(
        model->forward(x),
        "was changed after merge(), so the merged weight is stale");
    unmerge(*model);
    for (const auto& [key, tensor] : base_tensors(*model)) {
      EXPECT_TRUE(torch::allclose(tensor, base.at(key), 0, 1e-14)) << key;
    }
    // The unmerged forward: the plain layers plus the new adapters.
    const auto named = model->named_parameters();
    const auto layer = [&](const std::string& at, const torch::Tensor& in) {
      const auto W = base.at(at + ".weight") +
          2.0 *
              torch::mm(
                  named[at + ".lora_B.default.weight"],
                  named[at + ".lora_A.default.weight"]);
      return torch::addmm(base.at(at + ".bias"), in, W.t());
    };
    const auto want = layer("2", torch::tanh(layer("0", x)));
    EXPECT_TRUE(torch::allclose(model->forward(x), want, 0, 1e-12));
  }
}

// Item 3: a nested AdaptedWeights made under NoGradGuard does not leave the
// outer (training) scope's members without their graph.
TEST_F(StateCompositionTest, ANestedNoGradScopeKeepsTheOuterScopesGradients) {
  auto encoder = make_encoder(0, torch::kFloat64);
  inject_lora(encoder, LoRAConfig(2).target_modules({"self_attn", "linear1"}));
  randomize_adapters(*encoder);
  const auto x = torch::randn({4, 2, 16}, torch::kFloat64);
  std::vector<torch::Tensor> adapters;
  for (const auto& item : encoder->named_parameters()) {
    if (item.key().find("lora_") != std::string::npos) {
      adapters.push_back(item.value());
    }
  }
  std::vector<torch::Tensor> want;
  {
    AdaptedWeights adapted(*encoder);
    want = torch::autograd::grad({encoder(x).pow(2).sum()}, adapters);
  }
  AdaptedWeights outer(*encoder);
  {
    torch::NoGradGuard no_grad;
    AdaptedWeights inner(*encoder);
    encoder(x);
  }
  const auto loss = encoder(x).pow(2).sum();
  ASSERT_TRUE(loss.requires_grad());
  const auto got = torch::autograd::grad(
      {loss}, adapters, {}, false, false, /*allow_unused=*/true);
  for (size_t i = 0; i < adapters.size(); ++i) {
    ASSERT_TRUE(got[i].defined()) << i;
    EXPECT_TRUE(torch::allclose(got[i], want[i], 0, 1e-12)) << i;
  }
}

// Item 4: load_adapter(model, dir, "other") reads dir/other, where
// save_adapter put it, even when dir holds the default adapter's files.
TEST_F(StateCompositionTest, LoadingANamedAdapterReadsItsOwnFolder) {
  const auto dir =
      std::filesystem::temp_directory_path() / "torchlora_named_adapter";
  std::filesystem::remove_all(dir);
  const auto make = [] {
    torch::manual_seed(5);
    return nn::Sequential(nn::Linear(6, 5), nn::ReLU(), nn::Linear(5, 4));
  };
  auto model = make();
  inject_lora(model, LoRAConfig(2).target_modules({"0"}));
  inject_lora(
      model,
      LoRAConfig(3).alpha(5).target_modules({"0", "2"}).adapter_name("other"));
  randomize_adapters(*model);
  save_adapter(*model, dir.string());
  save_adapter(
      *model, dir.string(), SaveAdapterOptions().adapter_name("other"));
  ASSERT_TRUE(std::filesystem::exists(dir / "adapter_config.json"));
  ASSERT_TRUE(std::filesystem::exists(dir / "other" / "adapter_config.json"));

  auto fresh = make();
  load_adapter(*fresh, dir.string(), "other");
  const auto want = model->named_parameters();
  const auto got = fresh->named_parameters();
  for (const auto* key :
       {"0.lora_A.other.weight",
        "0.lora_B.other.weight",
        "2.lora_A.other.weight",
        "2.lora_B.other.weight"}) {
    ASSERT_NE(got.find(key), nullptr) << key;
    EXPECT_TRUE(torch::equal(got[key], want[key])) << key;
  }
  EXPECT_EQ(got.find("0.lora_A.default.weight"), nullptr);
  // An adapter name names a folder below dir, nothing else.
  EXPECT_TORCHLORA_ERROR(
      load_adapter(*fresh, dir.string(), "/tmp/elsewhere"),
      "adapter name \"/tmp/elsewhere\" cannot name a folder of adapter files");
  // The default adapter still loads from dir itself.
  load_adapter(*fresh, dir.string());
  EXPECT_TRUE(torch::equal(
      fresh->named_parameters()["0.lora_A.default.weight"],
      want["0.lora_A.default.weight"]));
  std::filesystem::remove_all(dir);
}

/// Two Linear layers whose weights are tied, as `b->weight = a->weight`
/// ties them (one tensor), or sharing storage only (`set_data`).
nn::Sequential tied_model(bool same_tensor) {
  torch::manual_seed(9);
  nn::Linear a(5, 5);
  nn::Linear b(5, 5);
  a->to(torch::kFloat64);
  b->to(torch::kFloat64);
  if (same_tensor) {
    b->weight = a->weight;
  } else {
    b->weight.set_data(a->weight.detach());
  }
  return nn::Sequential(a, nn::Tanh(), b);
}

// Item 5: merging into weights that other layers share would change those
// layers too. In place that is refused whenever storage is shared; a
// merge that keeps the original is refused when the very tensor is shared,
// and right when only the storage was.
TEST_F(StateCompositionTest, MergingTiedWeightsIsRefusedOrRight) {
  const auto x = torch::randn({4, 5}, torch::kFloat64);
  for (const bool same_tensor : {true, false}) {
    SCOPED_TRACE(same_tensor ? "one tensor" : "shared storage");
    auto model = tied_model(same_tensor);
    inject_lora(model, LoRAConfig(2).target_modules({"0", "2"}));
    randomize_adapters(*model);
    const auto unmerged = model->forward(x);
    const auto before = snapshot(*model);
    EXPECT_TORCHLORA_ERROR(
        merge(*model, MergeOptions().keep_original(false)),
        same_tensor
            ? "cannot merge '0': its weight is also '2.weight' (tied weights)"
            : "cannot merge '0' in place: its weight shares memory with "
              "'2.weight'");
    torchlora_test::expect_unchanged(before, *model);
    if (same_tensor) {
      EXPECT_TORCHLORA_ERROR(
          merge(*model), "cannot merge '0': its weight is also '2.weight'");
      EXPECT_TORCHLORA_ERROR(
          merge_and_unload(*model), "its weight is also '2.weight'");
      torchlora_test::expect_unchanged(before, *model);
    } else {
      merge(*model);
      EXPECT_TRUE(torch::allclose(model->forward(x), unmerged, 0, 1e-12));
      unmerge(*model);
      torchlora_test::expect_unchanged(before, *model);
    }
    // Only one of them adapted: merging would change the other one.
    auto one = tied_model(same_tensor);
    inject_lora(one, LoRAConfig(2).target_modules({"2"}));
    randomize_adapters(*one);
    EXPECT_TORCHLORA_ERROR(
        merge(*one, MergeOptions().keep_original(false)),
        same_tensor ? "cannot merge '2': its weight is also '0.weight'"
                    : "cannot merge '2' in place: its weight shares memory "
                      "with '0.weight'");
  }
}

// Item 7: a live AdapterRouting depends on the adapters and layers it was
// made for: deleting an adapter, unloading or injecting meanwhile is
// refused (the routing would silently route rows to nothing).
TEST_F(StateCompositionTest, ALiveRoutingRefusesChangesItDependsOn) {
  torch::manual_seed(4);
  nn::Sequential model(nn::Linear(6, 5), nn::ReLU(), nn::Linear(5, 4));
  inject_lora(model, LoRAConfig(2).target_modules({"0"}).adapter_name("a"));
  inject_lora(model, LoRAConfig(2).target_modules({"0"}).adapter_name("b"));
  randomize_adapters(*model);
  const auto before = snapshot(*model);
  {
    AdapterRouting routing(*model, {"a", "b", "__base__"});
    EXPECT_TORCHLORA_ERROR(
        delete_adapter(*model, "b"),
        "delete_adapter while a torchlora::AdapterRouting made for '0' lives");
    EXPECT_TORCHLORA_ERROR(
        merge_and_unload(*model), "while a torchlora::AdapterRouting");
    EXPECT_TORCHLORA_ERROR(unload(*model), "while a torchlora::AdapterRouting");
    EXPECT_TORCHLORA_ERROR(
        inject_lora(
            model, LoRAConfig(2).target_modules({"2"}).adapter_name("c")),
        "while a torchlora::AdapterRouting");
    torchlora_test::expect_unchanged(before, *model);
  }
  delete_adapter(*model, "b");
  EXPECT_EQ(adapter_names(*model), std::vector<std::string>{"a"});
}

// Item 8: DisableAdapters gives the base output bit for bit over a model
// merged keeping its weights, and within rounding over one merged in place
// (the deltas are subtracted again).
TEST_F(StateCompositionTest, DisableAdaptersOverMergedModels) {
  for (const auto dtype :
       {torch::kFloat64, torch::kFloat32, torch::kBFloat16}) {
    for (const bool keep_original : {true, false}) {
      SCOPED_TRACE(
          std::string(c10::toString(dtype)) +
          (keep_original ? " merge" : " in place"));
      torch::manual_seed(8);
      nn::Sequential model(nn::Linear(16, 12), nn::Tanh(), nn::Linear(12, 8));
      model->to(dtype);
      const auto x = torch::randn({5, 16}).to(dtype);
      const auto plain = model->forward(x);
      inject_lora(model, LoRAConfig(4).target_modules({"0", "2"}));
      randomize_adapters(*model);
      merge(*model, MergeOptions().keep_original(keep_original));
      torch::Tensor disabled;
      {
        DisableAdapters off(*model);
        disabled = model->forward(x);
      }
      if (keep_original) {
        EXPECT_TRUE(torch::equal(disabled, plain));
      } else {
        // One rounding of W + d - d per weight element, carried through.
        const double eps = dtype == torch::kFloat64 ? 2.2e-16
            : dtype == torch::kFloat32              ? 1.2e-7
                                                    : 7.8e-3;
        EXPECT_TRUE(torch::allclose(disabled, plain, 0, 16 * eps))
            << (disabled - plain).abs().max().item<double>();
      }
      EXPECT_TRUE(model->modules()[0] != nullptr);
    }
  }
}

// Item 9: a whole model whose LibTorch modules rebuild plain children in
// reset() (TransformerEncoderLayer) clones with torchlora's
// clone_keeping_trainable: the copy is adapted alike and independent.
TEST_F(StateCompositionTest, AModelWithAdaptedTransformerLayersClones) {
  auto encoder = make_encoder(0, torch::kFloat64);
  inject_lora(encoder, LoRAConfig(2).target_modules({"self_attn", "linear1"}));
  randomize_adapters(*encoder);
  const auto x = torch::randn({4, 2, 16}, torch::kFloat64);
  auto copy = std::dynamic_pointer_cast<nn::TransformerEncoderImpl>(
      clone_keeping_trainable(*encoder));
  ASSERT_NE(copy, nullptr);
  torch::Tensor want, got;
  {
    AdaptedWeights a(*encoder);
    AdaptedWeights b(*copy);
    want = encoder->forward(x);
    got = copy->forward(x);
  }
  EXPECT_TRUE(torch::equal(got, want));
  const auto keys = encoder->named_parameters().keys();
  EXPECT_EQ(copy->named_parameters().keys(), keys);
  const auto originals = encoder->named_parameters();
  for (const auto& item : copy->named_parameters()) {
    const torch::Tensor original = originals[item.key()];
    EXPECT_NE(item.value().data_ptr(), original.data_ptr()) << item.key();
    EXPECT_EQ(item.value().requires_grad(), original.requires_grad())
        << item.key();
  }
  // Independent: training the copy leaves the original as it was.
  const auto before = snapshot(*encoder);
  randomize_adapters(*copy);
  torchlora_test::expect_unchanged(before, *encoder);
  // Without a scope, the copy refuses a forward as the original does.
  EXPECT_TORCHLORA_ERROR(copy->forward(x), "used outside one");
}

// Found by a review of the fixes above.

// A merged LoRAMultiheadAttention (its forward is torchlora's) refuses a
// stale merge too; NaN adapters merged are not taken for changed ones.
TEST_F(StateCompositionTest, MergedAttentionAndNaNAdapters) {
  nn::MultiheadAttention base(nn::MultiheadAttentionOptions(8, 2));
  base->to(torch::kFloat64);
  LoRAMultiheadAttention attention(base, LoRAOptions(2));
  randomize_adapters(*attention);
  const auto x = torch::randn({3, 2, 8}, torch::kFloat64);
  attention->merge(false);
  {
    torch::NoGradGuard no_grad;
    attention->named_parameters()["lora_A.default.weight"].data().mul_(2.0);
  }
  EXPECT_TORCHLORA_ERROR(
      attention(x, x, x), "was changed after merge(), so the merged weight");
  attention->unmerge();
  EXPECT_NO_THROW(attention(x, x, x));

  nn::Sequential model(nn::Linear(4, 3));
  inject_lora(model, LoRAConfig(2).target_modules({"0"}));
  {
    torch::NoGradGuard no_grad;
    model->named_parameters()["0.lora_A.default.weight"].fill_(NAN);
  }
  merge(*model);
  EXPECT_NO_THROW(model->forward(torch::randn({2, 4})));
  EXPECT_NO_THROW(clone_keeping_trainable(model));
  EXPECT_NO_THROW(unmerge(*model));
}

// A step through `.data()` on a merged weight made trainable is seen by
// unmerge, which would otherwise restore the weight from before it.
TEST_F(StateCompositionTest, AStepOnAMergedWeightIsSeenByUnmerge) {
  nn::Sequential model(nn::Linear(4, 3));
  inject_lora(model, LoRAConfig(2).target_modules({"0"}));
  randomize_adapters(*model);
  merge(*model);
  auto* layer = model[0]->as<LoRALinear>();
  layer->weight.set_requires_grad(true);
  torch::optim::SGD sgd({layer->weight}, torch::optim::SGDOptions(0.5));
  model->forward(torch::randn({2, 4})).pow(2).sum().backward();
  {
    torch::NoGradGuard no_grad;
    layer->weight.data().add_(layer->weight.grad(), -0.5); // as 1.13's SGD
  }
  EXPECT_TORCHLORA_ERROR(
      unmerge(*model),
      "the weight of this merged layer was changed after merge()");
}

// Cloning works while the model's layers are also held elsewhere (a
// variable, a live AdaptedWeights or AdapterRouting) and with one layer at
// two paths; inside DisableAdapters it is refused (the copy would stay
// disabled for good).
struct TwoPathsImpl : nn::Cloneable<TwoPathsImpl> {
  TwoPathsImpl() {
    reset();
  }
  void reset() override {
    nn::Linear shared(4, 4);
    register_module("a", shared);
    register_module("b", shared);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return layer_forward(
        *named_children()["b"], layer_forward(*named_children()["a"], x));
  }
};

TEST_F(StateCompositionTest, ClonesWhileLayersAreHeldElsewhere) {
  auto encoder = make_encoder(0, torch::kFloat64);
  inject_lora(encoder, LoRAConfig(2).target_modules({"self_attn", "linear1"}));
  randomize_adapters(*encoder);
  const auto x = torch::randn({4, 2, 16}, torch::kFloat64);
  const auto handle = encoder->named_modules()["layers.0.linear1"];
  {
    AdaptedWeights scope(*encoder);
    const auto want = encoder->forward(x);
    auto copy = std::dynamic_pointer_cast<nn::TransformerEncoderImpl>(
        clone_keeping_trainable(*encoder));
    ASSERT_NE(copy, nullptr);
    AdaptedWeights copy_scope(*copy);
    EXPECT_TRUE(torch::equal(copy->forward(x), want));
  }

  auto two = std::make_shared<TwoPathsImpl>();
  inject_lora(*two, LoRAConfig(2).target_modules({"a"}));
  randomize_adapters(*two);
  const auto y = torch::randn({3, 4});
  {
    AdapterRouting routing(*two, {"default", "__base__", "default"});
    const auto copy = clone_keeping_trainable(two);
    ASSERT_NE(copy, nullptr);
    // One module at both paths, adapted once.
    EXPECT_EQ(
        copy->named_children()["a"].get(), copy->named_children()["b"].get());
    EXPECT_NE(copy->named_children()["a"]->as<LoRALinear>(), nullptr);
  }
  const auto copy = clone_keeping_trainable(two);
  EXPECT_TRUE(torch::equal(copy->forward(y), two->forward(y)));
  {
    DisableAdapters off(*two);
    EXPECT_TORCHLORA_ERROR(
        clone_keeping_trainable(two),
        "clone_keeping_trainable while the adapters of 'a' are disabled");
  }
}

// `to()` under NoGradGuard inside a training AdaptedWeights recomputes the
// held weights in the scope's own grad mode; a DisableAdapters that ends
// before an AdaptedWeights made inside it gives the adapters back.
TEST_F(StateCompositionTest, HeldWeightsKeepTheirScopesGradMode) {
  auto encoder = make_encoder(0, torch::kFloat64);
  inject_lora(encoder, LoRAConfig(2).target_modules({"self_attn", "linear1"}));
  randomize_adapters(*encoder);
  const auto x = torch::randn({4, 2, 16}, torch::kFloat64);
  const auto A =
      encoder->named_parameters()["layers.0.linear1.lora_A.default.weight"];
  torch::Tensor want;
  {
    AdaptedWeights scope(*encoder);
    want = torch::autograd::grad({encoder->forward(x).pow(2).sum()}, {A})[0];
  }
  {
    AdaptedWeights scope(*encoder);
    {
      torch::NoGradGuard no_grad;
      encoder->to(torch::kFloat64);
    }
    const auto got =
        torch::autograd::grad({encoder->forward(x).pow(2).sum()}, {A})[0];
    EXPECT_TRUE(torch::allclose(got, want, 0, 1e-12));
  }

  torch::Tensor adapted;
  {
    AdaptedWeights scope(*encoder);
    adapted = encoder->forward(x).detach();
  }
  auto off = std::make_unique<DisableAdapters>(*encoder);
  auto scope = std::make_unique<AdaptedWeights>(*encoder);
  off.reset(); // ends first
  EXPECT_TRUE(torch::allclose(encoder->forward(x), adapted, 0, 1e-12));
  scope.reset();
  for (const auto& item : encoder->named_modules()) {
    if (auto* layer = dynamic_cast<LoRALayer*>(item.value().get())) {
      EXPECT_TRUE(layer->adapters_enabled()) << item.key();
    }
  }
}

} // namespace

} // namespace torchlora_state_composition_test
