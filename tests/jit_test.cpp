// torchlora::jit: LoRA on TorchScript modules made in Python
// (scripts/make-jit-fixtures.py wrote the fixtures in tests/data/jit).
#include <torchlora/jit.h>

#include "test_support.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using torchlora_test::message_of;

/// Expects `statement` to throw an error (TorchScript's interpreter wraps
/// the errors of the operators it runs) whose text holds a torchlora:
/// message containing `text`.
#define EXPECT_SCRIPT_ERROR(statement, text)                                \
  do {                                                                      \
    try {                                                                   \
      statement;                                                            \
      ADD_FAILURE() << "expected an error containing: " << (text);          \
    } catch (const std::exception& error) {                                 \
      const std::string message = error.what();                             \
      EXPECT_NE(message.find("torchlora: "), std::string::npos) << message; \
      EXPECT_NE(message.find(text), std::string::npos) << message;          \
    }                                                                       \
  } while (false)

/// A fixture file: the committed ones, or those in $TORCHLORA_JIT_FIXTURES
/// (made anew by cmake/CheckJitPython.cmake with this machine's PyTorch).
std::string fixture(const std::string& name) {
  const char* fresh = std::getenv("TORCHLORA_JIT_FIXTURES");
  return (fresh != nullptr ? std::string(fresh)
                           : std::string(TORCHLORA_TEST_DATA_DIR) + "/jit") +
      "/" + name;
}

/// The tensors of a fixture's reference file, by name.
std::map<std::string, torch::Tensor> reference(const std::string& model) {
  auto holder = torch::jit::load(fixture(model + "_reference.pt"));
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& buffer : holder.named_buffers(/*recurse=*/false)) {
    tensors[buffer.name] = buffer.value;
  }
  return tensors;
}

/// A fixture model: its adapted layers and which attribute of each the
/// reference file's A<i>/B<i> belong to.
struct FixtureModel {
  std::string name;
  std::vector<std::string> targets;
};

const std::vector<FixtureModel>& fixture_models() {
  static const std::vector<FixtureModel> models = {
      {"mlp", {"0", "2", "4"}},
      {"typed", {"proj", "gate"}},
      {"encoder", {"layers.0.self_attn", "layers.1.linear1"}},
      {"cnn", {"emb", "conv1", "conv2"}},
  };
  return models;
}

const std::vector<std::string>& forms() {
  static const std::vector<std::string> names = {"scripted", "traced"};
  return names;
}

torch::jit::Module load_model(
    const std::string& name,
    const std::string& form) {
  auto module = torch::jit::load(fixture(name + "_" + form + ".pt"));
  module.eval();
  return module;
}

/// The config of the reference file's adapters: rank 2, scaling 2.
torchlora::LoRAConfig fixture_config(const std::vector<std::string>& targets) {
  std::vector<std::string> regexes;
  std::string regex;
  for (const auto& target : targets) {
    regex += (regex.empty() ? "" : "|") + std::string("^") + target + "$";
  }
  // Exact paths: the name "0" would also match "layers.0".
  return torchlora::LoRAConfig(2).alpha(4).target_regex(regex);
}

/// The adapter tensors ("A"/"B") of adapter `adapter` at `path` of the
/// ScriptLoRA's model.
torch::Tensor adapter_matrix(
    const torchlora::jit::ScriptLoRA& lora,
    const std::string& path,
    const std::string& matrix,
    const std::string& adapter = "default") {
  const auto parameters = lora.model().named_parameters();
  for (const auto& prefix : {"lora_", "lora_embedding_"}) {
    for (const auto& suffix : {".weight", ""}) {
      const auto key = path + "." + prefix + matrix + "." + adapter + suffix;
      if (parameters.contains(key)) {
        return parameters[key];
      }
    }
  }
  ADD_FAILURE() << "no " << matrix << " at " << path;
  return torch::Tensor();
}

/// Copies the reference file's A<i>/B<i> into the adapters.
void set_reference_adapters(
    torchlora::jit::ScriptLoRA& lora,
    const FixtureModel& model,
    const std::map<std::string, torch::Tensor>& tensors) {
  const torch::NoGradGuard no_grad;
  for (size_t i = 0; i < model.targets.size(); ++i) {
    for (const auto* matrix : {"A", "B"}) {
      auto target = adapter_matrix(lora, model.targets[i], matrix);
      const auto& values = tensors.at(matrix + std::to_string(i));
      target.copy_(values.reshape(target.sizes()));
    }
  }
}

void expect_close(
    const torch::Tensor& actual,
    const torch::Tensor& expected,
    double tolerance,
    const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const auto scale = expected.abs().max().item<double>() + 1e-12;
  const auto error = (actual.to(torch::kDouble) - expected.to(torch::kDouble))
                         .abs()
                         .max()
                         .item<double>();
  EXPECT_LE(error / scale, tolerance) << what;
}

// ---------------------------------------------------------------- fixtures

TEST(JitFixtures, FreshAdaptersKeepPythonsOutput) {
  for (const auto& model : fixture_models()) {
    const auto tensors = reference(model.name);
    for (const auto& form : forms()) {
      auto module = load_model(model.name, form);
      auto lora =
          torchlora::jit::inject_lora(module, fixture_config(model.targets));
      auto paths = lora.adapted_paths();
      for (const auto& target : model.targets) {
        EXPECT_NE(std::find(paths.begin(), paths.end(), target), paths.end())
            << model.name << " " << form << " " << target;
      }
      const torch::NoGradGuard no_grad;
      const auto y = lora.forward({tensors.at("input")}).toTensor();
      expect_close(y, tensors.at("output"), 1e-5, model.name + " " + form);
    }
  }
}

TEST(JitFixtures, AdaptedOutputEqualsPythonsChangedWeights) {
  for (const auto& model : fixture_models()) {
    const auto tensors = reference(model.name);
    for (const auto& form : forms()) {
      auto module = load_model(model.name, form);
      auto lora =
          torchlora::jit::inject_lora(module, fixture_config(model.targets));
      set_reference_adapters(lora, model, tensors);
      const auto y = lora.forward({tensors.at("input")}).toTensor();
      expect_close(
          y, tensors.at("adapted_output"), 1e-5, model.name + " " + form);
      // Merged, the module runs by itself and gives the same.
      lora.merge();
      const torch::NoGradGuard no_grad;
      const auto merged = module.forward({tensors.at("input")}).toTensor();
      expect_close(
          merged,
          tensors.at("adapted_output"),
          1e-5,
          model.name + " " + form + " merged");
    }
  }
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
  for (const auto& model : fixture_models()) {
    const auto tensors = reference(model.name);
    for (const auto& form : forms()) {
      auto module = load_model(model.name, form);
      auto lora =
          torchlora::jit::inject_lora(module, fixture_config(model.targets));
      set_reference_adapters(lora, model, tensors);
      lora.merge_and_unload().save(
          std::string(out) + "/" + model.name + "_" + form + ".pt");
    }
  }
}

// ---------------------------------------------------------------- float64

/// The float64 reference of a ScriptLoRA's forward: a fresh copy of the
/// module whose adapted attributes are set to W + sum s B A computed with
/// plain ops from leaf copies of the adapters, so that autograd through
/// those ops gives the reference gradients of A and B.
struct Float64Reference {
  torch::jit::Module module;
  std::vector<torch::Tensor> leaves; // A, B of each target, in order

  c10::IValue forward(const std::vector<c10::IValue>& inputs) {
    return module.forward(inputs);
  }
};

struct TargetSpec {
  std::string path;
  std::string attribute;
  bool embedding;
};

/// The module at `path` of a TorchScript module.
torch::jit::Module submodule(
    torch::jit::Module module,
    const std::string& path) {
  size_t start = 0;
  while (true) {
    const auto dot = path.find('.', start);
    module = module.attr(path.substr(start, dot - start)).toModule();
    if (dot == std::string::npos) {
      return module;
    }
    start = dot + 1;
  }
}

Float64Reference float64_reference(
    const std::string& file,
    const std::vector<TargetSpec>& targets,
    const torchlora::jit::ScriptLoRA& lora,
    const std::vector<std::pair<std::string, double>>& adapters) {
  Float64Reference reference{torch::jit::load(file), {}};
  reference.module.eval();
  reference.module.to(torch::kDouble);
  for (const auto& target : targets) {
    auto owner = submodule(reference.module, target.path);
    auto weight = owner.attr(target.attribute).toTensor().detach();
    for (const auto& [adapter, scaling] : adapters) {
      const auto A = adapter_matrix(lora, target.path, "A", adapter)
                         .detach()
                         .clone()
                         .requires_grad_(true);
      const auto B = adapter_matrix(lora, target.path, "B", adapter)
                         .detach()
                         .clone()
                         .requires_grad_(true);
      reference.leaves.push_back(A);
      reference.leaves.push_back(B);
      const auto product = B.flatten(1).mm(A.flatten(1)) * scaling;
      weight = weight +
          (target.embedding ? product.t() : product.reshape(weight.sizes()));
    }
    owner.setattr(target.attribute, weight);
  }
  return reference;
}

/// The adapted attributes of the layers at `paths` of `module`.
std::vector<TargetSpec> target_specs_of(
    const torch::jit::Module& module,
    const std::vector<std::string>& paths) {
  using torchlora::jit::detail::ScriptKind;
  std::vector<TargetSpec> specs;
  for (const auto& path : paths) {
    const auto kind =
        torchlora::jit::detail::script_kind(submodule(module, path));
    specs.push_back(
        {path,
         kind == ScriptKind::attention ? "in_proj_weight" : "weight",
         kind == ScriptKind::embedding});
  }
  return specs;
}

/// The adapted attributes of `lora` (an attention's out_proj included).
std::vector<TargetSpec> target_specs(const torchlora::jit::ScriptLoRA& lora) {
  return target_specs_of(lora.module(), lora.adapted_paths());
}

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

// ---------------------------------------------------------------- sequences

/// The float64 model of a ScriptLoRA's state for the stateful test: the
/// adapters (their values kept here, updated by the test's own steps), which
/// are active, their scales, and whether the adapters are merged.
struct ScriptWorld {
  struct Adapter {
    double scaling = 1;
    double scale = 1;
    bool active = true;
    std::map<std::string, std::pair<torch::Tensor, torch::Tensor>> matrices;
  };
  std::vector<TargetSpec> specs; // every adaptable target of the model
  std::map<std::string, Adapter> adapters;
  bool merged = false;

  /// A fresh float64 copy of the module whose adapted attributes hold
  /// W + sum scale s B A of the active adapters (from leaves, for
  /// gradients); `leaves` gets (adapter, path, A, B) of each.
  torch::jit::Module module(
      const std::string& file,
      bool with_adapters,
      std::vector<
          std::tuple<std::string, std::string, torch::Tensor, torch::Tensor>>*
          leaves) const {
    auto copy = torch::jit::load(file);
    copy.eval();
    copy.to(torch::kDouble);
    for (const auto& spec : specs) {
      auto owner = submodule(copy, spec.path);
      auto weight = owner.attr(spec.attribute).toTensor().detach();
      for (const auto& [name, adapter] : adapters) {
        const auto found = adapter.matrices.find(spec.path);
        if (!with_adapters || !adapter.active ||
            found == adapter.matrices.end()) {
          continue;
        }
        const auto A = found->second.first.clone().requires_grad_(true);
        const auto B = found->second.second.clone().requires_grad_(true);
        if (leaves != nullptr) {
          leaves->emplace_back(name, spec.path, A, B);
        }
        const auto product =
            B.flatten(1).mm(A.flatten(1)) * (adapter.scaling * adapter.scale);
        weight = weight +
            (spec.embedding ? product.t() : product.reshape(weight.sizes()));
      }
      owner.setattr(spec.attribute, weight);
    }
    return copy;
  }
};

TEST(JitSequences, RandomOperationSequencesMatchAFloat64Model) {
  const std::vector<std::string> names = {"a", "b", "c"};
  int checks = 0;
  int refusals = 0;
  for (int sequence = 0; sequence < 12; ++sequence) {
    const auto& model = fixture_models()[sequence % 2 == 0 ? 0 : 3]; // mlp, cnn
    const auto& form = forms()[(sequence / 2) % 2];
    const auto file = fixture(model.name + "_" + form + ".pt");
    std::mt19937 random(100 + sequence);
    torch::manual_seed(sequence);
    auto module = load_model(model.name, form);
    module.to(torch::kDouble);
    torchlora::jit::ScriptLoRA lora(module);
    ScriptWorld world;
    auto input = reference(model.name).at("input");
    if (input.is_floating_point()) {
      input = input.to(torch::kDouble);
    }
    const auto apply_active = [&] {
      std::vector<std::string> active;
      for (const auto& [name, adapter] : world.adapters) {
        if (adapter.active) {
          active.push_back(name);
        }
      }
      torchlora::set_adapter(lora.model(), active);
    };
    std::string trace;
    for (int step = 0; step < 30; ++step) {
      const int op = static_cast<int>(random() % 10);
      trace += std::to_string(op) + (world.merged ? "m " : " ");
      SCOPED_TRACE(model.name + " " + form + " ops: " + trace);
      const auto pick = [&]() -> std::string {
        if (world.adapters.empty()) {
          return std::string();
        }
        auto it = world.adapters.begin();
        std::advance(it, static_cast<long>(random() % world.adapters.size()));
        return it->first;
      };
      try {
        if (op == 0 || world.adapters.empty()) { // inject an adapter
          std::string name;
          for (const auto& candidate : names) {
            if (!world.adapters.count(candidate)) {
              name = candidate;
              break;
            }
          }
          if (name.empty() || world.merged) {
            continue;
          }
          std::vector<std::string> chosen;
          for (const auto& target : model.targets) {
            if (random() % 2 == 0 || chosen.empty()) {
              chosen.push_back(target);
            }
          }
          const int64_t rank = 1 + static_cast<int64_t>(random() % 3);
          const double alpha = 1.0 + static_cast<double>(random() % 8);
          lora.inject(fixture_config(chosen)
                          .rank(rank)
                          .alpha(alpha)
                          .adapter_name(name)
                          .init(torchlora::LoRAInit::random));
          ScriptWorld::Adapter adapter;
          adapter.scaling = alpha / static_cast<double>(rank);
          for (const auto& path : chosen) {
            adapter.matrices[path] = {
                adapter_matrix(lora, path, "A", name).detach().clone(),
                adapter_matrix(lora, path, "B", name).detach().clone()};
          }
          world.adapters[name] = adapter;
          apply_active();
          if (world.specs.empty()) {
            for (const auto& spec : target_specs_of(module, model.targets)) {
              world.specs.push_back(spec);
            }
          }
        } else if (op == 1) { // new values (not while merged: the
                              // merged weight would be stale)
          if (world.merged) {
            continue;
          }
          const auto name = pick();
          const torch::NoGradGuard no_grad;
          for (auto& [path, matrices] : world.adapters[name].matrices) {
            matrices.first = torch::randn_like(matrices.first) * 0.3;
            matrices.second = torch::randn_like(matrices.second) * 0.3;
            adapter_matrix(lora, path, "A", name).copy_(matrices.first);
            adapter_matrix(lora, path, "B", name).copy_(matrices.second);
          }
        } else if (op == 2) { // which are active
          const auto before = world.adapters;
          for (auto& [name, adapter] : world.adapters) {
            adapter.active = random() % 2 == 0;
          }
          try {
            apply_active();
          } catch (const c10::Error&) {
            world.adapters = before;
            throw;
          }
        } else if (op == 3) { // scale
          const auto name = pick();
          const double scale = 0.25 * static_cast<double>(random() % 9);
          torchlora::set_scale(lora.model(), name, scale);
          world.adapters[name].scale = scale;
        } else if (op == 4) {
          lora.merge();
          world.merged = true;
        } else if (op == 5) {
          lora.unmerge();
          world.merged = false;
        } else if (op == 6) { // a training step, checked against float64
          std::vector<
              std::
                  tuple<std::string, std::string, torch::Tensor, torch::Tensor>>
              leaves;
          auto ref = world.module(file, true, &leaves);
          torchlora::jit::AdaptedWeights adapted(lora);
          const auto y = adapted.forward({input}).toTensor();
          const auto y_ref = ref.forward({input}).toTensor();
          expect_close(y, y_ref, 1e-12, "step forward");
          if (world.merged || leaves.empty()) {
            continue;
          }
          const auto weights = torch::randn_like(y_ref);
          std::vector<torch::Tensor> mine;
          std::vector<torch::Tensor> theirs;
          for (const auto& [name, path, A, B] : leaves) {
            mine.push_back(adapter_matrix(lora, path, "A", name));
            mine.push_back(adapter_matrix(lora, path, "B", name));
            theirs.push_back(A);
            theirs.push_back(B);
          }
          const auto grads = torch::autograd::grad({(y * weights).sum()}, mine);
          const auto grads_ref =
              torch::autograd::grad({(y_ref * weights).sum()}, theirs);
          const torch::NoGradGuard no_grad;
          for (size_t i = 0; i < grads.size(); ++i) {
            expect_close(grads[i], grads_ref[i], 1e-10, "step gradient");
            mine[i].sub_(grads[i] * 0.05);
            const auto& [name, path, A, B] = leaves[i / 2];
            auto& matrices = world.adapters[name].matrices[path];
            auto& kept = i % 2 == 0 ? matrices.first : matrices.second;
            kept = kept - grads_ref[i] * 0.05;
          }
          ++checks;
        } else if (op == 7) { // with the adapters disabled: the base model
          torchlora::DisableAdapters disabled(lora.model());
          const torch::NoGradGuard no_grad;
          expect_close(
              lora.forward({input}).toTensor(),
              world.module(file, false, nullptr).forward({input}).toTensor(),
              1e-12,
              "disabled");
        } else if (op == 8) { // through peft's files and back
          const auto name = pick();
          const auto dir = std::filesystem::temp_directory_path() /
              ("torchlora_jit_seq_" + std::to_string(::getpid()));
          lora.save_adapter(
              dir.string(), torchlora::SaveAdapterOptions().adapter_name(name));
          torchlora::delete_adapter(lora.model(), name);
          lora.load_adapter(dir.string(), name);
          std::filesystem::remove_all(dir);
          world.adapters[name].scale = 1; // scales are not in the file
          apply_active();
        } else { // delete one
          const auto name = pick();
          torchlora::delete_adapter(lora.model(), name);
          world.adapters.erase(name);
        }
      } catch (const c10::Error& error) {
        // A state the operation cannot honour (merged): refused, and the
        // check below shows nothing changed.
        const auto message = message_of(error);
        ASSERT_EQ(message.rfind("torchlora:", 0), 0u) << message;
        ++refusals;
      }
      // After every operation: the forward through torchlora, and the
      // module by itself (merged: the merged weights; else refused).
      const torch::NoGradGuard no_grad;
      const auto expected =
          world.module(file, true, nullptr).forward({input}).toTensor();
      expect_close(
          lora.forward({input}).toTensor(), expected, 1e-12, "forward");
      if (world.merged) {
        expect_close(
            module.forward({input}).toTensor(), expected, 1e-12, "merged");
      } else if (!world.adapters.empty()) {
        EXPECT_SCRIPT_ERROR(module.forward({input}), "base weight plus LoRA");
      }
      ++checks;
    }
    // The end of every sequence: a plain module, with the merged weights
    // or (every third sequence) as loaded.
    const torch::NoGradGuard no_grad;
    const bool keep = sequence % 3 != 0;
    const auto expected =
        world.module(file, keep, nullptr).forward({input}).toTensor();
    if (keep) {
      lora.merge_and_unload();
    } else {
      if (world.merged) {
        lora.unmerge();
      }
      lora.unload();
    }
    expect_close(
        module.forward({input}).toTensor(), expected, 1e-12, "unloaded");
    std::stringstream saved;
    EXPECT_NO_THROW(module.save(saved));
  }
  RecordProperty("checks", checks);
  RecordProperty("refusals", refusals);
  EXPECT_GT(checks, 300);
  EXPECT_GT(refusals, 0);
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
      EXPECT_TRUE(torch::allclose(grads[i], first[i], 1e-6, 1e-7))
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
