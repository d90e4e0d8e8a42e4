// AdapterRouting: each row of a batch with its own adapter, in every layer
// kind, in training, across threads; and merging in place.

#include "test_support.h"

#include <torchlora/torchlora.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_routing_test {

namespace {

class RoutingTest : public torchlora_test::Seeded {};
class ForwardsAndMergesTest : public torchlora_test::Seeded {};

const std::string kBase = "__base__";

/// Three adapters of ranks 2, 4 and 8 on `layer`, random A and B (so each
/// changes the output), different alphas.
void add_three_adapters(torchlora::LoRALayer& layer) {
  const std::vector<std::pair<std::string, int64_t>> adapters{
      {"a", 2}, {"b", 4}, {"c", 8}};
  for (const auto& [name, rank] : adapters) {
    layer.add_adapter(
        name,
        torchlora::LoRAOptions(rank)
            .alpha(static_cast<double>(rank) * 1.5)
            .init(torchlora::LoRAInit::random));
  }
}

/// `count` names drawn from the three adapters and `"__base__"`.
std::vector<std::string> random_names(std::mt19937& rng, int64_t count) {
  const std::vector<std::string> choices{"a", "b", "c", kBase};
  std::uniform_int_distribution<size_t> pick(0, choices.size() - 1);
  std::vector<std::string> names;
  for (int64_t i = 0; i < count; ++i) {
    names.push_back(choices[pick(rng)]);
  }
  return names;
}

/// add_three_adapters' factor for every adapter: alpha / r = 1.5.
constexpr double kThreeAdaptersFactor = 1.5;

/// A parameter of `module` by name, in float64.
torch::Tensor float64_parameter(
    const torch::nn::Module& module,
    const std::string& name) {
  return module.named_parameters()[name].detach().to(torch::kFloat64);
}

/// Each row of a routed forward equals `formula(row input, adapter name)`,
/// a float64 reference with plain ops ("__base__": the base alone).
template <typename Module, typename Formula>
void expect_rows_match(
    Module& module,
    const torch::Tensor& input,
    const std::vector<std::string>& names,
    double tolerance,
    const Formula& formula) {
  torch::Tensor routed;
  {
    torchlora::AdapterRouting routing(*module, names);
    routed = module->forward(input);
  }
  for (size_t row = 0; row < names.size(); ++row) {
    const auto i = static_cast<int64_t>(row);
    const torch::Tensor expected = formula(input.narrow(0, i, 1), names[row]);
    const auto actual = routed.narrow(0, i, 1).to(torch::kFloat64);
    EXPECT_TRUE(torch::allclose(actual, expected, tolerance, tolerance))
        << "row " << row << " (" << names[row] << "): max difference "
        << (actual - expected).abs().max().item<double>();
  }
}

TEST_F(RoutingTest, EachRowOfEveryKindEqualsItsAdapterAlone) {
  std::mt19937 rng(5122026);
  for (int trial = 0; trial < 6; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    const auto names = random_names(rng, 3 + trial);
    const auto batch = static_cast<int64_t>(names.size());

    torchlora::LoRALinear linear(torch::nn::Linear(12, 9));
    add_three_adapters(*linear);
    const auto linear_formula = [&](const torch::Tensor& x,
                                    const std::string& name) {
      const auto x64 = x.to(torch::kFloat64);
      auto y = torch::matmul(x64, float64_parameter(*linear, "weight").t()) +
          float64_parameter(*linear, "bias");
      if (name != kBase) {
        const auto A = float64_parameter(*linear, "lora_A." + name + ".weight");
        const auto B = float64_parameter(*linear, "lora_B." + name + ".weight");
        y = y +
            torch::matmul(torch::matmul(x64, A.t()), B.t()) *
                kThreeAdaptersFactor;
      }
      return y;
    };
    expect_rows_match(
        linear, torch::randn({batch, 12}), names, 1e-6, linear_formula);
    // [batch, tokens, in]: the row's adapter for all its tokens.
    expect_rows_match(
        linear, torch::randn({batch, 5, 12}), names, 1e-6, linear_formula);

    torchlora::LoRAEmbedding embedding(torch::nn::Embedding(20, 6));
    add_three_adapters(*embedding);
    expect_rows_match(
        embedding,
        torch::randint(0, 20, {batch, 4}, torch::kLong),
        names,
        1e-6,
        [&](const torch::Tensor& indices, const std::string& name) {
          const auto flat = indices.flatten();
          auto y =
              float64_parameter(*embedding, "weight").index_select(0, flat);
          if (name != kBase) {
            // A [r, num_embeddings], B [embedding_dim, r], as in peft.
            const auto A =
                float64_parameter(*embedding, "lora_embedding_A." + name);
            const auto B =
                float64_parameter(*embedding, "lora_embedding_B." + name);
            y = y +
                A.t().index_select(0, flat).matmul(B.t()) *
                    kThreeAdaptersFactor;
          }
          return y.view({1, indices.size(1), 6});
        });

    torchlora::LoRAConv2d conv(torch::nn::Conv2d(
        torch::nn::Conv2dOptions(3, 5, 3).padding(1).stride(2)));
    add_three_adapters(*conv);
    expect_rows_match(
        conv,
        torch::randn({batch, 3, 7, 6}),
        names,
        1e-5,
        [&](const torch::Tensor& x, const std::string& name) {
          // A: the base's kernel, stride and padding; B: 1x1.
          const auto x64 = x.to(torch::kFloat64);
          auto y = torch::conv2d(
              x64,
              float64_parameter(*conv, "weight"),
              float64_parameter(*conv, "bias"),
              /*stride=*/2,
              /*padding=*/1);
          if (name != kBase) {
            const auto hidden = torch::conv2d(
                x64,
                float64_parameter(*conv, "lora_A." + name + ".weight"),
                {},
                /*stride=*/2,
                /*padding=*/1);
            y = y +
                torch::conv2d(
                    hidden,
                    float64_parameter(*conv, "lora_B." + name + ".weight")) *
                    kThreeAdaptersFactor;
          }
          return y;
        });
    if (HasFailure()) {
      return;
    }
  }
}

TEST_F(RoutingTest, MatchesAFloat64FormulaOnRandomShapes) {
  std::mt19937 rng(6122026);
  std::uniform_int_distribution<int64_t> size(1, 24);
  for (int trial = 0; trial < 40; ++trial) {
    const auto in = size(rng);
    const auto out = size(rng);
    const auto batch = 1 + size(rng) % 9;
    const bool tokens = trial % 2 == 1;
    SCOPED_TRACE(
        "trial " + std::to_string(trial) + ": " + std::to_string(in) + " -> " +
        std::to_string(out) + ", batch " + std::to_string(batch));
    torchlora::LoRALinear layer(torch::nn::Linear(in, out));
    layer->to(torch::kFloat64);
    add_three_adapters(*layer);
    layer->set_scale("b", 0.5 + trial % 3);
    const auto names = random_names(rng, batch);
    const auto x = tokens ? torch::randn({batch, 3, in}, torch::kFloat64)
                          : torch::randn({batch, in}, torch::kFloat64);
    torch::Tensor y;
    {
      torchlora::AdapterRouting routing(*layer, names);
      y = layer->forward(x);
    }
    for (int64_t row = 0; row < batch; ++row) {
      const auto& name = names[static_cast<size_t>(row)];
      const auto xi = x[row];
      auto expected = torch::matmul(xi, layer->weight.t()) + layer->bias;
      if (name != kBase) {
        const auto& A = layer->lora_A[name]->as<torch::nn::Linear>()->weight;
        const auto& B = layer->lora_B[name]->as<torch::nn::Linear>()->weight;
        // alpha / r from add_three_adapters, times b's scale set above.
        const double s =
            kThreeAdaptersFactor * (name == "b" ? 0.5 + trial % 3 : 1.0);
        expected =
            expected + torch::matmul(torch::matmul(xi, A.t()), B.t()) * s;
      }
      EXPECT_TRUE(torch::allclose(y[row], expected, 1e-12, 1e-12))
          << "row " << row << " (" << name << ")";
    }
    if (HasFailure()) {
      return;
    }
  }
}

/// Linear(8, 16) -> ReLU -> Linear(16, 6), adapters "a" (r 2) and "b" (r 4)
/// on both Linears and "c" (r 8) on the last only.
torch::nn::Sequential three_adapter_model() {
  torch::nn::Sequential model(
      torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 6));
  const auto random = torchlora::LoRAInit::random;
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(2).alpha(4).init(random).target_modules(
          {"0", "2"}));
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(4)
          .init(random)
          .target_modules({"0", "2"})
          .adapter_name("b"));
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(8)
          .alpha(2)
          .init(random)
          .target_modules({"2"})
          .adapter_name("c"));
  torchlora::set_adapter(model, "default");
  return model;
}

TEST_F(RoutingTest, AModelGivesEachRowItsAdapterInEveryLayer) {
  auto model = three_adapter_model();
  const std::vector<std::string> names{"b", "default", kBase, "c", "b", "c"};
  const auto x = torch::randn({6, 2, 8});
  const auto before = model->forward(x);
  torch::Tensor routed;
  {
    torchlora::AdapterRouting routing(model, names);
    EXPECT_EQ(routing.rows(), 6);
    routed = model->forward(x);
  }
  // After the scope, the model is as before: "default" active everywhere.
  EXPECT_TRUE(torch::equal(model->forward(x), before));
  for (size_t row = 0; row < names.size(); ++row) {
    const auto xi = x.narrow(0, static_cast<int64_t>(row), 1);
    torch::Tensor expected;
    if (names[row] == kBase) {
      torchlora::DisableAdapters off(model);
      expected = model->forward(xi);
    } else {
      // "c" is only on the last layer: the first computes its base output.
      torchlora::set_adapter(model, names[row]);
      expected = model->forward(xi);
    }
    EXPECT_TRUE(torch::allclose(
        routed.narrow(0, static_cast<int64_t>(row), 1), expected, 1e-6, 1e-6))
        << "row " << row << " (" << names[row] << ")";
  }
  torchlora::set_adapter(model, "default");
  EXPECT_TRUE(torch::equal(model->forward(x), before));
}

TEST_F(RoutingTest, GradientsReachEachAdapterFromItsOwnRowsOnly) {
  auto model = three_adapter_model();
  model->to(torch::kFloat64);
  // Every routed adapter trainable: all three active.
  torchlora::set_adapter(model, {"default", "b", "c"});
  const std::vector<std::string> names{
      "b", "default", kBase, "c", "b", "default"};
  const auto x = torch::randn({6, 8}, torch::kFloat64);
  const auto weights = torch::randn({6, 6}, torch::kFloat64);
  auto adapter_grads = [&](const std::string& name) {
    std::vector<torch::Tensor> grads;
    for (const auto& item : model->named_parameters()) {
      if (item.key().find("." + name + ".") != std::string::npos) {
        grads.push_back(
            item.value().grad().defined() ? item.value().grad().clone()
                                          : torch::zeros_like(item.value()));
      }
    }
    return grads;
  };
  model->zero_grad();
  {
    torchlora::AdapterRouting routing(model, names);
    (model->forward(x) * weights).sum().backward();
  }
  std::map<std::string, std::vector<torch::Tensor>> mixed;
  for (const auto* name : {"default", "b", "c"}) {
    mixed[name] = adapter_grads(name);
    ASSERT_FALSE(mixed[name].empty()) << name;
  }
  for (const auto* name : {"default", "b", "c"}) {
    // The adapter's rows alone, with only it active.
    std::vector<int64_t> rows;
    for (size_t row = 0; row < names.size(); ++row) {
      if (names[row] == name) {
        rows.push_back(static_cast<int64_t>(row));
      }
    }
    const auto index = torch::tensor(rows, torch::kLong);
    torchlora::set_adapter(model, name);
    model->zero_grad();
    (model->forward(x.index_select(0, index)) * weights.index_select(0, index))
        .sum()
        .backward();
    const auto alone = adapter_grads(name);
    ASSERT_EQ(alone.size(), mixed[name].size());
    for (size_t i = 0; i < alone.size(); ++i) {
      EXPECT_TRUE(torch::allclose(mixed[name][i], alone[i], 1e-10, 1e-12))
          << name << " tensor " << i;
      EXPECT_GT(alone[i].abs().sum().item<double>(), 0) << name;
    }
  }
}

TEST_F(RoutingTest, BadNamesRowCountsAndStatesAreErrors) {
  auto model = three_adapter_model();
  const auto x = torch::randn({3, 8});
  const auto before = torchlora_test::snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      (void)torchlora::AdapterRouting(model, {"b", "zz", kBase}),
      "row 1 names adapter \"zz\", which no LoRA layer of the model has");
  {
    torchlora::AdapterRouting routing(model, {"b", "c", kBase});
    EXPECT_TORCHLORA_ERROR(
        model->forward(torch::randn({4, 8})),
        "AdapterRouting was made for 3 rows, but this LoRALinear's input has "
        "4 in its first dimension");
    EXPECT_TORCHLORA_ERROR(
        model->forward(torch::randn({8})), "needs a batched input");
  }
  {
    torchlora::LoRAConv2d conv(torch::nn::Conv2d(3, 4, 3));
    conv->add_adapter("a", torchlora::LoRAOptions(2));
    torchlora::AdapterRouting routing(*conv, {"a", "a", "a"});
    EXPECT_TORCHLORA_ERROR(
        conv->forward(torch::randn({3, 6, 6})), "needs a batched input [N, C");
  }
  torchlora::merge(model);
  {
    torchlora::AdapterRouting routing(model, {"b", "c", kBase});
    EXPECT_TORCHLORA_ERROR(model->forward(x), "is merged");
  }
  torchlora::unmerge(model);
  {
    torchlora::DisableAdapters off(model);
    torchlora::AdapterRouting routing(model, {"b", "c", kBase});
    EXPECT_TORCHLORA_ERROR(model->forward(x), "are disabled");
  }
  torchlora_test::expect_unchanged(before, *model);
}

TEST_F(RoutingTest, IsPerThreadAndConcurrentForwardsMatchSerial) {
  auto model = three_adapter_model();
  model->eval();
  torch::NoGradGuard no_grad;
  const int threads = 4;
  const int forwards = 40;
  std::mt19937 rng(7122026);
  const std::vector<std::string> choices{"default", "b", "c", kBase};
  std::vector<std::vector<std::vector<std::string>>> routes(threads);
  std::vector<std::vector<torch::Tensor>> inputs(threads);
  std::vector<std::vector<torch::Tensor>> serial(threads);
  for (int t = 0; t < threads; ++t) {
    for (int f = 0; f < forwards; ++f) {
      std::vector<std::string> names;
      for (int row = 0; row < 5; ++row) {
        names.push_back(choices[rng() % choices.size()]);
      }
      const auto x = torch::randn({5, 3, 8});
      routes[t].push_back(names);
      inputs[t].push_back(x);
      // Odd forwards run without a routing (the active "default").
      if (f % 2 == 0) {
        torchlora::AdapterRouting routing(model, names);
        serial[t].push_back(model->forward(x));
      } else {
        serial[t].push_back(model->forward(x));
      }
    }
  }
  std::atomic<int> mismatches{0};
  std::atomic<int> errors{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      torch::NoGradGuard thread_no_grad;
      try {
        for (int f = 0; f < forwards; ++f) {
          torch::Tensor y;
          if (f % 2 == 0) {
            torchlora::AdapterRouting routing(model, routes[t][f]);
            y = model->forward(inputs[t][f]);
          } else {
            y = model->forward(inputs[t][f]);
          }
          if (!torch::allclose(y, serial[t][f], 1e-6, 1e-6)) {
            ++mismatches;
          }
        }
      } catch (const std::exception&) {
        ++errors;
      }
    });
  }
  for (auto& thread : pool) {
    thread.join();
  }
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(errors.load(), 0);
}

TEST_F(ForwardsAndMergesTest, ChangingALayerWhileAForwardRunsIsRefused) {
  auto model = three_adapter_model();
  auto layer = model[0]->as<torchlora::LoRALinear>();
  ASSERT_NE(layer, nullptr);
  const auto before = torchlora_test::snapshot(*model);
  {
    const auto running = layer->forward_scope();
    EXPECT_EQ(layer->running_forwards(), 1);
    EXPECT_TORCHLORA_ERROR(
        torchlora::set_adapter(model, "b"),
        "set_adapter while 1 forward(s) of '0' are running on other threads");
    EXPECT_TORCHLORA_ERROR(torchlora::merge(model), "merge while 1 forward(s)");
    EXPECT_TORCHLORA_ERROR(
        torchlora::set_scale(model, "b", 2.0), "set_scale while 1 forward(s)");
    EXPECT_TORCHLORA_ERROR(
        layer->add_adapter("d", torchlora::LoRAOptions(2)),
        "add_adapter while 1 forward(s) of this LoRALinear");
    EXPECT_EQ(torchlora::adapter_names(model).size(), 3u);
  }
  EXPECT_EQ(layer->running_forwards(), 0);
  torchlora_test::expect_unchanged(before, *model);
  torchlora::set_adapter(model, "b");
}

TEST_F(ForwardsAndMergesTest, MergeInPlaceKeepsNoCopyAndUnmergeSubtracts) {
  for (const auto dtype :
       {torch::kFloat32, torch::kFloat64, torch::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    auto model = three_adapter_model();
    model->to(dtype);
    torchlora::set_adapter(model, {"default", "c"});
    const auto x = torch::randn({4, 8}).to(dtype);
    const auto unmerged = model->forward(x);
    const auto base = torchlora_test::base_tensors(*model);
    auto copy_merged =
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
    torchlora::merge(copy_merged);
    const auto expected_merged = copy_merged->forward(x);

    auto layer = model[2]->as<torchlora::LoRALinear>();
    const auto* memory = layer->weight.data_ptr();
    torchlora::merge(model, torchlora::MergeOptions().keep_original(false));
    EXPECT_TRUE(layer->merged_in_place());
    EXPECT_EQ(layer->weight.data_ptr(), memory) << "merged in place";
    // The same arithmetic as the copy-keeping merge: the same output.
    EXPECT_TRUE(torch::equal(model->forward(x), expected_merged));
    const double tolerance = dtype == torch::kBFloat16 ? 3e-2 : 1e-5;
    EXPECT_TRUE(torch::allclose(
        model->forward(x).to(torch::kFloat64),
        unmerged.to(torch::kFloat64),
        tolerance,
        tolerance));
    // A clone and a DisableAdapters scope keep the in-place state.
    auto cloned =
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
    EXPECT_TRUE((*cloned)[2]->as<torchlora::LoRALinear>()->merged_in_place());
    {
      torchlora::DisableAdapters off(model);
      EXPECT_FALSE(layer->merged());
    }
    EXPECT_TRUE(layer->merged_in_place());

    torchlora::unmerge(model);
    EXPECT_FALSE(layer->merged());
    for (const auto& [name, tensor] : torchlora_test::base_tensors(*model)) {
      const double max_difference =
          (tensor.to(torch::kFloat64) - base.at(name).to(torch::kFloat64))
              .abs()
              .max()
              .item<double>();
      EXPECT_LE(max_difference, dtype == torch::kBFloat16 ? 3e-2 : 1e-6)
          << name;
    }
  }
}

TEST_F(ForwardsAndMergesTest, MergeInPlaceRefusesStaleAdaptersAndFollowsACast) {
  auto fresh_layer = [] {
    torchlora::LoRALinear layer(torch::nn::Linear(6, 5));
    layer->add_adapter(
        "a", torchlora::LoRAOptions(2).init(torchlora::LoRAInit::random));
    return layer;
  };
  {
    auto layer = fresh_layer();
    const auto base = layer->weight.detach().clone();
    layer->merge_in_place();
    {
      torch::NoGradGuard no_grad;
      layer->lora_B["a"]->as<torch::nn::Linear>()->weight.add_(1);
    }
    // The stale merge is refused where it would be used or copied...
    EXPECT_TORCHLORA_ERROR(layer->forward(torch::randn({2, 6})), "stale");
    EXPECT_TORCHLORA_ERROR(layer->clone(), "stale");
    // ...while saving and unmerging subtract the delta merge added (from
    // its copy of the adapters), not the changed one.
    std::stringstream buffer;
    torch::save(layer, buffer);
    auto loaded = fresh_layer();
    torch::load(loaded, buffer);
    EXPECT_TRUE(torch::allclose(loaded->weight, base, 0, 1e-6));
    layer->unmerge();
    EXPECT_TRUE(torch::allclose(layer->weight, base, 0, 1e-6));
  }
  {
    auto layer = fresh_layer();
    const auto base = layer->weight.detach().clone();
    const auto x = torch::randn({3, 6});
    const auto unmerged = layer->forward(x);
    layer->merge_in_place();
    layer->to(torch::kFloat64);
    const auto merged = layer->forward(x.to(torch::kFloat64));
    EXPECT_TRUE(
        torch::allclose(merged.to(torch::kFloat32), unmerged, 1e-5, 1e-5));
    layer->unmerge();
    EXPECT_TRUE(
        torch::allclose(layer->weight.to(torch::kFloat32), base, 1e-6, 1e-6));
  }
}

} // namespace

} // namespace torchlora_routing_test
