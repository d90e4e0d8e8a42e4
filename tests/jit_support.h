#pragma once
// Shared by the torchlora::jit tests (jit_test.cpp, jit_sequences_test.cpp,
// jit_refusals_test.cpp): the fixtures scripts/make-jit-fixtures.py wrote in
// tests/data/jit, and float64 references of TorchScript modules with LoRA.

#include <torchlora/jit.h>

#include <torch/csrc/jit/passes/tensorexpr_fuser.h>

#include "test_support.h"

#include <cstdlib>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace jit_test {

/// TorchScript's CPU fuser off for the tests, as docs/torchscript.md asks:
/// Debian 13's LibTorch 2.6 hangs compiling (with LLVM) the fused backward
/// of a module trained for three calls, with or without torchlora.
inline const bool kCpuFuserOff = [] {
  torch::jit::setTensorExprFuserEnabled(false);
  return true;
}();

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
inline std::string fixture(const std::string& name) {
  const char* fresh = std::getenv("TORCHLORA_JIT_FIXTURES");
  return (fresh != nullptr ? std::string(fresh)
                           : std::string(TORCHLORA_TEST_DATA_DIR) + "/jit") +
      "/" + name;
}

/// The tensors of a fixture's reference file, by name.
inline std::map<std::string, torch::Tensor> reference(
    const std::string& model) {
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

inline const std::vector<FixtureModel>& fixture_models() {
  static const std::vector<FixtureModel> models = {
      {"mlp", {"0", "2", "4"}},
      {"typed", {"proj", "gate"}},
      {"encoder", {"layers.0.self_attn", "layers.1.linear1"}},
      {"cnn", {"emb", "conv1", "conv2"}},
  };
  return models;
}

inline const std::vector<std::string>& forms() {
  static const std::vector<std::string> names = {"scripted", "traced"};
  return names;
}

inline torch::jit::Module load_model(
    const std::string& name,
    const std::string& form) {
  auto module = torch::jit::load(fixture(name + "_" + form + ".pt"));
  module.eval();
  return module;
}

/// The config of the reference file's adapters: rank 2, scaling 2.
inline torchlora::LoRAConfig fixture_config(
    const std::vector<std::string>& targets) {
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
inline torch::Tensor adapter_matrix(
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
inline void set_reference_adapters(
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

inline void expect_close(
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
inline torch::jit::Module submodule(
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

inline Float64Reference float64_reference(
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
inline std::vector<TargetSpec> target_specs_of(
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
inline std::vector<TargetSpec> target_specs(
    const torchlora::jit::ScriptLoRA& lora) {
  return target_specs_of(lora.module(), lora.adapted_paths());
}

} // namespace jit_test
