#pragma once

// The models and cases of the peft interop check, shared by
// tests/interop/interop_main.cpp (run against the real peft by
// tests/interop/peft_interop.py) and tests/peft_files_test.cpp (which loads
// files real peft wrote, kept in tests/data/). The Python twins are in
// peft_interop.py.

#include <torchlora/torchlora.h>

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace torchlora_interop {

using Tensors = torchlora::safetensors::Tensors;

/// A model of the check: its forward takes the case's inputs by name.
struct InteropModel : torch::nn::Module {
  virtual torch::Tensor run(const Tensors& inputs) = 0;
};

/// Linear layers as typed members and in a Sequential, an Embedding, a
/// Conv2d and LibTorch's own MultiheadAttention.
struct TinyNet : InteropModel {
  TinyNet() {
    embed = register_module(
        "embed", torchlora::LoRAEmbedding(torch::nn::EmbeddingOptions(10, 16)));
    conv = register_module(
        "conv",
        torchlora::LoRAConv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1)));
    q_proj = register_module("q_proj", torchlora::LoRALinear(16, 16));
    v_proj = register_module("v_proj", torchlora::LoRALinear(16, 16));
    mlp = register_module(
        "mlp",
        torch::nn::Sequential(
            torch::nn::Linear(16, 32),
            torch::nn::ReLU(),
            torch::nn::Linear(32, 16)));
    head = register_module("head", torchlora::LoRALinear(16, 4));
    attn = register_module(
        "attn",
        torch::nn::MultiheadAttention(
            torch::nn::MultiheadAttentionOptions(16, 2)));
  }
  torch::Tensor run(const Tensors& inputs) override {
    const auto& x = inputs["x"];
    const auto sequence = x.unsqueeze(0); // one position, N in the batch
    const auto attended =
        std::get<0>(attn(sequence, sequence, sequence)).squeeze(0);
    return head(mlp->forward(
               q_proj(x) + v_proj(x) + embed(inputs["tokens"]) + attended)) +
        conv(inputs["image"]).mean({2, 3});
  }
  torchlora::LoRAEmbedding embed{nullptr};
  torchlora::LoRAConv2d conv{nullptr};
  torchlora::LoRALinear q_proj{nullptr}, v_proj{nullptr}, head{nullptr};
  torch::nn::Sequential mlp{nullptr};
  torch::nn::MultiheadAttention attn{nullptr};
};

/// Two Linear layers and a plain Linear head (a module to save).
struct Mlp : InteropModel {
  Mlp() {
    fc1 = register_module("fc1", torchlora::LoRALinear(12, 24));
    fc2 = register_module("fc2", torchlora::LoRALinear(24, 12));
    head = register_module("head", torch::nn::Linear(12, 3));
  }
  torch::Tensor run(const Tensors& inputs) override {
    return head(fc2(torch::relu(fc1(inputs["x"]))));
  }
  torchlora::LoRALinear fc1{nullptr}, fc2{nullptr};
  torch::nn::Linear head{nullptr};
};

/// A Conv1d and a Linear head.
struct ConvNet1d : InteropModel {
  ConvNet1d() {
    conv = register_module(
        "conv",
        torchlora::LoRAConv1d(torch::nn::Conv1dOptions(3, 5, 3).padding(1)));
    head = register_module("head", torchlora::LoRALinear(5, 2));
  }
  torch::Tensor run(const Tensors& inputs) override {
    return head(conv(inputs["signal"]).mean(2));
  }
  torchlora::LoRAConv1d conv{nullptr};
  torchlora::LoRALinear head{nullptr};
};

/// LibTorch's TransformerEncoderLayer (no dropout).
struct Encoder : InteropModel {
  Encoder() {
    layer = register_module(
        "layer",
        torch::nn::TransformerEncoderLayer(
            torch::nn::TransformerEncoderLayerOptions(16, 2)
                .dim_feedforward(32)
                .dropout(0.0)));
  }
  torch::Tensor run(const Tensors& inputs) override {
    return layer(inputs["x"]);
  }
  torch::nn::TransformerEncoderLayer layer{nullptr};
};

/// LibTorch's TransformerDecoderLayer (no dropout).
struct Decoder : InteropModel {
  Decoder() {
    layer = register_module(
        "layer",
        torch::nn::TransformerDecoderLayer(
            torch::nn::TransformerDecoderLayerOptions(16, 2)
                .dim_feedforward(32)
                .dropout(0.0)));
  }
  torch::Tensor run(const Tensors& inputs) override {
    return layer(inputs["x"], inputs["memory"]);
  }
  torch::nn::TransformerDecoderLayer layer{nullptr};
};

/// Linear layers at paths that end with one another ("0" and "2.0"),
/// registered without typed members (inject_lora swaps them in place).
struct Stack : InteropModel {
  Stack() {
    register_module("0", torch::nn::Linear(8, 8));
    register_module(
        "2",
        torch::nn::Sequential(
            torch::nn::Linear(8, 8),
            torch::nn::ReLU(),
            torch::nn::Linear(8, 4)));
  }
  torch::Tensor run(const Tensors& inputs) override {
    const auto children = named_children();
    const auto hidden =
        torch::relu(torchlora::layer_forward(*children["0"], inputs["x"]));
    return children["2"]->as<torch::nn::Sequential>()->forward(hidden);
  }
};

/// One check: a model, its inputs and its adapters (each config names its
/// adapter; the first is "default").
struct Case {
  std::string name;
  std::function<std::shared_ptr<InteropModel>()> make;
  std::function<Tensors()> inputs;
  std::vector<torchlora::LoRAConfig> adapters;
  /// save_adapter with the config (its targets and patterns as given), or
  /// without (the adapted paths, patterns keyed by path).
  bool save_with_config = true;
};

inline Tensors tensors_of(
    std::initializer_list<std::pair<std::string, torch::Tensor>> items) {
  Tensors tensors;
  for (const auto& [key, value] : items) {
    tensors.insert(key, value);
  }
  return tensors;
}

inline torch::Tensor features(std::vector<int64_t> shape) {
  return torch::randn(shape, torch::kFloat64);
}

/// The cases; peft_interop.py's CASES must list the same, with the same
/// settings.
inline std::vector<Case> cases() {
  using torchlora::LoRABias;
  using torchlora::LoRAConfig;
  const auto mlp = [] { return std::make_shared<Mlp>(); };
  const auto mlp_inputs = [] { return tensors_of({{"x", features({6, 12})}}); };
  const auto sequence = [] {
    return tensors_of({{"x", features({4, 3, 16})}});
  };
  return {
      {"mixed",
       [] { return std::make_shared<TinyNet>(); },
       [] {
         return tensors_of(
             {{"x", features({5, 16})},
              {"tokens", torch::tensor({0, 3, 9, 3, 7}, torch::kInt64)},
              {"image", features({5, 3, 6, 6})}});
       },
       {LoRAConfig(4)
            .alpha(8)
            .target_modules(
                {"q_proj", "v_proj", "mlp.0", "head", "embed", "conv", "attn"})
            .rank_pattern({{"head", 2}})
            .alpha_pattern({{"mlp.0", 16.0}})}},
      {"rslora_bias_all_modules_to_save",
       mlp,
       mlp_inputs,
       {LoRAConfig(3)
            .alpha(5)
            .use_rslora(true)
            .target_modules({"fc1", "fc2"})
            .bias(LoRABias::all)
            .modules_to_save({"head"})}},
      {"bias_lora_only",
       mlp,
       mlp_inputs,
       {LoRAConfig(2).alpha(4).target_modules({"fc1"}).bias(
           LoRABias::lora_only)}},
      {"regex_targets",
       mlp,
       mlp_inputs,
       {LoRAConfig(4).alpha(2).target_regex("fc[12]").rank_pattern(
           {{"fc2", 3}})}},
      {"conv1d",
       [] { return std::make_shared<ConvNet1d>(); },
       [] {
         return tensors_of({{"signal", features({4, 3, 9})}});
       },
       {LoRAConfig(2).alpha(3).target_modules({"conv", "head"})}},
      {"encoder_layer",
       [] { return std::make_shared<Encoder>(); },
       sequence,
       {LoRAConfig(4).alpha(8).target_modules(
           {"self_attn", "linear1", "linear2"})}},
      {"decoder_layer",
       [] { return std::make_shared<Decoder>(); },
       [] {
         return tensors_of(
             {{"x", features({4, 3, 16})}, {"memory", features({5, 3, 16})}});
       },
       {LoRAConfig(2).alpha(6).target_modules(
           {"self_attn", "multihead_attn", "linear1"})}},
      {"paths_and_anchored_patterns",
       [] { return std::make_shared<Stack>(); },
       [] {
         return tensors_of({{"x", features({5, 8})}});
       },
       {LoRAConfig(4)
            .alpha(4)
            .target_modules({"0", "2.2"})
            .rank_pattern({{"^0", 2}})
            .alpha_pattern({{"2.2", 8.0}})},
       /*save_with_config=*/false},
      {"two_adapters",
       mlp,
       mlp_inputs,
       {LoRAConfig(2).alpha(4).target_modules({"fc1", "fc2"}),
        LoRAConfig(4).alpha(3).target_modules({"fc1"}).adapter_name("fr")}},
      // DoRA on every kind peft takes it on (not MultiheadAttention).
      {"dora",
       [] { return std::make_shared<TinyNet>(); },
       [] {
         return tensors_of(
             {{"x", features({5, 16})},
              {"tokens", torch::tensor({0, 3, 9, 3, 7}, torch::kInt64)},
              {"image", features({5, 3, 6, 6})}});
       },
       {LoRAConfig(4).alpha(8).use_dora(true).target_modules(
           {"q_proj", "v_proj", "mlp.0", "head", "embed", "conv"})}},
      {"dora_and_plain",
       mlp,
       mlp_inputs,
       {LoRAConfig(2).alpha(4).use_dora(true).target_modules({"fc1", "fc2"}),
        LoRAConfig(4).alpha(3).target_modules({"fc1"}).adapter_name("fr")}},
  };
}

/// Each adapter's output on the inputs, keyed "y_<adapter>".
inline Tensors outputs_of(
    InteropModel& model,
    const Case& test,
    const Tensors& inputs) {
  model.eval();
  torch::NoGradGuard no_grad;
  Tensors outputs;
  for (const auto& config : test.adapters) {
    torchlora::set_adapter(model, config.adapter_name());
    torchlora::AdaptedWeights adapted(model);
    outputs.insert("y_" + config.adapter_name(), model.run(inputs));
  }
  return outputs;
}

/// The case's model with the base weights of `folder`/base.safetensors and
/// the adapters of `folder`/<adapters> loaded with load_adapter.
inline std::shared_ptr<InteropModel> load_case(
    const Case& test,
    const std::string& folder,
    const std::string& adapters) {
  auto model = test.make();
  model->to(torch::kFloat64);
  {
    const auto base =
        torchlora::safetensors::load(folder + "/base.safetensors");
    torch::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      item.value().copy_(base[item.key()]);
    }
  }
  for (const auto& config : test.adapters) {
    torchlora::load_adapter(
        *model, folder + "/" + adapters, config.adapter_name());
  }
  return model;
}

/// The largest difference, relative to the larger of 1 and |b|.
inline double largest_difference(
    const torch::Tensor& a,
    const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() /
      std::max(1.0, b.abs().max().item<double>());
}

} // namespace torchlora_interop
