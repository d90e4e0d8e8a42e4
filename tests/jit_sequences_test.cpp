// torchlora::jit: random sequences of operations on a ScriptLoRA against a
// float64 model of its state.
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

} // namespace
