// torchlora::jit: LoRA on TorchScript modules made in Python
// (scripts/make-jit-fixtures.py wrote the fixtures in tests/data/jit).
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

// ---------------------------------------------------------------- fixtures

/// Calls `check(model, form, tensors, module, lora)` for every fixture
/// model in both forms: its reference tensors, the loaded module and a
/// ScriptLoRA with the reference file's config (adapters fresh).
template <typename Check>
void for_each_fixture(Check check) {
  for (const auto& model : fixture_models()) {
    const auto tensors = reference(model.name);
    for (const auto& form : forms()) {
      SCOPED_TRACE(model.name + " " + form);
      auto module = load_model(model.name, form);
      auto lora =
          torchlora::jit::inject_lora(module, fixture_config(model.targets));
      check(model, form, tensors, module, lora);
    }
  }
}

TEST(JitFixtures, FreshAdaptersKeepPythonsOutput) {
  for_each_fixture([](const auto& model,
                      const auto&,
                      const auto& tensors,
                      auto&,
                      auto& lora) {
    auto paths = lora.adapted_paths();
    for (const auto& target : model.targets) {
      EXPECT_NE(std::find(paths.begin(), paths.end(), target), paths.end())
          << target;
    }
    const torch::NoGradGuard no_grad;
    const auto y = lora.forward({tensors.at("input")}).toTensor();
    expect_close(y, tensors.at("output"), 1e-5, "fresh");
  });
}

TEST(JitFixtures, AdaptedOutputEqualsPythonsChangedWeights) {
  for_each_fixture([](const auto& model,
                      const auto&,
                      const auto& tensors,
                      auto& module,
                      auto& lora) {
    set_reference_adapters(lora, model, tensors);
    const auto y = lora.forward({tensors.at("input")}).toTensor();
    expect_close(y, tensors.at("adapted_output"), 1e-5, "adapted");
    // Merged, the module runs by itself and gives the same.
    lora.merge();
    const torch::NoGradGuard no_grad;
    const auto merged = module.forward({tensors.at("input")}).toTensor();
    expect_close(merged, tensors.at("adapted_output"), 1e-5, "merged");
  });
}

// Run by cmake/CheckJitPython.cmake, which sets TORCHLORA_JIT_MERGED: the
// fixtures adapted with the reference file's adapters and merged, for
// tests/jit/check_merged.py to run in Python without torchlora.
TEST(JitFixtures, WritesMergedModulesForPython_Optional) {
  const char* out = std::getenv("TORCHLORA_JIT_MERGED");
  if (out == nullptr) {
    GTEST_SKIP() << "run by cmake/CheckJitPython.cmake only";
  }
  std::filesystem::create_directories(out);
  for_each_fixture([&](const auto& model,
                       const auto& form,
                       const auto& tensors,
                       auto&,
                       auto& lora) {
    set_reference_adapters(lora, model, tensors);
    lora.merge_and_unload().save(
        std::string(out) + "/" + model.name + "_" + form + ".pt");
  });
}

// ---------------------------------------------------------------- float64

TEST(JitReference, ForwardAndGradientsMatchFloat64OverRandomSettings) {
  std::mt19937 random(7);
  int cases = 0;
  for (int trial = 0; trial < 24; ++trial) {
    const auto& model = fixture_models()[trial % fixture_models().size()];
    const auto& form = forms()[(trial / 4) % 2];
    const int64_t rank = 1 + static_cast<int64_t>(random() % 4);
    const double alpha = 0.5 + static_cast<double>(random() % 16);
    const bool rslora = random() % 2 == 0;
    const bool two_adapters = random() % 3 == 0;
    SCOPED_TRACE(
        model.name + " " + form + " r=" + std::to_string(rank) +
        " alpha=" + std::to_string(alpha) + (rslora ? " rslora" : "") +
        (two_adapters ? " two adapters" : ""));
    torch::manual_seed(trial);
    auto module = load_model(model.name, form);
    module.to(torch::kDouble);
    auto config = fixture_config(model.targets);
    config.rank(rank).alpha(alpha).use_rslora(rslora).init(
        torchlora::LoRAInit::random);
    torchlora::jit::ScriptLoRA lora(module);
    lora.inject(config);
    std::vector<std::pair<std::string, double>> adapters = {
        {"default",
         rslora ? alpha / std::sqrt(static_cast<double>(rank))
                : alpha / static_cast<double>(rank)}};
    if (two_adapters) {
      auto second = fixture_config(model.targets);
      second.rank(2).alpha(3).adapter_name("second").init(
          torchlora::LoRAInit::random);
      lora.inject(second);
      torchlora::set_adapter(
          lora.model(), std::vector<std::string>{"default", "second"});
      adapters.emplace_back("second", 1.5);
    }
    auto input = reference(model.name).at("input");
    if (input.is_floating_point()) {
      input = input.to(torch::kDouble);
    }
    auto ref = float64_reference(
        fixture(model.name + "_" + form + ".pt"),
        target_specs(lora),
        lora,
        adapters);
    const auto y = lora.forward({input}).toTensor();
    const auto y_ref = ref.forward({input}).toTensor();
    expect_close(y, y_ref, 1e-12, "forward");
    // First order.
    const auto weights = torch::randn_like(y_ref);
    std::vector<torch::Tensor> leaves;
    for (const auto& target : target_specs(lora)) {
      for (const auto& [adapter, scaling] : adapters) {
        leaves.push_back(adapter_matrix(lora, target.path, "A", adapter));
        leaves.push_back(adapter_matrix(lora, target.path, "B", adapter));
      }
    }
    const auto grads =
        torch::autograd::grad({(y * weights).sum()}, leaves, {}, true, true);
    const auto grads_ref = torch::autograd::grad(
        {(y_ref * weights).sum()}, ref.leaves, {}, true, true);
    ASSERT_EQ(grads.size(), grads_ref.size());
    for (size_t i = 0; i < grads.size(); ++i) {
      expect_close(grads[i], grads_ref[i], 1e-10, "grad " + std::to_string(i));
    }
    // Second order: the gradient of sum(v * dL/dA0) with respect to B0.
    const auto v = torch::randn_like(grads[0]);
    const auto second = torch::autograd::grad(
        {(grads[0] * v).sum()}, {leaves[1]}, {}, true, false, true);
    const auto second_ref = torch::autograd::grad(
        {(grads_ref[0] * v).sum()}, {ref.leaves[1]}, {}, true, false, true);
    if (second_ref[0].defined()) {
      ASSERT_TRUE(second[0].defined());
      expect_close(second[0], second_ref[0], 1e-10, "second order");
    }
    ++cases;
  }
  EXPECT_EQ(cases, 24);
}

// ---------------------------------------------------------------- training

TEST(Jit, GradientsStayEqualAfterTheExecutorOptimizes) {
  auto module = load_model("mlp", "scripted");
  module.train();
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(4)
          .alpha(8)
          .target_modules({"0", "2"})
          .init(torchlora::LoRAInit::random));
  const auto x = torch::randn({8, 6});
  std::vector<torch::Tensor> first;
  for (int call = 0; call < 8; ++call) {
    const auto loss = lora.forward({x}).toTensor().pow(2).sum();
    const auto grads = torch::autograd::grad({loss}, lora.parameters());
    if (call == 0) {
      first = grads;
      continue;
    }
    for (size_t i = 0; i < grads.size(); ++i) {
      // float32: the optimized graph may sum in another order (a run in
      // five differed from the first call's by more than 1e-7 absolute).
      EXPECT_TRUE(torch::allclose(grads[i], first[i], 1e-5, 1e-6))
          << "call " << call << " tensor " << i;
    }
  }
}

TEST(Jit, AdamStepsTrainTheAdaptersOnly) {
  auto module = load_model("typed", "traced");
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(4).alpha(8).target_modules({"proj", "out"}));
  const auto base = torchlora_test::base_tensors(lora.model());
  torch::optim::Adam optimizer(lora.parameters(), 1e-2);
  const auto x = torch::randn({32, 6});
  const auto target = torch::randn({32, 3});
  double first = 0;
  double last = 0;
  for (int step = 0; step < 60; ++step) {
    torchlora::jit::AdaptedWeights adapted(lora);
    const auto loss = torch::mse_loss(adapted.forward({x}).toTensor(), target);
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, 0.8 * first);
  // The base weights did not move.
  for (const auto& [name, values] :
       torchlora_test::base_tensors(lora.model())) {
    EXPECT_TRUE(torch::equal(values, base.at(name))) << name;
  }
  EXPECT_EQ(lora.parameters().size(), 4u);
}

TEST(Jit, OtherMethodsUseTheAdapters) {
  auto module = load_model("typed", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(2).target_modules({"proj"}).init(
          torchlora::LoRAInit::random));
  const auto x = torch::randn({3, 6});
  const torch::NoGradGuard no_grad;
  const auto plain = torch::jit::load(fixture("typed_scripted.pt"))
                         .run_method("features", x)
                         .toTensor();
  const auto adapted = lora.run_method("features", {x}).toTensor();
  EXPECT_FALSE(torch::allclose(adapted, plain));
  lora.merge();
  EXPECT_TRUE(torch::allclose(
      module.run_method("features", x).toTensor(), adapted, 1e-6, 1e-6));
}

// ---------------------------------------------------------------- merging

TEST(Jit, MergeUnmergeIsExactAndMergedModuleRunsAlone) {
  for (const auto& model : fixture_models()) {
    auto module = load_model(model.name, "scripted");
    auto lora = torchlora::jit::inject_lora(
        module,
        fixture_config(model.targets).init(torchlora::LoRAInit::random));
    const auto input = reference(model.name).at("input");
    const auto before = torchlora_test::base_tensors(lora.model());
    const torch::NoGradGuard no_grad;
    const auto adapted = lora.forward({input}).toTensor();
    lora.merge();
    EXPECT_TRUE(torch::equal(module.forward({input}).toTensor(), adapted))
        << model.name;
    lora.unmerge();
    for (const auto& [name, values] :
         torchlora_test::base_tensors(lora.model())) {
      EXPECT_TRUE(torch::equal(values, before.at(name))) << name;
    }
    EXPECT_TRUE(torch::equal(lora.forward({input}).toTensor(), adapted));
  }
}

TEST(Jit, MergeAndUnloadLeavesAModuleThatSavesAndLoads) {
  auto module = load_model("encoder", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(4)
          .target_modules({"self_attn", "linear1", "linear2"})
          .init(torchlora::LoRAInit::random));
  const auto input = reference("encoder").at("input");
  torch::Tensor adapted;
  {
    const torch::NoGradGuard no_grad;
    adapted = lora.forward({input}).toTensor();
  }
  auto merged = lora.merge_and_unload();
  EXPECT_TRUE(lora.adapted_paths().empty());
  const auto file = std::filesystem::temp_directory_path() /
      ("torchlora_jit_merged_" + std::to_string(::getpid()) + ".pt");
  merged.save(file.string());
  auto loaded = torch::jit::load(file.string());
  loaded.eval();
  std::filesystem::remove(file);
  const torch::NoGradGuard no_grad;
  expect_close(loaded.forward({input}).toTensor(), adapted, 1e-6, "reloaded");
  // Its keys are the plain model's.
  std::vector<std::string> names;
  for (const auto& parameter : loaded.named_parameters()) {
    names.push_back(parameter.name);
  }
  for (const auto& name : names) {
    EXPECT_EQ(name.find("lora"), std::string::npos) << name;
  }
  EXPECT_EQ(
      names.size(),
      torch::jit::load(fixture("encoder_scripted.pt"))
          .named_parameters()
          .size());
}

TEST(Jit, UnloadGivesTheLoadedModuleBack) {
  auto module = load_model("cnn", "traced");
  const auto input = reference("cnn").at("input");
  const torch::NoGradGuard no_grad;
  const auto plain = module.forward({input}).toTensor();
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(2)
          .target_modules({"emb", "conv1", "head"})
          .init(torchlora::LoRAInit::random));
  EXPECT_FALSE(torch::equal(lora.forward({input}).toTensor(), plain));
  lora.unload();
  EXPECT_TRUE(torch::equal(module.forward({input}).toTensor(), plain));
}

// ---------------------------------------------------------------- files

TEST(Jit, AdapterFilesUsePeftKeysAndLoadIntoTheOtherForm) {
  const auto dir = std::filesystem::temp_directory_path() /
      ("torchlora_jit_adapter_" + std::to_string(::getpid()));
  auto scripted = load_model("encoder", "scripted");
  const auto config = torchlora::LoRAConfig(4)
                          .alpha(8)
                          .target_modules({"self_attn", "linear2"})
                          .init(torchlora::LoRAInit::random);
  auto lora = torchlora::jit::inject_lora(scripted, config);
  lora.save_adapter(dir.string(), config);
  const auto tensors = torchlora::safetensors::load(
      (dir / "adapter_model.safetensors").string());
  EXPECT_TRUE(
      tensors.contains("base_model.model.layers.0.self_attn.lora_A.weight"));
  EXPECT_TRUE(
      tensors.contains("base_model.model.layers.1.linear2.lora_B.weight"));

  auto traced = load_model("encoder", "traced");
  auto loaded = torchlora::jit::load_adapter(traced, dir.string());
  EXPECT_EQ(loaded.adapted_paths(), lora.adapted_paths());
  const auto input = reference("encoder").at("input");
  const torch::NoGradGuard no_grad;
  expect_close(
      loaded.forward({input}).toTensor(),
      lora.forward({input}).toTensor(),
      1e-6,
      "loaded");
  std::filesystem::remove_all(dir);
}

TEST(Jit, LayerFilterAndConvolutionsOfEveryForm) {
  // layers_to_transform reads the layer index from the Python paths.
  auto encoder = load_model("encoder", "traced");
  auto lora = torchlora::jit::inject_lora(
      encoder,
      torchlora::LoRAConfig(2)
          .target_modules({"linear1"})
          .layers_to_transform({1}));
  EXPECT_EQ(lora.adapted_paths(), std::vector<std::string>{"layers.1.linear1"});

  const auto inputs = reference("odd");
  for (const auto& form : forms()) {
    SCOPED_TRACE(form);
    auto module = load_model("odd", form);
    module.to(torch::kDouble);
    // A grouped convolution, whose groups a traced layer keeps in its code.
    EXPECT_TORCHLORA_ERROR(
        torchlora::jit::inject_lora(
            module, torchlora::LoRAConfig(2).target_modules({"grouped"})),
        "'grouped', a torch.nn.modules.conv.Conv1d with groups = 2 (a LoRA "
        "adapter joins channels across groups");
    auto odd = torchlora::jit::inject_lora(
        module,
        torchlora::LoRAConfig(2)
            .alpha(2)
            .target_modules({"volume"})
            .init(torchlora::LoRAInit::random));
    ASSERT_NE(
        odd.model().named_children()["volume"]->as<torchlora::LoRAConv3dImpl>(),
        nullptr);
    const std::vector<c10::IValue> args = {
        inputs.at("tokens"),
        inputs.at("memory").to(torch::kDouble),
        inputs.at("volume").to(torch::kDouble)};
    const torch::NoGradGuard no_grad;
    // Merged and unmerged agree.
    const auto adapted = odd.forward(args).toTensor();
    odd.merge();
    EXPECT_TRUE(torch::equal(module.forward(args).toTensor(), adapted));
    odd.unmerge();
    // The Conv3d against float64, W + s B A from plain ops.
    auto ref = float64_reference(
        fixture("odd_" + form + ".pt"),
        {{"volume", "weight", false}},
        odd,
        {{"default", 1.0}});
    expect_close(
        odd.forward(args).toTensor(),
        ref.forward(args).toTensor(),
        1e-12,
        "conv3d");
  }
}

TEST(Jit, WhenTheLastHandleGoesTheModuleGetsItsWeightsBack) {
  auto module = load_model("mlp", "traced");
  const auto x = torch::randn({3, 6});
  const torch::NoGradGuard no_grad;
  const auto plain = module.forward({x}).toTensor();
  torch::Tensor merged;
  {
    auto lora = torchlora::jit::inject_lora(
        module, fixture_config({"0", "4"}).init(torchlora::LoRAInit::random));
    const auto copy = lora; // a handle: the adapters are shared
    EXPECT_EQ(copy.adapted_paths().size(), 2u);
  }
  // Unmerged adapters go with the handle: the base weights are back.
  EXPECT_TRUE(torch::equal(module.forward({x}).toTensor(), plain));
  {
    auto lora = torchlora::jit::inject_lora(
        module, fixture_config({"2"}).init(torchlora::LoRAInit::random));
    lora.merge();
    merged = module.forward({x}).toTensor();
    EXPECT_FALSE(torch::equal(merged, plain));
  }
  // Merged ones stay merged.
  EXPECT_TRUE(torch::equal(module.forward({x}).toTensor(), merged));
  std::stringstream saved;
  EXPECT_NO_THROW(module.save(saved));
}

TEST(Jit, TracedLayersWithoutBiasAndAnAdapterDeletedPastTheHandle) {
  const auto inputs = reference("odd");
  for (const auto& form : forms()) {
    SCOPED_TRACE(form);
    auto module = load_model("odd", form);
    auto lora = torchlora::jit::inject_lora(
        module,
        torchlora::LoRAConfig(2)
            .target_modules({"nobias"})
            .init(torchlora::LoRAInit::random));
    const std::vector<c10::IValue> args = {
        inputs.at("tokens"), inputs.at("memory"), inputs.at("volume")};
    const torch::NoGradGuard no_grad;
    const auto adapted = lora.forward(args).toTensor();
    lora.merge();
    EXPECT_TRUE(torch::equal(module.forward(args).toTensor(), adapted));
    // An unmerge past the handle leaves the module merged, never the base
    // weights in silence.
    torchlora::unmerge(lora.model());
    EXPECT_TRUE(torch::equal(module.forward(args).toTensor(), adapted));
    // With its only adapter deleted, the layer is no longer adapted.
    torchlora::delete_adapter(lora.model(), "default");
    EXPECT_TRUE(lora.adapted_paths().empty());
    EXPECT_NO_THROW(module.forward(args));
  }
}

TEST(Jit, EachAdaptedWeightsUsesItsOwnWeights) {
  auto module = load_model("typed", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(2).target_modules({"proj"}).init(
          torchlora::LoRAInit::random));
  const auto x = torch::randn({3, 6});
  torchlora::jit::AdaptedWeights training(lora);
  std::optional<torchlora::jit::AdaptedWeights> serving;
  {
    const torch::NoGradGuard no_grad;
    serving.emplace(lora);
  }
  const auto y = training.forward({x}).toTensor();
  EXPECT_TRUE(y.requires_grad());
  const auto z = serving->forward({x}).toTensor();
  EXPECT_FALSE(z.requires_grad());
  EXPECT_TRUE(torch::allclose(y.detach(), z));
  EXPECT_NO_THROW(y.sum().backward());
  // From threads: each call trains or serves as its own scope says.
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        if (t == 0) {
          torchlora::jit::AdaptedWeights step(lora);
          wrong += step.forward({x}).toTensor().requires_grad() ? 0 : 1;
        } else {
          const torch::NoGradGuard no_grad;
          wrong += lora.forward({x}).toTensor().requires_grad() ? 1 : 0;
        }
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  EXPECT_EQ(wrong.load(), 0);
}

TEST(Jit, ConvertsThroughTheHandleAndRefusesAConversionPastIt) {
  auto module = load_model("mlp", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module, fixture_config({"2"}).init(torchlora::LoRAInit::random));
  lora.to(torch::kDouble);
  const auto x = torch::randn({3, 6}, torch::kDouble);
  const auto y = lora.forward({x}).toTensor();
  EXPECT_EQ(y.scalar_type(), torch::kDouble);
  for (const auto& parameter : lora.parameters()) {
    EXPECT_EQ(parameter.scalar_type(), torch::kDouble);
  }
  // Merged, the module's own to() runs; the next call through the handle
  // says what happened.
  lora.merge();
  module.to(torch::kFloat);
  EXPECT_TORCHLORA_ERROR(
      lora.unmerge(),
      "of the TorchScript module was converted behind torchlora's back (to "
      "float on cpu, from double on cpu: the module's own to())");
}

/// The adapters real peft wrote for the models of the interop check
/// (tests/data/peft-<version>/<case>), loaded into TorchScript twins of
/// those models (scripts/make-jit-fixtures.py) given the same base weights:
/// the outputs are peft's, and what torchlora saves again has peft's keys.
TEST(JitPeftFiles, AdaptersPeftMadeLoadIntoTorchScriptTwins) {
  struct PeftCase {
    std::string name;
    std::string model;
    std::vector<std::string> inputs;
    std::vector<std::string> adapters;
  };
  const std::vector<PeftCase> cases = {
      {"mixed", "tinynet", {"x", "tokens", "image"}, {"default"}},
      {"regex_targets", "mlp12", {"x"}, {"default"}},
      {"bias_lora_only", "mlp12", {"x"}, {"default"}},
      {"two_adapters", "mlp12", {"x"}, {"default", "fr"}},
      {"conv1d", "convnet1d", {"signal"}, {"default"}},
      {"encoder_layer", "encoder16", {"x"}, {"default"}},
      {"decoder_layer", "decoder16", {"x", "memory"}, {"default"}},
      {"paths_and_anchored_patterns", "stack", {"x"}, {"default"}},
  };
  int checked = 0;
  for (const auto& test : cases) {
    const auto folder =
        std::string(TORCHLORA_TEST_DATA_DIR) + "/peft-0.15.2/" + test.name;
    const auto base =
        torchlora::safetensors::load(folder + "/base.safetensors");
    const auto inputs =
        torchlora::safetensors::load(folder + "/input.safetensors");
    const auto peft =
        torchlora::safetensors::load(folder + "/peft_output.safetensors");
    std::vector<c10::IValue> args;
    for (const auto& name : test.inputs) {
      args.emplace_back(inputs[name]);
    }
    const auto twin = [&](const std::string& form) {
      auto module = load_model("peft_" + test.model, form);
      module.to(torch::kDouble);
      const torch::NoGradGuard no_grad;
      for (const auto& parameter : module.named_parameters()) {
        parameter.value.copy_(base[parameter.name]);
      }
      return module;
    };
    for (const auto& form : forms()) {
      SCOPED_TRACE(test.name + " " + form);
      ::testing::internal::CaptureStderr(); // bias_lora_only warns
      auto module = twin(form);
      auto lora = torchlora::jit::load_adapter(
          module, folder + "/peft_adapter", test.adapters.front());
      for (size_t i = 1; i < test.adapters.size(); ++i) {
        lora.load_adapter(folder + "/peft_adapter", test.adapters[i]);
      }
      ::testing::internal::GetCapturedStderr();
      const auto dir = std::filesystem::temp_directory_path() /
          ("torchlora_jit_peft_" + std::to_string(::getpid()));
      for (const auto& adapter : test.adapters) {
        torchlora::set_adapter(lora.model(), adapter);
        const torch::NoGradGuard no_grad;
        const auto y = lora.forward(args).toTensor();
        expect_close(y, peft["y_" + adapter], 1e-12, adapter);
        ++checked;
        // Saved again: peft's keys, and the same outputs once reloaded.
        ::testing::internal::CaptureStderr();
        lora.save_adapter(
            dir.string(),
            torchlora::SaveAdapterOptions().adapter_name(adapter));
        auto again =
            torchlora::jit::load_adapter(twin(form), dir.string(), adapter);
        ::testing::internal::GetCapturedStderr();
        const auto sub = adapter == "default" ? std::string() : "/" + adapter;
        const auto theirs = torchlora::safetensors::load(
            folder + "/peft_adapter" + sub + "/adapter_model.safetensors");
        const auto ours = torchlora::safetensors::load(
            dir.string() + sub + "/adapter_model.safetensors");
        const auto sorted = [](std::vector<std::string> keys) {
          std::sort(keys.begin(), keys.end());
          return keys;
        };
        EXPECT_EQ(sorted(ours.keys()), sorted(theirs.keys()));
        expect_close(again.forward(args).toTensor(), y, 1e-12, "saved again");
        std::filesystem::remove_all(dir);
      }
    }
  }
  EXPECT_EQ(checked, 18);
  // The one case a TorchScript module cannot take.
  auto module = load_model("peft_mlp12", "scripted");
  EXPECT_TORCHLORA_ERROR(
      torchlora::jit::load_adapter(
          module,
          std::string(TORCHLORA_TEST_DATA_DIR) +
              "/peft-0.15.2/rslora_bias_all_modules_to_save/peft_adapter"),
      "has modules_to_save (1), which a TorchScript module cannot use");
}

TEST(Jit, MovesToTheGpu_CUDA) {
  SKIP_WITHOUT_CUDA();
  auto module = load_model("typed", "scripted");
  auto lora = torchlora::jit::inject_lora(
      module,
      torchlora::LoRAConfig(2)
          .target_modules({"proj", "gate"})
          .init(torchlora::LoRAInit::random));
  const auto x = torch::randn({4, 6});
  torch::Tensor on_cpu;
  {
    const torch::NoGradGuard no_grad;
    on_cpu = lora.forward({x}).toTensor();
  }
  lora.to(torch::kCUDA);
  const auto y = lora.forward({x.cuda()}).toTensor();
  EXPECT_TRUE(y.is_cuda());
  EXPECT_TRUE(torch::allclose(y.cpu(), on_cpu, 1e-5, 1e-5));
  y.sum().backward();
  for (const auto& parameter : lora.parameters()) {
    EXPECT_TRUE(parameter.is_cuda());
    EXPECT_TRUE(parameter.grad().defined());
  }
}

} // namespace
