// Tests of torchlora::inject_lora (include/torchlora/inject.h): for every
// model style, injection must really take effect in the model's forward.
#include "test_support.h"

#include <torchlora/inject.h>

#include <functional>
#include <set>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_inject_test {

using torchlora::inject_lora;
using torchlora::LoRAConfig;
using torchlora::LoRAInit;
using torchlora::LoRALinear;
using torchlora_test::base_tensors;
using torchlora_test::expect_unchanged;
using torchlora_test::module_tree;
using torchlora_test::snapshot;

namespace {

class InjectTest : public torchlora_test::Seeded {};

constexpr int64_t kWidth = 16;

/// Attention written the adaptable way: typed `LoRALinear` members.
struct AttentionImpl : torch::nn::Module {
  AttentionImpl()
      : q_proj(torch::nn::LinearOptions(kWidth, kWidth)),
        k_proj(torch::nn::LinearOptions(kWidth, kWidth)),
        v_proj(torch::nn::LinearOptions(kWidth, kWidth)),
        o_proj(torch::nn::LinearOptions(kWidth, kWidth)) {
    register_module("q_proj", q_proj);
    register_module("k_proj", k_proj);
    register_module("v_proj", v_proj);
    register_module("o_proj", o_proj);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto scores = q_proj(x).matmul(k_proj(x).transpose(-2, -1)) / 4.0;
    return o_proj(torch::softmax(scores, -1).matmul(v_proj(x)));
  }
  LoRALinear q_proj, k_proj, v_proj, o_proj;
};
TORCH_MODULE(Attention);

/// A transformer-like block: typed attention, MLP in a Sequential.
struct BlockImpl : torch::nn::Module {
  BlockImpl()
      : attn(register_module("attn", Attention())),
        mlp(register_module(
            "mlp",
            torch::nn::Sequential(
                torch::nn::Linear(kWidth, 2 * kWidth),
                torch::nn::GELU(),
                torch::nn::Linear(2 * kWidth, kWidth)))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    const auto h = x + attn(x);
    return h + mlp->forward(h);
  }
  Attention attn;
  torch::nn::Sequential mlp;
};
TORCH_MODULE(Block);

/// Blocks in a ModuleList, a ModuleDict of heads, an adaptable head member.
struct NetImpl : torch::nn::Module {
  explicit NetImpl(int blocks_count = 2) {
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int i = 0; i < blocks_count; ++i) {
      blocks->push_back(Block());
    }
    heads = register_module("heads", torch::nn::ModuleDict());
    heads->update(
        {{"en", torch::nn::Linear(kWidth, 8).ptr()},
         {"fr", torch::nn::Linear(kWidth, 8).ptr()}});
    head = register_module("head", LoRALinear(torch::nn::LinearOptions(8, 4)));
  }
  torch::Tensor forward(const torch::Tensor& input) {
    auto x = input;
    for (const auto& block : *blocks) {
      x = block->as<BlockImpl>()->forward(x);
    }
    x = torchlora::linear_forward(*heads["en"], x) +
        torchlora::linear_forward(*heads["fr"], x);
    return head(x);
  }
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::ModuleDict heads{nullptr};
  LoRALinear head{nullptr};
};
TORCH_MODULE(Net);

/// A model author's mistake: a plain typed Linear member.
struct TypedLinearNetImpl : torch::nn::Module {
  TypedLinearNetImpl() {
    fc = register_module("fc", torch::nn::Linear(kWidth, kWidth));
    out =
        register_module("out", LoRALinear(torch::nn::LinearOptions(kWidth, 4)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return out(torch::relu(fc(x)));
  }
  torch::nn::Linear fc{nullptr};
  LoRALinear out{nullptr};
};
TORCH_MODULE(TypedLinearNet);

torch::Tensor input() {
  return torch::randn({3, 5, kWidth});
}

/// Injects with a non-zero B and proves it takes effect: the output changes,
/// training the adapters changes it again, and no base tensor moves.
void expect_injection_takes_effect(
    torch::nn::Module& model,
    const std::function<torch::Tensor(const torch::Tensor&)>& forward,
    LoRAConfig config,
    const std::vector<std::string>& expected_paths) {
  const auto x = input();
  const auto before = forward(x).detach();
  const auto base_before = base_tensors(model);

  const auto paths = inject_lora(model, config.init(LoRAInit::random));
  EXPECT_EQ(paths, expected_paths);

  const auto injected = forward(x).detach();
  EXPECT_FALSE(torch::allclose(injected, before))
      << "the adapters are not used";

  // Base keys are unchanged, and nothing but adapters is trainable.
  const auto base_after = base_tensors(model);
  ASSERT_EQ(base_after.size(), base_before.size());
  std::vector<torch::Tensor> trainable;
  for (const auto& item : model.named_parameters()) {
    if (item.value().requires_grad()) {
      EXPECT_NE(item.key().find("lora_"), std::string::npos) << item.key();
      trainable.push_back(item.value());
    }
  }
  ASSERT_FALSE(trainable.empty());

  torch::optim::SGD optimizer(trainable, torch::optim::SGDOptions(0.1));
  const auto target = torch::randn_like(before);
  for (int step = 0; step < 3; ++step) {
    optimizer.zero_grad();
    torch::mse_loss(forward(x), target).backward();
    optimizer.step();
  }
  const auto trained = forward(x).detach();
  EXPECT_FALSE(torch::allclose(trained, injected))
      << "training did not reach the output";
  const auto parameters = model.named_parameters();
  for (const auto& [name, tensor] : base_before) {
    const auto* after = parameters.find(name);
    ASSERT_NE(after, nullptr) << name;
    EXPECT_TRUE(torch::equal(*after, tensor)) << name << " changed";
  }
}

} // namespace

TEST_F(InjectTest, TypedLoRALinearMembersAreAdaptedInPlace) {
  Attention model;
  const auto q_before = model->q_proj.ptr();
  expect_injection_takes_effect(
      *model,
      [&](const torch::Tensor& x) { return model(x); },
      LoRAConfig(4).alpha(8).target_modules({"q_proj", "v_proj"}),
      {"q_proj", "v_proj"});
  EXPECT_EQ(model->q_proj.ptr(), q_before);
  EXPECT_EQ(
      model->q_proj->adapter_names(), (std::vector<std::string>{"default"}));
  EXPECT_TRUE(model->k_proj->adapter_names().empty());
}

TEST_F(InjectTest, SequentialStorageIsSwappedSoItsForwardUsesTheAdapter) {
  torch::nn::Sequential seq(
      torch::nn::Linear(kWidth, kWidth),
      torch::nn::ReLU(),
      torch::nn::Linear(kWidth, 4));
  expect_injection_takes_effect(
      *seq,
      [&](const torch::Tensor& x) { return seq->forward(x); },
      LoRAConfig(2).target_modules({"0"}),
      {"0"});
  EXPECT_NE(seq->ptr(0)->as<torchlora::LoRALinearImpl>(), nullptr);
  EXPECT_NE((*seq->begin()).ptr()->as<torchlora::LoRALinearImpl>(), nullptr);
  EXPECT_NE(seq->ptr(2)->as<torch::nn::LinearImpl>(), nullptr);
}

TEST_F(InjectTest, ModuleListOfBlocksIsAdaptedAtEveryDepth) {
  torch::nn::ModuleList list;
  list->push_back(Block());
  list->push_back(Block());
  auto forward = [&](const torch::Tensor& input) {
    auto x = input;
    for (const auto& block : *list) {
      x = block->as<BlockImpl>()->forward(x);
    }
    return x;
  };
  expect_injection_takes_effect(
      *list,
      forward,
      LoRAConfig(2).target_regex(R"(\d+\.mlp\.(0|2)|\d+\.attn\.o_proj)"),
      {"0.attn.o_proj",
       "0.mlp.0",
       "0.mlp.2",
       "1.attn.o_proj",
       "1.mlp.0",
       "1.mlp.2"});
}

TEST_F(InjectTest, ModuleListOfLinearsIsSwappedInStorage) {
  torch::nn::ModuleList layers(
      torch::nn::Linear(kWidth, kWidth), torch::nn::Linear(kWidth, kWidth));
  auto forward = [&](const torch::Tensor& input) {
    auto x = input;
    for (const auto& layer : *layers) {
      x = torchlora::linear_forward(*layer, x);
    }
    return x;
  };
  expect_injection_takes_effect(
      *layers, forward, LoRAConfig(2).target_modules({"1"}), {"1"});
  EXPECT_NE(layers[1]->as<torchlora::LoRALinearImpl>(), nullptr);
  EXPECT_NE(layers->ptr<torchlora::LoRALinearImpl>(1), nullptr);
  EXPECT_NE(layers[0]->as<torch::nn::LinearImpl>(), nullptr);
}

TEST_F(InjectTest, ModuleDictEntriesAreSwappedInStorage) {
  torch::nn::ModuleDict dict;
  dict->update(
      {{"en", torch::nn::Linear(kWidth, 4).ptr()},
       {"fr", torch::nn::Linear(kWidth, 4).ptr()}});
  auto forward = [&](const torch::Tensor& x) {
    return torchlora::linear_forward(*dict["en"], x) -
        torchlora::linear_forward(*dict["fr"], x);
  };
  expect_injection_takes_effect(
      *dict, forward, LoRAConfig(2).target_modules({"fr"}), {"fr"});
  EXPECT_NE(dict["fr"]->as<torchlora::LoRALinearImpl>(), nullptr);
  EXPECT_NE(
      dict->named_children()["fr"]->as<torchlora::LoRALinearImpl>(), nullptr);
  EXPECT_EQ(dict->keys(), (std::vector<std::string>{"en", "fr"}));
}

TEST_F(InjectTest, ABlockSharedAtTwoPathsIsAdaptedOnceAndBothPathsSeeIt) {
  struct TwiceImpl : torch::nn::Module {
    TwiceImpl() {
      Block block;
      first = register_module("first", block);
      second = register_module("second", block);
    }
    torch::Tensor forward(const torch::Tensor& x) {
      return second(first(x));
    }
    Block first{nullptr}, second{nullptr};
  };
  auto model = std::make_shared<TwiceImpl>();
  expect_injection_takes_effect(
      *model,
      [&](const torch::Tensor& x) { return model->forward(x); },
      LoRAConfig(2).target_modules({"mlp.0", "q_proj"}),
      {"first.attn.q_proj", "first.mlp.0"});
  EXPECT_EQ(model->first.ptr(), model->second.ptr());
  const auto& mlp = model->second->mlp;
  EXPECT_NE(mlp->ptr(0)->as<torchlora::LoRALinearImpl>(), nullptr);
  const auto params = model->named_parameters();
  EXPECT_TRUE(params["first.mlp.0.lora_A.default.weight"].is_same(
      params["second.mlp.0.lora_A.default.weight"]));
  EXPECT_EQ(model->first->attn->q_proj->adapter_names().size(), 1u);
}

TEST_F(InjectTest, ALinearRegisteredTwiceInASequentialIsAdaptedOnce) {
  auto seq = [] {
    torch::nn::Linear shared(kWidth, kWidth);
    return torch::nn::Sequential(shared, torch::nn::Tanh(), shared);
  }();
  expect_injection_takes_effect(
      *seq,
      [&](const torch::Tensor& x) { return seq->forward(x); },
      LoRAConfig(2).target_modules({"0", "2"}),
      {"0"});
  EXPECT_EQ(seq->ptr(0), seq->ptr(2));
  EXPECT_NE(seq->ptr(2)->as<torchlora::LoRALinearImpl>(), nullptr);
}

TEST_F(InjectTest, SeveralLevelsOfNestingAndEveryContainerTogether) {
  Net model(2);
  expect_injection_takes_effect(
      *model,
      [&](const torch::Tensor& x) { return model(x); },
      LoRAConfig(4).target_modules({"q_proj", "v_proj", "mlp.2", "fr", "head"}),
      {"blocks.0.attn.q_proj",
       "blocks.0.attn.v_proj",
       "blocks.0.mlp.2",
       "blocks.1.attn.q_proj",
       "blocks.1.attn.v_proj",
       "blocks.1.mlp.2",
       "heads.fr",
       "head"});
}

TEST_F(InjectTest, AcceptsAReferenceASharedPtrOrAHolder) {
  Net by_holder;
  EXPECT_EQ(
      inject_lora(by_holder, LoRAConfig(2).target_modules({"head"})).size(),
      1u);
  auto by_pointer = std::make_shared<NetImpl>();
  EXPECT_EQ(
      inject_lora(by_pointer, LoRAConfig(2).target_modules({"head"})).size(),
      1u);
  NetImpl by_reference;
  EXPECT_EQ(
      inject_lora(by_reference, LoRAConfig(2).target_modules({"head"})).size(),
      1u);
  torch::nn::Sequential seq(torch::nn::Linear(4, 4));
  torchlora::inject_lora(seq, torchlora::LoRAConfig(2).target_modules({"0"}));
  EXPECT_NE(seq->ptr(0)->as<torchlora::LoRALinearImpl>(), nullptr);
}

TEST_F(InjectTest, BuildLoadInjectKeepsTheBaseKeysAndOutputs) {
  // A "pretrained" checkpoint of the plain model.
  const auto path = ::testing::TempDir() + "/net_base.pt";
  Net pretrained;
  torch::save(pretrained, path);
  const auto keys_before = pretrained->named_parameters().keys();

  // Build, load, inject: the flow of a user with an existing model.
  torch::manual_seed(1);
  Net model;
  torch::load(model, path);
  inject_lora(model, LoRAConfig(4).target_modules({"q_proj", "mlp.0", "en"}));

  std::set<std::string> base_keys;
  for (const auto& key : model->named_parameters().keys()) {
    if (key.find("lora_") == std::string::npos) {
      base_keys.insert(key);
    }
  }
  EXPECT_EQ(
      base_keys, std::set<std::string>(keys_before.begin(), keys_before.end()));
  const auto x = input();
  EXPECT_TRUE(torch::equal(model(x), pretrained(x)));
}

TEST_F(InjectTest, ASecondAdapterNameAddsASecondAdapterNeverAWrapper) {
  Net model;
  inject_lora(model, LoRAConfig(4).target_modules({"q_proj", "mlp.0"}));
  inject_lora(
      model,
      LoRAConfig(2).target_modules({"q_proj", "mlp.0"}).adapter_name("fr"));
  auto* mlp0 = model->blocks[0]
                   ->as<BlockImpl>()
                   ->mlp->ptr(0)
                   ->as<torchlora::LoRALinearImpl>();
  ASSERT_NE(mlp0, nullptr);
  EXPECT_EQ(mlp0->adapter_names(), (std::vector<std::string>{"default", "fr"}));
  EXPECT_EQ(mlp0->base_layer()->name(), "torch::nn::LinearImpl");
  EXPECT_EQ(
      model->blocks[0]->as<BlockImpl>()->attn->q_proj->adapter_names(),
      (std::vector<std::string>{"default", "fr"}));
  for (const auto& key : model->named_parameters().keys()) {
    EXPECT_EQ(key.find("lora_A.default.lora_"), std::string::npos) << key;
  }
}

TEST_F(InjectTest, RankAndAlphaPatternsReachTheLayers) {
  Net model;
  inject_lora(
      model,
      LoRAConfig(8)
          .alpha(16)
          .target_modules({"q_proj", "v_proj"})
          .rank_pattern({{"v_proj", 2}})
          .alpha_pattern({{R"(blocks\.1\.attn\.q_proj)", 4.0}}));
  auto attn = [&](int i) { return model->blocks[i]->as<BlockImpl>()->attn; };
  EXPECT_EQ(attn(0)->q_proj->adapter_options("default").rank(), 8);
  EXPECT_EQ(attn(0)->v_proj->adapter_options("default").rank(), 2);
  EXPECT_DOUBLE_EQ(attn(0)->q_proj->scaling("default"), 2.0);
  EXPECT_DOUBLE_EQ(attn(1)->q_proj->scaling("default"), 0.5);
  EXPECT_DOUBLE_EQ(attn(1)->v_proj->scaling("default"), 8.0);
}

TEST_F(InjectTest, LayersToTransformKeepsOnlyThoseLayers) {
  Net model(3);
  const auto paths = inject_lora(
      model,
      LoRAConfig(2)
          .target_modules({"q_proj"})
          .layers_to_transform({0, 2})
          .layers_pattern({"blocks"}));
  EXPECT_EQ(
      paths,
      (std::vector<std::string>{
          "blocks.0.attn.q_proj", "blocks.2.attn.q_proj"}));
}

TEST_F(InjectTest, ExcludeModulesWins) {
  Net model;
  const auto paths = inject_lora(
      model,
      LoRAConfig(2)
          .target_regex(R"(.*(proj|\.en|\.fr|head))")
          .exclude_modules({"head", "k_proj"})
          .exclude_regex(R"(blocks\.1\..*)"));
  EXPECT_EQ(
      paths,
      (std::vector<std::string>{
          "blocks.0.attn.q_proj",
          "blocks.0.attn.v_proj",
          "blocks.0.attn.o_proj",
          "heads.en",
          "heads.fr"}));
}

TEST_F(InjectTest, AllLinearLeavesOutOutputHeadsByName) {
  Net model(1);
  const auto paths =
      inject_lora(model, LoRAConfig(2).target_modules({"all-linear"}));
  EXPECT_EQ(
      paths,
      (std::vector<std::string>{
          "blocks.0.attn.q_proj",
          "blocks.0.attn.k_proj",
          "blocks.0.attn.v_proj",
          "blocks.0.attn.o_proj",
          "blocks.0.mlp.0",
          "blocks.0.mlp.2",
          "heads.en",
          "heads.fr"}));

  // The head is found by its name, not by its place in the model.
  torch::nn::Sequential head_first;
  head_first->push_back("lm_head", torch::nn::Linear(4, 4));
  head_first->push_back("body", torch::nn::Linear(4, 4));
  head_first->push_back("out", torch::nn::Linear(4, 4));
  EXPECT_EQ(
      inject_lora(head_first, LoRAConfig(2).target_modules({"all-linear"})),
      (std::vector<std::string>{"body", "out"}));
}

TEST_F(InjectTest, ASequentialBuiltWithNamesIsSwappedByName) {
  torch::nn::Sequential seq;
  seq->push_back("encode", torch::nn::Linear(kWidth, kWidth));
  seq->push_back("act", torch::nn::Tanh());
  seq->push_back("decode", torch::nn::Linear(kWidth, 4));
  expect_injection_takes_effect(
      *seq,
      [&](const torch::Tensor& x) { return seq->forward(x); },
      LoRAConfig(2).target_modules({"decode"}),
      {"decode"});
  EXPECT_NE(
      seq->named_children()["decode"]->as<torchlora::LoRALinearImpl>(),
      nullptr);
  EXPECT_NE(seq->ptr<torchlora::LoRALinearImpl>(2), nullptr);
}

TEST_F(InjectTest, ALinearTiedIntoTwoContainersIsAdaptedInBoth) {
  struct TiedImpl : torch::nn::Module {
    TiedImpl() {
      torch::nn::Linear tied(kWidth, kWidth);
      encoder = register_module(
          "encoder", torch::nn::Sequential(tied, torch::nn::Tanh()));
      decoder = register_module("decoder", torch::nn::ModuleList(tied));
    }
    torch::Tensor forward(const torch::Tensor& x) {
      return torchlora::linear_forward(*decoder[0], encoder->forward(x));
    }
    torch::nn::Sequential encoder{nullptr};
    torch::nn::ModuleList decoder{nullptr};
  };
  auto model = std::make_shared<TiedImpl>();
  expect_injection_takes_effect(
      *model,
      [&](const torch::Tensor& x) { return model->forward(x); },
      LoRAConfig(2).target_modules({"0"}),
      {"encoder.0"});
  EXPECT_EQ(model->encoder->ptr(0), model->decoder[0]);
  EXPECT_NE(model->decoder[0]->as<torchlora::LoRALinearImpl>(), nullptr);
}

TEST_F(InjectTest, ASecondInjectionFreezesEverythingButItsOwnTrainables) {
  // As in peft, each injection leaves trainable only the adapters, its own
  // modules_to_save and its own bias mode.
  Net model;
  inject_lora(
      model,
      LoRAConfig(2).target_modules({"q_proj"}).modules_to_save({"heads.en"}));
  EXPECT_TRUE(model->named_parameters()["heads.en.weight"].requires_grad());
  inject_lora(
      model, LoRAConfig(2).target_modules({"v_proj"}).adapter_name("fr"));
  EXPECT_FALSE(model->named_parameters()["heads.en.weight"].requires_grad());
  EXPECT_TRUE(
      model->named_parameters()["blocks.0.attn.q_proj.lora_A.default.weight"]
          .requires_grad());
  EXPECT_TRUE(model->named_parameters()["blocks.0.attn.v_proj.lora_A.fr.weight"]
                  .requires_grad());
}

TEST_F(InjectTest, ModulesToSaveAreTrainedInFullAndNotAdapted) {
  Net model;
  inject_lora(
      model,
      LoRAConfig(2)
          .target_modules({"q_proj", "en"})
          .modules_to_save({"heads.en"}));
  for (const auto& item : model->named_parameters()) {
    const bool in_head = item.key().rfind("heads.en.", 0) == 0;
    const bool adapter = item.key().find("lora_") != std::string::npos;
    EXPECT_EQ(item.value().requires_grad(), in_head || adapter) << item.key();
  }
  EXPECT_NE(model->heads["en"]->as<torch::nn::LinearImpl>(), nullptr);
}

TEST_F(InjectTest, BiasModesFollowPeft) {
  auto trainable_biases = [](torchlora::LoRABias bias) {
    Net model(1);
    inject_lora(
        model, LoRAConfig(2).target_modules({"q_proj", "fr"}).bias(bias));
    std::set<std::string> names;
    for (const auto& item : model->named_parameters()) {
      if (item.value().requires_grad() &&
          item.key().find("lora_") == std::string::npos) {
        names.insert(item.key());
      }
    }
    return names;
  };
  EXPECT_TRUE(trainable_biases(torchlora::LoRABias::none).empty());
  EXPECT_EQ(
      trainable_biases(torchlora::LoRABias::lora_only),
      (std::set<std::string>{"blocks.0.attn.q_proj.bias", "heads.fr.bias"}));
  const auto all = trainable_biases(torchlora::LoRABias::all);
  EXPECT_EQ(all.size(), 9u); // 4 attention, 2 MLP, 2 heads, 1 head
  for (const auto& name : all) {
    EXPECT_EQ(name.substr(name.size() - 5), ".bias") << name;
  }
}

// ---------------------------------------------------------------- errors

TEST_F(InjectTest, ATypedPlainLinearMemberIsRefusedAndNothingChanges) {
  TypedLinearNet model;
  const auto x = input();
  const auto output_before = model(x);
  const auto state_before = snapshot(*model);
  const auto tree_before = module_tree(*model);
  EXPECT_TORCHLORA_ERROR(
      inject_lora(model, LoRAConfig(2).target_modules({"out", "fc"})),
      "cannot adapt 'fc': this torch::nn::Linear is also held outside the model's registry");
  EXPECT_TORCHLORA_ERROR(
      inject_lora(model, LoRAConfig(2).target_modules({"fc"})),
      "Declare the member as `torchlora::LoRALinear fc{nullptr};`");
  expect_unchanged(state_before, *model);
  EXPECT_EQ(module_tree(*model), tree_before);
  EXPECT_TRUE(torch::equal(model(x), output_before));
  EXPECT_TRUE(model->out->adapter_names().empty())
      << "'out' was adapted before the refusal";
}

TEST_F(InjectTest, AnOutsideReferenceToAContainedLinearIsRefused) {
  torch::nn::Linear kept(kWidth, kWidth);
  torch::nn::Sequential seq(kept, torch::nn::ReLU());
  const auto before = snapshot(*seq);
  EXPECT_TORCHLORA_ERROR(
      inject_lora(seq, LoRAConfig(2).target_modules({"0"})),
      "cannot adapt '0': this torch::nn::Linear sits in a container but is also held outside "
      "the model (1 more reference(s)");
  expect_unchanged(before, *seq);
  EXPECT_NE(seq->ptr(0)->as<torch::nn::LinearImpl>(), nullptr);
}

namespace {

/// A LoRA layer whose add_adapter fails, as an out-of-memory error would.
struct FailingLayerImpl : torch::nn::Module, torchlora::LoRALayer {
  std::vector<std::string> adapter_names() const override {
    return {};
  }
  bool has_adapter(const std::string&) const override {
    return false;
  }
  void add_adapter(const std::string&, const torchlora::LoRAOptions&) override {
    TORCH_CHECK(false, "simulated failure while adding an adapter");
  }
  void delete_adapter(const std::string&) override {}
  void set_active_adapters(const std::vector<std::string>&) override {}
  std::vector<std::string> active_adapters() const override {
    return {};
  }
  void set_scale(const std::string&, double) override {}
  double scale(const std::string&) const override {
    return 1.0;
  }
  const torchlora::LoRAOptions& adapter_options(
      const std::string&) const override {
    static const torchlora::LoRAOptions options(1);
    return options;
  }
  void set_adapters_enabled(bool) override {}
  bool adapters_enabled() const override {
    return true;
  }
  std::vector<torch::Tensor> adapter_parameters() const override {
    return {};
  }
  std::vector<torch::Tensor> active_adapter_parameters() const override {
    return {};
  }
  torch::Tensor base_bias() const override {
    return {};
  }
  void merge(bool) override {}
  void unmerge() override {}
  bool merged() const override {
    return false;
  }
  bool merge_is_finite() const override {
    return true;
  }
  void check_mergeable() const override {}
  void check_unmergeable() const override {}
  void unload(bool) override {}
  std::shared_ptr<torch::nn::Module> base_module() const override {
    return nullptr;
  }
  torch::nn::AnyModule base_any_module() const override {
    return {};
  }
};

} // namespace

TEST_F(InjectTest, AFailureWhileChangingTheModelIsRolledBack) {
  struct NetWithFailingLayerImpl : torch::nn::Module {
    NetWithFailingLayerImpl() {
      seq = register_module(
          "seq",
          torch::nn::Sequential(
              torch::nn::Linear(kWidth, kWidth), torch::nn::ReLU()));
      typed = register_module(
          "typed", LoRALinear(torch::nn::LinearOptions(kWidth, kWidth)));
      register_module("failing", std::make_shared<FailingLayerImpl>());
    }
    torch::nn::Sequential seq{nullptr};
    LoRALinear typed{nullptr};
  };
  auto model = std::make_shared<NetWithFailingLayerImpl>();
  const auto* original = model->seq->ptr(0).get();
  const auto before = snapshot(*model);
  const auto tree_before = module_tree(*model);
  try {
    inject_lora(model, LoRAConfig(2).target_modules({"0", "typed", "failing"}));
    ADD_FAILURE() << "expected the simulated failure";
  } catch (const c10::Error& error) {
    EXPECT_NE(
        torchlora_test::message_of(error).find("simulated failure"),
        std::string::npos);
  }
  expect_unchanged(before, *model);
  EXPECT_EQ(module_tree(*model), tree_before);
  EXPECT_EQ(model->seq->ptr(0).get(), original);
  EXPECT_EQ((*model->seq->begin()).ptr().get(), original);
  EXPECT_TRUE(model->typed->adapter_names().empty());
}

TEST_F(InjectTest, NothingMatchedNamesTheTargetsAndTheAdaptableLayers) {
  Net model(1);
  const auto before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      inject_lora(model, LoRAConfig(2).target_modules({"query", "value"})),
      "no module matched target_modules {\"query\", \"value\"} (after exclusions and layer "
      "filters). The model's adaptable layers: blocks.0.attn.q_proj, blocks.0.attn.k_proj, "
      "blocks.0.attn.v_proj, blocks.0.attn.o_proj, blocks.0.mlp.0, blocks.0.mlp.2, heads.en, "
      "heads.fr, ... (9 in all)");
  expect_unchanged(before, *model);
}

TEST_F(InjectTest, MatchingAModuleThatIsNotAnAdaptableLayerIsAnError) {
  Net model(1);
  const auto before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      inject_lora(model, LoRAConfig(2).target_modules({"q_proj", "mlp"})),
      "matched 'blocks.0.mlp', a torch::nn::SequentialImpl; only torch::nn::Linear, "
      "Embedding, Conv1d, Conv2d, Conv3d and MultiheadAttention layers and their torchlora "
      "LoRA layers can be adapted. Name the layers inside it instead.");
  expect_unchanged(before, *model);
  EXPECT_TRUE(
      model->blocks[0]->as<BlockImpl>()->attn->q_proj->adapter_names().empty());
}

TEST_F(InjectTest, AnAdapterNameThatExistsIsAnErrorAndNothingChanges) {
  Net model(2);
  inject_lora(model, LoRAConfig(2).target_modules({"blocks.1.attn.q_proj"}));
  const auto before = snapshot(*model);
  const auto tree_before = module_tree(*model);
  // blocks.0.* come first in model order; blocks.1.attn.q_proj fails.
  EXPECT_TORCHLORA_ERROR(
      inject_lora(model, LoRAConfig(2).target_modules({"mlp.0", "q_proj"})),
      "'blocks.1.attn.q_proj' already has an adapter named \"default\"");
  expect_unchanged(before, *model);
  EXPECT_EQ(module_tree(*model), tree_before);
  auto block0 = model->blocks[0]->as<BlockImpl>();
  EXPECT_NE(block0->mlp->ptr(0)->as<torch::nn::LinearImpl>(), nullptr);
  EXPECT_TRUE(block0->attn->q_proj->adapter_names().empty());
}

TEST_F(InjectTest, ModulesToSaveThatMatchNothingIsAnError) {
  Net model(1);
  const auto before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      inject_lora(
          model,
          LoRAConfig(2)
              .target_modules({"q_proj"})
              .modules_to_save({"classifier"})),
      "modules_to_save entry \"classifier\" matches no module of the model");
  expect_unchanged(before, *model);
}

TEST_F(InjectTest, ABadConfigIsRefusedBeforeTheModelIsTouched) {
  Net model(1);
  const auto before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      inject_lora(model, LoRAConfig(-2).target_modules({"q_proj"})),
      "LoRAConfig needs a rank > 0, got -2");
  EXPECT_TORCHLORA_ERROR(
      inject_lora(model, LoRAConfig(2).target_regex("*bad")),
      "not a valid regex");
  expect_unchanged(before, *model);
}

TEST_F(InjectTest, EmptyModelsAreErrors) {
  std::shared_ptr<NetImpl> none;
  EXPECT_TORCHLORA_ERROR(
      inject_lora(none, LoRAConfig(2).target_modules({"x"})),
      "got a null std::shared_ptr where a model was expected");
  Net empty{nullptr};
  EXPECT_TORCHLORA_ERROR(
      inject_lora(empty, LoRAConfig(2).target_modules({"x"})),
      "got an empty module holder (nullptr) where a model was expected");
}

TEST_F(InjectTest, LinearForwardRefusesOtherModules) {
  torch::nn::ReLU relu;
  EXPECT_TORCHLORA_ERROR(
      torchlora::linear_forward(*relu, torch::randn({2})),
      "linear_forward needs a torch::nn::Linear, a torchlora::LoRALinear or a "
      "torchlora::QuantizedLinear, got a torch::nn::ReLUImpl");
}

TEST_F(InjectTest, InjectedModelRunsOnCuda_CUDA) {
  SKIP_WITHOUT_CUDA();
  Net model;
  model->to(torch::kCUDA);
  inject_lora(
      model,
      LoRAConfig(4)
          .target_modules({"q_proj", "mlp.0", "fr"})
          .init(LoRAInit::random));
  for (const auto& item : model->named_parameters()) {
    EXPECT_TRUE(item.value().is_cuda()) << item.key();
  }
  const auto x = input().to(torch::kCUDA);
  auto y = model(x);
  y.sum().backward();
  auto* head = model->heads["fr"]->as<torchlora::LoRALinearImpl>();
  ASSERT_NE(head, nullptr);
  EXPECT_TRUE(head->lora_A["default"]
                  ->as<torch::nn::Linear>()
                  ->weight.grad()
                  .is_cuda());
}

TEST_F(InjectTest, TheDocumentedCallsCompileAndHold) {
  Net model(2);
  auto paths = torchlora::inject_lora(
      *model,
      torchlora::LoRAConfig(8).alpha(16).dropout(0.05).target_modules(
          {"q_proj", "v_proj"}));
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(4)
          .target_regex(R"(blocks\.\d+\.mlp\.0)")
          .exclude_modules({"head"})
          .adapter_name("fr"));
  torch::nn::Sequential seq(torch::nn::Linear(4, 4), torch::nn::ReLU());
  torchlora::inject_lora(seq, torchlora::LoRAConfig(2).target_modules({"0"}));

  EXPECT_EQ(paths.size(), 4u);
  auto* mlp0 = model->blocks[1]
                   ->as<BlockImpl>()
                   ->mlp->ptr<torchlora::LoRALinearImpl>(0)
                   .get();
  ASSERT_NE(mlp0, nullptr);
  EXPECT_EQ(mlp0->adapter_names(), (std::vector<std::string>{"fr"}));
  EXPECT_NE(seq->ptr<torchlora::LoRALinearImpl>(0), nullptr);
}

} // namespace torchlora_inject_test
