// Tests of save_adapter and load_adapter (include/torchlora/adapter_io.h).
#include "test_support.h"

#include <torchlora/adapter_io.h>
#include <torchlora/adapters.h>
#include <torchlora/inject.h>
#include <torchlora/merge.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_adapter_io_test {

using torchlora::LoRAConfig;
using torchlora::LoRAInit;
using torchlora::LoRALinear;
using torchlora_test::expect_unchanged;
using torchlora_test::module_tree;
using torchlora_test::snapshot;
namespace fs = std::filesystem;

namespace {

class AdapterIoTest : public torchlora_test::Seeded {
 protected:
  void SetUp() override {
    Seeded::SetUp();
    dir = ::testing::TempDir() + "/adapter_io_" +
        ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir);
  }
  std::string dir;
};

/// A typed member, a Sequential and a ModuleDict head.
struct NetImpl : torch::nn::Module {
  NetImpl() {
    q_proj =
        register_module("q_proj", LoRALinear(torch::nn::LinearOptions(8, 8)));
    v_proj =
        register_module("v_proj", LoRALinear(torch::nn::LinearOptions(8, 8)));
    mlp = register_module(
        "mlp",
        torch::nn::Sequential(
            torch::nn::Linear(8, 16),
            torch::nn::ReLU(),
            torch::nn::Linear(16, 8)));
    heads = register_module("heads", torch::nn::ModuleDict());
    heads->update({{"cls", torch::nn::Linear(8, 3).ptr()}});
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto h = mlp->forward(q_proj(x) + v_proj(x));
    return torchlora::linear_forward(*heads["cls"], h);
  }
  LoRALinear q_proj{nullptr}, v_proj{nullptr};
  torch::nn::Sequential mlp{nullptr};
  torch::nn::ModuleDict heads{nullptr};
};
TORCH_MODULE(Net);

/// Two models with equal base weights: `trained` gets a random adapter.
struct Pair {
  Net trained;
  Net fresh;
};

Pair make_pair(const std::string& checkpoint) {
  Pair pair;
  torch::save(pair.trained, checkpoint);
  torch::load(pair.fresh, checkpoint);
  return pair;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

void write_json(const std::string& path, const nlohmann::json& json) {
  std::ofstream(path) << json.dump(2);
}

} // namespace

TEST_F(AdapterIoTest, SaveThenLoadIntoAFreshModelGivesIdenticalOutputs) {
  auto pair = make_pair(dir + ".base.pt");
  const auto config = LoRAConfig(4)
                          .alpha(8)
                          .init(LoRAInit::random)
                          .target_modules({"q_proj", "v_proj", "mlp.0", "cls"})
                          .rank_pattern({{"cls", 2}})
                          .alpha_pattern({{"v_proj", 3.0}});
  torchlora::inject_lora(pair.trained, config);
  torchlora::save_adapter(*pair.trained, dir);
  torchlora::load_adapter(*pair.fresh, dir);
  const auto x = torch::randn({5, 8});
  EXPECT_TRUE(torch::equal(pair.fresh(x), pair.trained(x)));
  EXPECT_EQ(
      pair.fresh->heads["cls"]
          ->as<torchlora::LoRALinearImpl>()
          ->adapter_options("default")
          .rank(),
      2);
  EXPECT_DOUBLE_EQ(pair.fresh->v_proj->scaling("default"), 3.0 / 4.0);
  // The loaded adapter trains, the base stays frozen.
  EXPECT_TRUE(pair.fresh->named_parameters()["q_proj.lora_A.default.weight"]
                  .requires_grad());
  EXPECT_FALSE(pair.fresh->named_parameters()["q_proj.weight"].requires_grad());
}

TEST_F(AdapterIoTest, TheFilesUsePeftsKeysAndFields) {
  Net model;
  torchlora::inject_lora(
      model,
      LoRAConfig(4)
          .alpha(16)
          .dropout(0.05)
          .target_modules({"q_proj", "mlp.2"})
          .rank_pattern({{"mlp.2", 2}}));
  torchlora::save_adapter(
      *model,
      dir,
      torchlora::SaveAdapterOptions().base_model_name_or_path("tiny").task_type(
          "CAUSAL_LM"));

  torchlora::safetensors::Metadata metadata;
  const auto tensors = torchlora::safetensors::load(
      dir + "/adapter_model.safetensors", &metadata);
  EXPECT_EQ(metadata, (torchlora::safetensors::Metadata{{"format", "pt"}}));
  const auto keys = tensors.keys();
  EXPECT_EQ(
      std::set<std::string>(keys.begin(), keys.end()),
      (std::set<std::string>{
          "base_model.model.q_proj.lora_A.weight",
          "base_model.model.q_proj.lora_B.weight",
          "base_model.model.mlp.2.lora_A.weight",
          "base_model.model.mlp.2.lora_B.weight"}));
  EXPECT_EQ(
      tensors["base_model.model.q_proj.lora_A.weight"].sizes(),
      (c10::IntArrayRef{4, 8}));
  EXPECT_EQ(
      tensors["base_model.model.mlp.2.lora_B.weight"].sizes(),
      (c10::IntArrayRef{8, 2}));

  const auto config = read_json(dir + "/adapter_config.json");
  EXPECT_EQ(config["peft_type"], "LORA");
  EXPECT_EQ(config["r"], 4);
  EXPECT_EQ(config["lora_alpha"], 16.0);
  EXPECT_EQ(config["lora_dropout"], 0.05);
  EXPECT_EQ(config["target_modules"], nlohmann::json({"q_proj", "mlp.2"}));
  // The bare path, as peft writes it: no other adapted layer ends with it.
  EXPECT_EQ(config["rank_pattern"], nlohmann::json({{"mlp.2", 2}}));
  EXPECT_EQ(config["alpha_pattern"], nlohmann::json::object());
  EXPECT_EQ(config["bias"], "none");
  EXPECT_EQ(config["use_rslora"], false);
  EXPECT_EQ(config["init_lora_weights"], true);
  EXPECT_EQ(config["fan_in_fan_out"], false);
  EXPECT_EQ(config["use_dora"], false);
  EXPECT_EQ(config["inference_mode"], true);
  EXPECT_TRUE(config["modules_to_save"].is_null());
  EXPECT_TRUE(config["exclude_modules"].is_null());
  EXPECT_TRUE(config["layers_to_transform"].is_null());
  EXPECT_TRUE(config["layers_pattern"].is_null());
  EXPECT_EQ(config["task_type"], "CAUSAL_LM");
  EXPECT_EQ(config["base_model_name_or_path"], "tiny");
  // As peft writes it for a model that is not a transformers one.
  ASSERT_TRUE(config.contains("auto_mapping"));
  EXPECT_TRUE(config["auto_mapping"].is_null());
}

TEST_F(AdapterIoTest, WithItsConfigTheFileHoldsTargetsAndPatternsAsGiven) {
  Net model;
  const auto config = LoRAConfig(4)
                          .alpha(8)
                          .target_modules({"mlp.2", "q_proj"})
                          .rank_pattern({{"mlp\\.2", 2}})
                          .alpha_pattern({{"q_proj", 3.0}});
  torchlora::inject_lora(model, config);
  torchlora::save_adapter(*model, dir, config);
  auto json = read_json(dir + "/adapter_config.json");
  EXPECT_EQ(json["target_modules"], nlohmann::json({"mlp.2", "q_proj"}));
  EXPECT_EQ(json["rank_pattern"], nlohmann::json({{"mlp\\.2", 2}}));
  EXPECT_EQ(json["alpha_pattern"], nlohmann::json({{"q_proj", 3.0}}));
  EXPECT_EQ(json["r"], 4);
  EXPECT_EQ(json["lora_alpha"], 8.0);

  // A config that no longer selects the adapted layers with their ranks
  // (here: another rank) is not written; the paths are.
  torchlora::save_adapter(
      *model,
      dir + "/other",
      LoRAConfig(3).alpha(8).target_modules({"mlp.2", "q_proj"}));
  json = read_json(dir + "/other/adapter_config.json");
  EXPECT_EQ(json["target_modules"], nlohmann::json({"q_proj", "mlp.2"}));
  // On a tie, the first layer's rank and alpha are the common ones.
  EXPECT_EQ(json["r"], 4);
  EXPECT_EQ(json["lora_alpha"], 3.0);
  EXPECT_EQ(json["rank_pattern"], nlohmann::json({{"mlp.2", 2}}));
  EXPECT_EQ(json["alpha_pattern"], nlohmann::json({{"mlp.2", 8.0}}));
  Net copy;
  torchlora::load_adapter(*copy, dir + "/other");
  EXPECT_EQ(copy->named_parameters()["mlp.2.lora_A.default.weight"].size(0), 2);
  EXPECT_DOUBLE_EQ(copy->q_proj->scaling("default"), 3.0 / 4.0);
}

TEST_F(AdapterIoTest, ANamedAdapterGoesIntoItsSubFolderAndLoadsUnderItsName) {
  auto pair = make_pair(dir + ".base.pt");
  torchlora::inject_lora(
      pair.trained,
      LoRAConfig(2).init(LoRAInit::random).target_modules({"mlp.0"}));
  torchlora::inject_lora(
      pair.trained,
      LoRAConfig(3)
          .init(LoRAInit::random)
          .target_modules({"v_proj"})
          .adapter_name("fr"));
  torchlora::save_adapter(
      *pair.trained, dir, torchlora::SaveAdapterOptions().adapter_name("fr"));
  EXPECT_TRUE(fs::exists(dir + "/fr/adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(dir + "/fr/adapter_config.json"));
  EXPECT_FALSE(fs::exists(dir + "/adapter_config.json"));

  torchlora::load_adapter(*pair.fresh, dir, "fr");
  EXPECT_EQ(
      pair.fresh->v_proj->adapter_names(), (std::vector<std::string>{"fr"}));
  torchlora::set_adapter(pair.trained, "fr");
  const auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::equal(pair.fresh(x), pair.trained(x)));
  // Also straight from the sub-folder.
  Net other;
  torch::load(other, dir + ".base.pt");
  torchlora::load_adapter(*other, dir + "/fr", "fr");
  EXPECT_TRUE(torch::equal(other(x), pair.trained(x)));
}

TEST_F(AdapterIoTest, ConfigsPeftWouldReadOtherwiseAreWrittenAsPaths) {
  // A pattern key given twice (the JSON object keeps one), a layer filter
  // (peft versions count layer indices differently): the file holds the
  // adapted paths, and both reload as they were.
  for (const auto& config :
       {LoRAConfig(2)
            .alpha(2)
            .target_modules({"q_proj", "v_proj"})
            .alpha_pattern({{"q_proj", 4.0}, {"q_proj", 16.0}}),
        LoRAConfig(2)
            .target_modules({"q_proj", "v_proj"})
            .rank_pattern({{"v_proj", 4}, {"v_proj", 3}}),
        LoRAConfig(2)
            .target_modules({"mlp.0", "mlp.2"})
            .layers_to_transform({0})
            .layers_pattern({"mlp"})}) {
    auto pair = make_pair(dir + ".base.pt");
    torchlora::inject_lora(
        pair.trained, LoRAConfig(config).init(LoRAInit::random));
    fs::remove_all(dir);
    torchlora::save_adapter(*pair.trained, dir, config);
    const auto json = read_json(dir + "/adapter_config.json");
    EXPECT_TRUE(json["layers_to_transform"].is_null());
    EXPECT_TRUE(json["layers_pattern"].is_null());
    // As given, the reload would take the last alpha (x4 off) or the last
    // rank (a shape error).
    torchlora::load_adapter(*pair.fresh, dir);
    const auto x = torch::randn({3, 8});
    EXPECT_TRUE(torch::allclose(pair.fresh(x), pair.trained(x)));
  }
}

TEST_F(AdapterIoTest, ModulesToSaveMatchAsPeftMatchesThem) {
  // peft takes every module whose path ends with an entry, without a dot
  // boundary: "cls" also names "heads.mcls" (and "heads.cls").
  struct HeadsImpl : torch::nn::Module {
    HeadsImpl() {
      fc = register_module("fc", LoRALinear(8, 8));
      heads = register_module("heads", torch::nn::ModuleDict());
      heads->update({{"cls", torch::nn::Linear(8, 3).ptr()}});
      heads->update({{"mcls", torch::nn::Linear(8, 3).ptr()}});
    }
    torch::Tensor forward(const torch::Tensor& x) {
      const auto h = fc(x);
      return torchlora::linear_forward(*heads["cls"], h) +
          torchlora::linear_forward(*heads["mcls"], h);
    }
    LoRALinear fc{nullptr};
    torch::nn::ModuleDict heads{nullptr};
  };
  auto trained = std::make_shared<HeadsImpl>();
  auto fresh = std::make_shared<HeadsImpl>();
  {
    torch::NoGradGuard no_grad;
    for (auto& item : fresh->named_parameters()) {
      item.value().copy_(trained->named_parameters()[item.key()]);
    }
  }
  const auto config =
      LoRAConfig(2).target_modules({"fc"}).modules_to_save({"cls"});
  torchlora::inject_lora(*trained, config);
  EXPECT_TRUE(trained->named_parameters()["heads.mcls.weight"].requires_grad());
  {
    torch::NoGradGuard no_grad;
    trained->named_parameters()["heads.mcls.weight"].add_(1);
    trained->named_parameters()["heads.cls.bias"].add_(1);
  }
  torchlora::save_adapter(*trained, dir, config);
  const auto keys =
      torchlora::safetensors::load(dir + "/adapter_model.safetensors").keys();
  EXPECT_EQ(
      std::set<std::string>(keys.begin(), keys.end()),
      (std::set<std::string>{
          "base_model.model.fc.lora_A.weight",
          "base_model.model.fc.lora_B.weight",
          "base_model.model.heads.cls.weight",
          "base_model.model.heads.cls.bias",
          "base_model.model.heads.mcls.weight",
          "base_model.model.heads.mcls.bias"}));
  torchlora::load_adapter(*fresh, dir);
  const auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::equal(fresh->forward(x), trained->forward(x)));
}

TEST_F(AdapterIoTest, ModulesToSaveAndBiasesTravelWithTheAdapter) {
  auto pair = make_pair(dir + ".base.pt");
  const auto config = LoRAConfig(2)
                          .init(LoRAInit::random)
                          .target_modules({"q_proj"})
                          .modules_to_save({"cls"})
                          .bias(torchlora::LoRABias::lora_only);
  torchlora::inject_lora(pair.trained, config);
  {
    torch::NoGradGuard no_grad;
    pair.trained->named_parameters()["heads.cls.weight"].add_(1);
    pair.trained->named_parameters()["q_proj.bias"].add_(1);
  }
  torchlora::save_adapter(*pair.trained, dir, config);
  const auto keys =
      torchlora::safetensors::load(dir + "/adapter_model.safetensors").keys();
  EXPECT_EQ(
      std::set<std::string>(keys.begin(), keys.end()),
      (std::set<std::string>{
          "base_model.model.q_proj.lora_A.weight",
          "base_model.model.q_proj.lora_B.weight",
          // peft keys an adapted layer's bias through its base_layer.
          "base_model.model.q_proj.base_layer.bias",
          "base_model.model.heads.cls.weight",
          "base_model.model.heads.cls.bias"}));
  const auto json = read_json(dir + "/adapter_config.json");
  // As given, as peft writes them (both match them as a dotted suffix).
  EXPECT_EQ(json["modules_to_save"], nlohmann::json({"cls"}));
  EXPECT_EQ(json["bias"], "lora_only");

  torchlora::load_adapter(*pair.fresh, dir);
  const auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::equal(pair.fresh(x), pair.trained(x)));
  EXPECT_TRUE(
      pair.fresh->named_parameters()["heads.cls.weight"].requires_grad());
  EXPECT_TRUE(pair.fresh->named_parameters()["q_proj.bias"].requires_grad());
}

TEST_F(AdapterIoTest, TrainableParametersLeftOutOfTheFileAreNamedInAWarning) {
  Net model;
  const auto config = LoRAConfig(2)
                          .target_modules({"q_proj"})
                          .modules_to_save({"cls"})
                          .bias(torchlora::LoRABias::lora_only);
  torchlora::inject_lora(model, config);

  // Without the config, the head and q_proj's bias would be lost silently.
  ::testing::internal::CaptureStderr();
  torchlora::save_adapter(*model, dir + "/without");
  const auto without = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(
      without.find(
          "torchlora: save_adapter: 3 trainable parameter(s) are not saved "
          "(q_proj.bias, heads.cls.weight, heads.cls.bias); name their "
          "modules in modules_to_save"),
      std::string::npos)
      << without;

  ::testing::internal::CaptureStderr();
  torchlora::save_adapter(*model, dir + "/with", config);
  EXPECT_EQ(
      ::testing::internal::GetCapturedStderr().find("are not saved"),
      std::string::npos);

  // A second adapter's weights are saved on their own: no warning for them.
  torchlora::inject_lora(
      model, LoRAConfig(2).target_modules({"v_proj"}).adapter_name("other"));
  ::testing::internal::CaptureStderr();
  torchlora::save_adapter(*model, dir + "/with", config);
  EXPECT_EQ(
      ::testing::internal::GetCapturedStderr().find("are not saved"),
      std::string::npos);
}

TEST_F(AdapterIoTest, APeftStyleConfigWithShortNamesLoads) {
  // As Python peft writes it: short target names, patterns, extra fields.
  Net source;
  torchlora::inject_lora(
      source,
      LoRAConfig(4)
          .init(LoRAInit::random)
          .target_modules({"q_proj", "v_proj"})
          .rank_pattern({{"v_proj", 2}}));
  torchlora::save_adapter(*source, dir);
  write_json(
      dir + "/adapter_config.json",
      {{"peft_type", "LORA"},
       {"auto_mapping", nullptr},
       {"r", 4},
       {"lora_alpha", 8},
       {"lora_dropout", 0.1},
       {"target_modules", {"v_proj", "q_proj"}},
       {"rank_pattern", {{"v_proj", 2}}},
       {"alpha_pattern", nlohmann::json::object()},
       {"bias", "none"},
       {"use_dora", false},
       {"fan_in_fan_out", false},
       {"init_lora_weights", true},
       {"layers_to_transform", nullptr},
       {"modules_to_save", nullptr},
       {"task_type", "CAUSAL_LM"},
       {"peft_version", "0.21.0"}});
  Net target;
  torchlora::load_adapter(*target, dir);
  EXPECT_EQ(target->v_proj->adapter_options("default").rank(), 2);
  EXPECT_DOUBLE_EQ(target->q_proj->scaling("default"), 2.0);
  EXPECT_EQ(target->q_proj->adapter_options("default").dropout(), 0.1);
  EXPECT_TRUE(torch::equal(
      target->named_parameters()["v_proj.lora_B.default.weight"],
      source->named_parameters()["v_proj.lora_B.default.weight"]));
}

TEST_F(AdapterIoTest, LoadingIntoAnAdaptedModelConvertsToItsAdapterDtype) {
  Net source;
  torchlora::inject_lora(
      source, LoRAConfig(2).init(LoRAInit::random).target_modules({"mlp.0"}));
  torchlora::save_adapter(*source, dir);
  Net target;
  torchlora::inject_lora(
      target, LoRAConfig(2).target_modules({"mlp.0"}).dtype(torch::kFloat64));
  torchlora::load_adapter(*target, dir);
  const auto loaded = target->named_parameters()["mlp.0.lora_A.default.weight"];
  EXPECT_EQ(loaded.scalar_type(), torch::kFloat64);
  EXPECT_TRUE(torch::equal(
      loaded,
      source->named_parameters()["mlp.0.lora_A.default.weight"].to(
          torch::kFloat64)));
}

// ---------------------------------------------------------------- errors

TEST_F(
    AdapterIoTest,
    AMissingExtraOrMisShapedTensorIsAnErrorAndNothingChanges) {
  Net source;
  torchlora::inject_lora(
      source,
      LoRAConfig(2).init(LoRAInit::random).target_modules({"q_proj", "mlp.0"}));
  torchlora::save_adapter(*source, dir);
  const auto file = dir + "/adapter_model.safetensors";
  const auto good = torchlora::safetensors::load(file);

  auto expect_refused = [&](const torchlora::safetensors::Tensors& tensors,
                            const std::string& text) {
    torchlora::safetensors::save(file, tensors, {{"format", "pt"}});
    Net target;
    const auto before = snapshot(*target);
    const auto tree = module_tree(*target);
    EXPECT_TORCHLORA_ERROR(torchlora::load_adapter(*target, dir), text);
    expect_unchanged(before, *target);
    EXPECT_EQ(module_tree(*target), tree);
    EXPECT_TRUE(target->q_proj->adapter_names().empty());
  };

  torchlora::safetensors::Tensors missing;
  for (const auto& item : good) {
    if (item.key() != "base_model.model.mlp.0.lora_B.weight") {
      missing.insert(item.key(), item.value());
    }
  }
  expect_refused(
      missing,
      "load_adapter: the file has no tensor \"base_model.model.mlp.0.lora_B.weight\" (the model "
      "needs one of shape [16, 2])");

  auto extra = good;
  extra.insert("base_model.model.v_proj.lora_A.weight", torch::zeros({2, 8}));
  expect_refused(
      extra,
      "the file's tensor \"base_model.model.v_proj.lora_A.weight\" (shape [2, 8]) matches "
      "nothing in the model");

  torchlora::safetensors::Tensors wrong;
  for (const auto& item : good) {
    wrong.insert(
        item.key(),
        item.key() == "base_model.model.q_proj.lora_A.weight"
            ? torch::zeros({2, 7})
            : item.value());
  }
  expect_refused(
      wrong,
      "tensor \"base_model.model.q_proj.lora_A.weight\" has shape [2, 7] in the file, but the "
      "model needs [2, 8]");
}

TEST_F(
    AdapterIoTest,
    ConfigsWithOtherTypesOrUnsupportedFeaturesAreRefusedByName) {
  Net source;
  torchlora::inject_lora(source, LoRAConfig(2).target_modules({"q_proj"}));
  torchlora::save_adapter(*source, dir);
  const auto path = dir + "/adapter_config.json";
  const auto good = read_json(path);
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"peft_type", "IA3"}},
       "adapter_config.json: peft_type is IA3; torchlora loads LORA adapters only"},
      {{{"init_lora_weights", "corda"}},
       "initialised with peft's \"corda\", which changes the base weights"},
      {{{"fan_in_fan_out", true}}, "\"fan_in_fan_out\" (true)"},
      {{{"lora_bias", true}}, "\"lora_bias\""},
      {{{"layer_replication", {{0, 2}}}}, "\"layer_replication\""},
      {{{"target_parameters", {"experts.w1"}}}, "\"target_parameters\""},
      {{{"target_modules", nullptr}},
       "adapter_config.json: it has no target_modules"},
      {{{"bias", "some"}},
       "\"bias\" must be \"none\", \"all\" or \"lora_only\", got \"some\""},
      {{{"r", 0}}, "\"r\" must be > 0, got 0"},
  };
  for (const auto& [change, text] : cases) {
    auto config = good;
    config.update(change);
    write_json(path, config);
    Net target;
    const auto before = snapshot(*target);
    EXPECT_TORCHLORA_ERROR(torchlora::load_adapter(*target, dir), text);
    expect_unchanged(before, *target);
  }
  fs::remove(path);
  Net target;
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*target, dir),
      "load_adapter: no adapter_config.json in '");
}

TEST_F(AdapterIoTest, SavingAnAdapterThatDoesNotExistIsAnError) {
  Net model;
  torchlora::inject_lora(model, LoRAConfig(2).target_modules({"q_proj"}));
  EXPECT_TORCHLORA_ERROR(
      torchlora::save_adapter(
          *model, dir, torchlora::SaveAdapterOptions().adapter_name("fr")),
      "save_adapter: the model has no adapter named \"fr\"");
  EXPECT_TORCHLORA_ERROR(
      torchlora::save_adapter(
          *model,
          dir,
          torchlora::SaveAdapterOptions().modules_to_save({"nope"})),
      "save_adapter: modules_to_save entry \"nope\" matches no module of the model");
  EXPECT_FALSE(fs::exists(dir + "/adapter_config.json"));
}

TEST_F(AdapterIoTest, TheDocumentedCallsCompileAndHold) {
  auto model = std::make_shared<NetImpl>();
  auto other = std::make_shared<NetImpl>();
  torchlora::inject_lora(*model, LoRAConfig(2).target_modules({"q_proj"}));
  const auto out = dir + "/out/adapter";
  torchlora::save_adapter(
      *model, out); // adapter_model.safetensors + adapter_config.json
  torchlora::load_adapter(*other, out); // injects per the config and loads
  auto tensors =
      torchlora::safetensors::load(out + "/adapter_model.safetensors");
  torchlora::safetensors::save(dir + "/copy.safetensors", tensors);
  EXPECT_EQ(torchlora::safetensors::load(dir + "/copy.safetensors").size(), 2u);
  EXPECT_EQ(
      other->q_proj->adapter_names(), (std::vector<std::string>{"default"}));
}

namespace {

/// "fc" (adaptable), "blk.fc" and "blk2.q_proj" / "blk2.fc": paths that end
/// with another layer's path.
std::shared_ptr<torch::nn::Module> nested_model() {
  auto model = std::make_shared<torch::nn::Module>();
  model->register_module("fc", LoRALinear(torch::nn::LinearOptions(4, 4)));
  model->register_module("q_proj", LoRALinear(torch::nn::LinearOptions(4, 4)));
  for (const char* name : {"blk", "blk2"}) {
    torch::nn::ModuleDict dict;
    dict->update(
        {{"fc", torch::nn::Linear(4, 4).ptr()},
         {"q_proj", torch::nn::Linear(4, 4).ptr()}});
    model->register_module(name, dict);
  }
  return model;
}

} // namespace

TEST_F(AdapterIoTest, PathsThatEndWithAnAdaptedPathGetAFullMatchRegex) {
  auto source = nested_model();
  torchlora::inject_lora(
      source,
      LoRAConfig(4)
          .init(LoRAInit::random)
          .target_modules({"fc"})
          .exclude_modules({"blk.fc", "blk2.fc"}));
  torchlora::save_adapter(source, dir);
  EXPECT_EQ(read_json(dir + "/adapter_config.json")["target_modules"], "fc");

  auto target = nested_model();
  torchlora::load_adapter(target, dir);
  const auto params = target->named_parameters();
  EXPECT_TRUE(torch::equal(
      params["fc.lora_B.default.weight"],
      source->named_parameters()["fc.lora_B.default.weight"]));
  EXPECT_EQ(params.find("blk.fc.lora_A.default.weight"), nullptr);
  EXPECT_EQ(params.find("blk2.fc.lora_A.default.weight"), nullptr);
}

TEST_F(AdapterIoTest, DifferingRanksAreAnchoredToTheirPaths) {
  // q_proj gets rank 2; blk.q_proj and blk2.q_proj, whose paths end with
  // it, keep rank 4.
  auto source = nested_model();
  torchlora::inject_lora(
      source,
      LoRAConfig(4)
          .init(LoRAInit::random)
          .target_modules({"q_proj"})
          .rank_pattern({{"^q_proj", 2}}));
  torchlora::save_adapter(source, dir);
  const auto config = read_json(dir + "/adapter_config.json");
  EXPECT_EQ(config["r"], 4);
  EXPECT_EQ(config["rank_pattern"], nlohmann::json({{"^q_proj", 2}}));
  EXPECT_EQ(
      config["target_modules"],
      nlohmann::json({"q_proj", "blk.q_proj", "blk2.q_proj"}));
  auto target = nested_model();
  torchlora::load_adapter(target, dir);
  const auto params = target->named_parameters();
  EXPECT_EQ(
      params["q_proj.lora_A.default.weight"].sizes(), (c10::IntArrayRef{2, 4}));
  EXPECT_EQ(
      params["blk.q_proj.lora_A.default.weight"].sizes(),
      (c10::IntArrayRef{4, 4}));
  EXPECT_EQ(
      params["blk2.q_proj.lora_A.default.weight"].sizes(),
      (c10::IntArrayRef{4, 4}));
}

TEST_F(AdapterIoTest, ModulesToSaveIncludeBuffersAndBiasesOfAllLoad) {
  struct NormedImpl : torch::nn::Module {
    NormedImpl() {
      fc = register_module("fc", LoRALinear(torch::nn::LinearOptions(6, 6)));
      norm = register_module("norm", torch::nn::BatchNorm1d(6));
      out = register_module("out", torch::nn::Linear(6, 2));
    }
    torch::Tensor forward(const torch::Tensor& x) {
      return out(norm(fc(x)));
    }
    LoRALinear fc{nullptr};
    torch::nn::BatchNorm1d norm{nullptr};
    torch::nn::Linear out{nullptr};
  };
  auto source = std::make_shared<NormedImpl>();
  const auto path = dir + ".base.pt";
  fs::create_directories(dir);
  torch::save(source, path);
  const auto config = LoRAConfig(2)
                          .init(LoRAInit::random)
                          .target_modules({"fc"})
                          .modules_to_save({"norm"})
                          .bias(torchlora::LoRABias::all);
  torchlora::inject_lora(source, config);
  source->forward(torch::randn({8, 6})); // updates the running statistics
  torchlora::save_adapter(source, dir, config);
  const auto keys =
      torchlora::safetensors::load(dir + "/adapter_model.safetensors").keys();
  const std::set<std::string> key_set(keys.begin(), keys.end());
  EXPECT_EQ(key_set.count("base_model.model.norm.running_mean"), 1u);
  EXPECT_EQ(key_set.count("base_model.model.norm.num_batches_tracked"), 1u);
  EXPECT_EQ(key_set.count("base_model.model.fc.base_layer.bias"), 1u);
  EXPECT_EQ(key_set.count("base_model.model.out.bias"), 1u);

  auto target = std::make_shared<NormedImpl>();
  torch::load(target, path);
  torchlora::load_adapter(target, dir);
  source->eval();
  target->eval();
  const auto x = torch::randn({3, 6});
  EXPECT_TRUE(torch::equal(target->forward(x), source->forward(x)));
}

TEST_F(AdapterIoTest, BiasesUnderThePlainKeyLoadToo) {
  auto pair = make_pair(dir + ".base.pt");
  const auto config = LoRAConfig(2)
                          .init(LoRAInit::random)
                          .target_modules({"v_proj"})
                          .bias(torchlora::LoRABias::lora_only);
  torchlora::inject_lora(pair.trained, config);
  torchlora::save_adapter(pair.trained, dir, config);
  const auto file = dir + "/adapter_model.safetensors";
  torchlora::safetensors::Tensors renamed;
  for (const auto& item : torchlora::safetensors::load(file)) {
    const bool bias = item.key() == "base_model.model.v_proj.base_layer.bias";
    renamed.insert(
        bias ? "base_model.model.v_proj.bias" : item.key(), item.value());
  }
  torchlora::safetensors::save(file, renamed, {{"format", "pt"}});
  torchlora::load_adapter(pair.fresh, dir);
  const auto x = torch::randn({2, 8});
  EXPECT_TRUE(torch::equal(pair.fresh(x), pair.trained(x)));
}

TEST_F(AdapterIoTest, InitsThatChangeTheBaseTorchloraLacksAreRefused) {
  Net source;
  torchlora::inject_lora(source, LoRAConfig(2).target_modules({"q_proj"}));
  torchlora::save_adapter(*source, dir);
  for (const char* init : {"corda", "loftq"}) {
    auto config = read_json(dir + "/adapter_config.json");
    config["init_lora_weights"] = init;
    write_json(dir + "/adapter_config.json", config);
    Net target;
    EXPECT_TORCHLORA_ERROR(
        torchlora::load_adapter(*target, dir),
        std::string("initialised with peft's \"") + init +
            "\", which changes the base weights");
  }
}

TEST_F(AdapterIoTest, EveryConfigFieldOfAWrongJsonTypeIsANamedError) {
  Net source;
  torchlora::inject_lora(source, LoRAConfig(2).target_modules({"q_proj"}));
  torchlora::save_adapter(*source, dir);
  const auto path = dir + "/adapter_config.json";
  const auto good = read_json(path);
  // One value of each JSON type; null means "not set" for every field.
  const std::vector<std::pair<std::string, nlohmann::json>> values = {
      {"boolean", true},
      {"integer", 3},
      {"float", 4.7},
      {"string", "0"},
      {"list", nlohmann::json::array({1})},
      {"object", nlohmann::json::object({{"a", 1}})},
  };
  // Field -> the kinds of value it takes.
  const std::vector<std::pair<std::string, std::set<std::string>>> fields = {
      {"r", {"integer"}},
      {"lora_alpha", {"integer", "float"}},
      {"lora_dropout", {"integer", "float"}},
      {"use_rslora", {"boolean"}},
      {"bias", {"string"}},
      {"init_lora_weights", {"boolean", "string"}},
      {"target_modules", {"string", "list-of-strings"}},
      {"exclude_modules", {"string", "list-of-strings"}},
      {"layers_to_transform", {"integer", "list"}},
      {"layers_pattern", {"string", "list-of-strings"}},
      {"modules_to_save", {"string", "list-of-strings"}},
      {"rank_pattern", {"object"}},
      {"alpha_pattern", {"object"}},
  };
  int refused = 0;
  for (const auto& [field, accepted] : fields) {
    for (const auto& [kind, value] : values) {
      if (accepted.count(kind) > 0) {
        continue;
      }
      auto config = good;
      config[field] = value;
      write_json(path, config);
      Net target;
      const auto before = snapshot(*target);
      try {
        torchlora::load_adapter(*target, dir);
        ADD_FAILURE() << field << " = " << value.dump() << " was accepted";
      } catch (const c10::Error& error) {
        const auto message = torchlora_test::message_of(error);
        EXPECT_EQ(message.rfind("torchlora: adapter_config.json: ", 0), 0u)
            << message;
        EXPECT_NE(message.find("\"" + field + "\""), std::string::npos)
            << message;
        EXPECT_NE(message.find(value.dump()), std::string::npos) << message;
        EXPECT_NE(message.find("(in '" + path + "')"), std::string::npos)
            << message;
        ++refused;
      } catch (const std::exception& error) {
        ADD_FAILURE() << field << " = " << value.dump()
                      << " let a non-torchlora exception out: " << error.what();
      }
      expect_unchanged(before, *target);
    }
  }
  EXPECT_GE(refused, 60);
}

TEST_F(AdapterIoTest, ConfigValuesOutOfRangeOrOfTheWrongKindAreErrors) {
  Net source;
  torchlora::inject_lora(source, LoRAConfig(2).target_modules({"q_proj"}));
  torchlora::save_adapter(*source, dir);
  const auto path = dir + "/adapter_config.json";
  const auto good = read_json(path);
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"r", 4.7}}, "\"r\" must be an integer, got 4.7"},
      {{{"r", 1e30}}, "\"r\" must be an integer, got 1e+30"},
      {{{"r", 18446744073709551615ull}},
       "\"r\" must fit in a 64-bit integer, got 18446744073709551615"},
      {{{"use_rslora", "yes"}},
       "\"use_rslora\" must be true or false, got \"yes\""},
      {{{"layers_to_transform", "0"}},
       "\"layers_to_transform\" must be an integer, got \"0\""},
      {{{"layers_to_transform", {0, 1.5}}},
       "\"layers_to_transform\" entry must be an integer, got 1.5"},
      {{{"bias", 3}}, "\"bias\" must be a string, got 3"},
      {{{"target_modules", {"q_proj", 3}}},
       "\"target_modules\" must be a list of strings, got [\"q_proj\",3]"},
      {{{"rank_pattern", {{"q_proj", 2.5}}}},
       "rank_pattern \"q_proj\" must be an integer, got 2.5"},
      {{{"alpha_pattern", {{"q_proj", "8"}}}},
       "alpha_pattern \"q_proj\" must be a number, got \"8\""},
      {{{"init_lora_weights", 1}},
       "\"init_lora_weights\" must be true, false or a string, got 1"},
      {{{"r", -3}}, "\"r\" must be > 0, got -3"},
      {{{"lora_alpha", -1}}, "\"lora_alpha\" must be > 0, got -1"},
      {{{"lora_dropout", 1.5}}, "\"lora_dropout\" must be in [0, 1), got 1.5"},
      {{{"rank_pattern", {{"q_proj", 0}}}},
       "rank_pattern \"q_proj\" must be > 0, got 0"},
      {{{"alpha_pattern", {{"q_proj", -2}}}},
       "alpha_pattern \"q_proj\" must be > 0, got -2"},
      {{{"target_modules", nlohmann::json::array()}},
       "\"target_modules\" is an empty list"},
      {{{"layers_to_transform", {1}}, {"layers_pattern", "("}},
       "layers_pattern is not a valid regex (ECMAScript syntax): \"(\""},
  };
  for (const auto& [change, text] : cases) {
    auto config = good;
    config.update(change);
    write_json(path, config);
    Net target;
    const auto before = snapshot(*target);
    EXPECT_TORCHLORA_ERROR(torchlora::load_adapter(*target, dir), text);
    expect_unchanged(before, *target);
  }
  // Null means "not set": peft's default.
  auto config = good;
  config["bias"] = nullptr;
  config["use_rslora"] = nullptr;
  write_json(path, config);
  Net target;
  torchlora::load_adapter(*target, dir);
  EXPECT_EQ(
      torchlora::adapter_names(*target), std::vector<std::string>{"default"});
}

TEST_F(AdapterIoTest, AMissingLoraAlphaIsPeftsDefaultAndANullOneIsAnError) {
  Net source;
  torchlora::inject_lora(
      source, LoRAConfig(2).alpha(3).target_modules({"q_proj"}));
  torchlora::save_adapter(*source, dir);
  const auto path = dir + "/adapter_config.json";
  const auto saved = read_json(path);
  ASSERT_EQ(saved["r"], 2);
  auto config = saved;
  config.erase("lora_alpha");
  write_json(path, config);
  {
    Net target;
    torchlora::load_adapter(*target, dir);
    // peft's LoraConfig default lora_alpha = 8, over the file's r = 2.
    EXPECT_EQ(target->q_proj->scaling("default"), 8.0 / 2);
  }
  for (const char* key : {"lora_alpha", "r"}) {
    auto with_null = saved;
    with_null[key] = nullptr;
    write_json(path, with_null);
    Net target;
    const auto before = snapshot(*target);
    EXPECT_TORCHLORA_ERROR(
        torchlora::load_adapter(*target, dir),
        std::string("\"") + key + "\" must be " +
            (std::string(key) == "r" ? "an integer" : "a number") +
            " > 0, got null, which peft cannot load either");
    expect_unchanged(before, *target);
    EXPECT_TRUE(torchlora::adapter_names(*target).empty());
  }
}

TEST_F(AdapterIoTest, PathsThatAreNotRegularFilesAreErrors) {
  Net source;
  torchlora::inject_lora(source, LoRAConfig(2).target_modules({"q_proj"}));
  torchlora::save_adapter(*source, dir);
  const auto tensors = dir + "/adapter_model.safetensors";
  fs::remove(tensors);
  fs::create_directory(tensors);
  Net target;
  const auto before = snapshot(*target);
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*target, dir),
      "cannot read safetensors file '" + tensors +
          "': it is a directory, not a regular file");
  expect_unchanged(before, *target);

  const auto config = dir + "/adapter_config.json";
  fs::remove(config);
  fs::create_directory(config);
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*target, dir),
      "cannot read JSON file '" + config +
          "': it is a directory, not a regular file");
  expect_unchanged(before, *target);
}

TEST_F(AdapterIoTest, AFileTensorWithAnEmptyKeyIsRefused) {
  torch::nn::Sequential model(torch::nn::Linear(4, 3));
  inject_lora(model, LoRAConfig(2).target_modules({"0"}));
  torchlora::save_adapter(*model, dir);
  const auto file = dir + "/adapter_model.safetensors";
  auto tensors = torchlora::safetensors::load(file);
  tensors.insert("", torch::zeros({1}));
  torchlora::safetensors::save(file, tensors);
  torch::nn::Sequential fresh(torch::nn::Linear(4, 3));
  const auto before = snapshot(*fresh);
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*fresh, dir),
      "load_adapter: the file's tensor \"\" (shape [1]) matches nothing in "
      "the model");
  expect_unchanged(before, *fresh);
  EXPECT_EQ(fresh[0]->as<torchlora::LoRALinearImpl>(), nullptr);
}

TEST_F(AdapterIoTest, LoadingIntoAMergedModelIsRefusedWithNothingChanged) {
  auto pair = make_pair(dir + "_base.pt");
  torchlora::inject_lora(
      pair.trained,
      LoRAConfig(2).target_modules({"q_proj"}).init(LoRAInit::random));
  torchlora::save_adapter(*pair.trained, dir);

  // The adapter exists and the layer is merged: copying into it would leave
  // the merged weight stale.
  torchlora::inject_lora(pair.fresh, LoRAConfig(2).target_modules({"q_proj"}));
  torchlora::merge(*pair.fresh);
  const auto before = snapshot(*pair.fresh);
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*pair.fresh, dir),
      "load_adapter: 'q_proj' is merged; unmerge the model first");
  expect_unchanged(before, *pair.fresh);
  EXPECT_TRUE(pair.fresh->q_proj->merged());

  // After unmerge it loads, and merging again gives the trained output.
  torchlora::unmerge(*pair.fresh);
  torchlora::load_adapter(*pair.fresh, dir);
  torchlora::merge(*pair.fresh);
  const auto x = torch::randn({3, 8});
  EXPECT_TRUE(torch::allclose(pair.fresh(x), pair.trained(x), 1e-5, 1e-6));
}

namespace {

/// model.layers.<i>.experts.<j>.fc: two numbered lists in one path.
struct ExpertImpl : torch::nn::Module {
  ExpertImpl() {
    fc = register_module("fc", LoRALinear(torch::nn::LinearOptions(4, 4)));
  }
  LoRALinear fc{nullptr};
};
struct MoeBlockImpl : torch::nn::Module {
  MoeBlockImpl() {
    experts = register_module("experts", torch::nn::ModuleList());
    for (int j = 0; j < 2; ++j) {
      experts->push_back(std::make_shared<ExpertImpl>());
    }
  }
  torch::nn::ModuleList experts{nullptr};
};
struct MoeImpl : torch::nn::Module {
  MoeImpl() {
    auto model =
        register_module("model", std::make_shared<torch::nn::Module>());
    layers = model->register_module("layers", torch::nn::ModuleList());
    for (int i = 0; i < 2; ++i) {
      layers->push_back(std::make_shared<MoeBlockImpl>());
    }
  }
  torch::nn::ModuleList layers{nullptr};
};

} // namespace

TEST_F(AdapterIoTest, LayersToTransformCountsTheLastNumberedListAsPeftDoes) {
  // peft's index of model.layers.1.experts.0.fc is 0, the expert's.
  const auto config =
      LoRAConfig(2).target_modules({"fc"}).layers_to_transform({0});
  MoeImpl model;
  EXPECT_EQ(
      torchlora::inject_lora(model, config),
      (std::vector<std::string>{
          "model.layers.0.experts.0.fc", "model.layers.1.experts.0.fc"}));

  // The same rule when the index comes from a peft adapter_config.json.
  torchlora::save_adapter(model, dir);
  auto json = read_json(dir + "/adapter_config.json");
  json["target_modules"] = {"fc"};
  json["layers_to_transform"] = {0};
  write_json(dir + "/adapter_config.json", json);
  MoeImpl fresh;
  torchlora::load_adapter(fresh, dir);
  std::vector<std::string> adapted;
  for (const auto& item : fresh.named_parameters()) {
    if (item.key().find("lora_A") != std::string::npos) {
      adapted.push_back(item.key());
    }
  }
  EXPECT_EQ(
      adapted,
      (std::vector<std::string>{
          "model.layers.0.experts.0.fc.lora_A.default.weight",
          "model.layers.1.experts.0.fc.lora_A.default.weight"}));
}

TEST_F(AdapterIoTest, DeepOrHugeConfigValuesGiveShortErrors) {
  Net source;
  torchlora::inject_lora(source, LoRAConfig(2).target_modules({"q_proj"}));
  torchlora::save_adapter(*source, dir);
  const auto path = dir + "/adapter_config.json";
  auto text = [&] {
    std::ifstream in(path);
    return std::string(
        std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }();
  // Nested 100,000 levels deep (200 KB): refused while parsing, before
  // anything recurses over it.
  const auto brace = text.find('{');
  const auto deep = text.substr(0, brace + 1) +
      "\"zzz\": " + std::string(100000, '[') + std::string(100000, ']') + ", " +
      text.substr(brace + 1);
  {
    std::ofstream out(path);
    out << deep;
  }
  Net target;
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*target, dir),
      "' nests JSON deeper than 32 levels; no adapter config does");
  // A huge value is shown cut short.
  nlohmann::json huge = nlohmann::json::object();
  huge["peft_type"] = "LORA";
  huge["target_modules"] = std::vector<int>(1000000, 1);
  write_json(path, huge);
  try {
    torchlora::load_adapter(*target, dir);
    ADD_FAILURE() << "a list of numbers was accepted as target_modules";
  } catch (const c10::Error& error) {
    const auto message = torchlora_test::message_of(error);
    EXPECT_NE(
        message.find("\"target_modules\" must be a list of strings, got "
                     "[1,1,1,"),
        std::string::npos)
        << message.substr(0, 200);
    EXPECT_LT(message.size(), 400u);
  }
}

} // namespace torchlora_adapter_io_test
