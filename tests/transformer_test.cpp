// LoRA inside LibTorch's own Transformer modules: TransformerEncoder and
// TransformerDecoder adapted on self_attn (in_proj and out_proj),
// multihead_attn, linear1 and linear2, checked against float64 references
// built by hand (W0 + s B A in every projection), and the AdaptedWeights
// scope that keeps the computed weights from going stale in silence.

#include "test_support.h"

#include <torchlora/torchlora.h>

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_transformer_test {

namespace {

using namespace torchlora;
using torchlora_test::base_tensors;
using torchlora_test::message_of;
using torchlora_test::same_values;

namespace nn = torch::nn;

class TransformerTest : public torchlora_test::Seeded {};

nn::TransformerEncoder make_encoder(int64_t seed, torch::Dtype dtype) {
  torch::manual_seed(seed);
  nn::TransformerEncoder encoder(nn::TransformerEncoderOptions(
      nn::TransformerEncoderLayerOptions(16, 4).dim_feedforward(24).dropout(0),
      2));
  encoder->to(dtype);
  return encoder;
}

nn::TransformerDecoder make_decoder(int64_t seed, torch::Dtype dtype) {
  torch::manual_seed(seed);
  nn::TransformerDecoder decoder(nn::TransformerDecoderOptions(
      nn::TransformerDecoderLayerOptions(16, 2).dim_feedforward(20).dropout(0),
      2));
  decoder->to(dtype);
  return decoder;
}

const std::vector<std::string> kEncoderTargets = {
    "self_attn",
    "linear1",
    "linear2"};
const std::vector<std::string> kDecoderTargets = {
    "self_attn",
    "multihead_attn",
    "linear1",
    "linear2"};

/// The parameters to train (the adapters, after inject_lora).
std::vector<torch::Tensor> trainable(const nn::Module& model) {
  std::vector<torch::Tensor> tensors;
  for (const auto& tensor : model.parameters()) {
    if (tensor.requires_grad()) {
      tensors.push_back(tensor);
    }
  }
  return tensors;
}

/// Gives every adapter matrix random values, so that no delta is zero.
void randomize_adapters(nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    if (item.key().find("lora_") != std::string::npos) {
      item.value().normal_(0, 0.3);
    }
  }
}

/// The reference: a plain copy of `model`'s base whose members are pointed,
/// by hand, at W0 + s B A with leaf copies of every A and B (so gradients
/// reach them), `s` = alpha / r.
struct Reference {
  std::map<std::string, torch::Tensor> A, B;

  /// Points the members of `plain` at the adapted weights.
  void adapt(nn::Module& plain, double s) {
    for (const auto& item : plain.named_modules()) {
      const auto& path = item.key();
      const auto& module = item.value();
      const auto weight = [&](const std::string& at) {
        return A.count(at)
            ? std::optional<torch::Tensor>(s * torch::mm(B.at(at), A.at(at)))
            : std::nullopt;
      };
      if (auto* attention = module->as<nn::MultiheadAttentionImpl>()) {
        if (auto delta = weight(path)) {
          attention->in_proj_weight =
              attention->named_parameters(false)["in_proj_weight"] + *delta;
        }
      } else if (auto* linear = module->as<nn::LinearImpl>()) {
        if (auto delta = weight(path)) {
          linear->weight = linear->named_parameters(false)["weight"] + *delta;
        }
      }
    }
  }
};

/// Leaf copies of `model`'s adapters ("default") by layer path.
Reference reference_of(nn::Module& model) {
  Reference reference;
  for (const auto& item : model.named_parameters()) {
    const auto& key = item.key();
    for (const char* matrix :
         {".lora_A.default.weight", ".lora_B.default.weight"}) {
      const auto at = key.find(matrix);
      if (at != std::string::npos) {
        auto& map = matrix[6] == 'A' ? reference.A : reference.B;
        map[key.substr(0, at)] =
            item.value().detach().clone().set_requires_grad(true);
      }
    }
  }
  return reference;
}

/// The adapter matrices' gradients of `model`, by parameter name.
std::map<std::string, torch::Tensor> adapter_gradients(nn::Module& model) {
  std::map<std::string, torch::Tensor> grads;
  for (const auto& item : model.named_parameters()) {
    if (item.key().find("lora_") != std::string::npos) {
      grads[item.key()] = item.value().grad();
    }
  }
  return grads;
}

void expect_gradients_match(
    nn::Module& model,
    const Reference& reference,
    double tolerance) {
  const auto grads = adapter_gradients(model);
  ASSERT_EQ(grads.size(), 2 * reference.A.size());
  for (const auto& [path, A] : reference.A) {
    const auto& grad_A = grads.at(path + ".lora_A.default.weight");
    const auto& grad_B = grads.at(path + ".lora_B.default.weight");
    ASSERT_TRUE(grad_A.defined() && grad_B.defined()) << path;
    EXPECT_TRUE(torch::allclose(grad_A, A.grad(), 0, tolerance)) << path;
    EXPECT_TRUE(
        torch::allclose(grad_B, reference.B.at(path).grad(), 0, tolerance))
        << path;
  }
}

TEST_F(TransformerTest, EncoderMatchesAFloat64ReferenceForwardAndGradients) {
  for (const int64_t rank : {1, 4}) {
    auto encoder = make_encoder(rank, torch::kFloat64);
    const auto paths = inject_lora(
        encoder,
        LoRAConfig(rank).alpha(2.5 * rank).target_modules(kEncoderTargets));
    // in_proj and out_proj of each attention, linear1 and linear2.
    EXPECT_EQ(paths.size(), 8u);
    randomize_adapters(*encoder);
    auto reference = reference_of(*encoder);
    auto plain = make_encoder(rank, torch::kFloat64);
    reference.adapt(*plain, 2.5);

    const auto x = torch::randn({5, 3, 16}, torch::kFloat64);
    const auto mask = torch::randn({5, 5}, torch::kFloat64);
    torch::Tensor y;
    {
      AdaptedWeights adapted(*encoder);
      EXPECT_EQ(adapted.size(), 8u);
      y = encoder(x, mask);
      (y * y.detach().sin()).sum().backward();
    }
    const auto want = plain(x, mask);
    (want * want.detach().sin()).sum().backward();
    EXPECT_TRUE(torch::allclose(y, want, 0, 1e-12));
    expect_gradients_match(*encoder, reference, 1e-11);
  }
}

TEST_F(TransformerTest, DecoderMatchesAFloat64ReferenceForwardAndGradients) {
  auto decoder = make_decoder(3, torch::kFloat64);
  const auto paths = inject_lora(
      decoder, LoRAConfig(3).alpha(6).target_modules(kDecoderTargets));
  // Two attentions with their out_proj, linear1 and linear2, per layer.
  EXPECT_EQ(paths.size(), 12u);
  randomize_adapters(*decoder);
  auto reference = reference_of(*decoder);
  auto plain = make_decoder(3, torch::kFloat64);
  reference.adapt(*plain, 2.0);

  const auto target = torch::randn({4, 2, 16}, torch::kFloat64);
  const auto memory = torch::randn({6, 2, 16}, torch::kFloat64);
  torch::Tensor y;
  {
    AdaptedWeights adapted(*decoder);
    y = decoder(target, memory);
    y.pow(3).sum().backward();
  }
  const auto want = plain(target, memory);
  want.pow(3).sum().backward();
  EXPECT_TRUE(torch::allclose(y, want, 0, 1e-12));
  expect_gradients_match(*decoder, reference, 1e-11);
}

TEST_F(TransformerTest, SecondOrderGradientsMatchTheReference) {
  auto encoder = make_encoder(5, torch::kFloat64);
  inject_lora(encoder, LoRAConfig(2).alpha(4).target_modules(kEncoderTargets));
  randomize_adapters(*encoder);
  auto reference = reference_of(*encoder);
  auto plain = make_encoder(5, torch::kFloat64);
  reference.adapt(*plain, 2.0);
  const auto x = torch::randn({3, 2, 16}, torch::kFloat64);

  const auto A =
      encoder->named_parameters()["layers.0.self_attn.lora_A.default.weight"];
  const auto B =
      encoder->named_parameters()["layers.1.linear2.lora_B.default.weight"];
  torch::Tensor got_A, got_B;
  {
    AdaptedWeights adapted(*encoder);
    const auto g = torch::autograd::grad(
        {encoder(x).pow(2).sum()}, {A}, {}, true, /*create_graph=*/true)[0];
    const auto second = torch::autograd::grad({g.pow(2).sum()}, {A, B});
    got_A = second[0];
    got_B = second[1];
  }
  const auto& ref_A = reference.A.at("layers.0.self_attn");
  const auto& ref_B = reference.B.at("layers.1.linear2");
  const auto g = torch::autograd::grad(
      {plain(x).pow(2).sum()}, {ref_A}, {}, true, true)[0];
  const auto second = torch::autograd::grad({g.pow(2).sum()}, {ref_A, ref_B});
  EXPECT_TRUE(torch::allclose(got_A, second[0], 1e-9, 1e-11));
  EXPECT_TRUE(torch::allclose(got_B, second[1], 1e-9, 1e-11));
}

TEST_F(TransformerTest, OptimizerStepsChangeTheOutputAndNoBaseTensor) {
  auto encoder = make_encoder(7, torch::kFloat32);
  const auto keys = encoder->named_parameters().keys();
  inject_lora(encoder, LoRAConfig(4).alpha(8).target_modules(kEncoderTargets));
  const auto base = base_tensors(*encoder);
  // The plain model's keys are all still there, unchanged.
  EXPECT_EQ(base.size(), keys.size());
  for (const auto& key : keys) {
    EXPECT_EQ(base.count(key), 1u) << key;
  }
  const auto x = torch::randn({6, 4, 16});
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    AdaptedWeights adapted(*encoder);
    before = encoder(x);
  }
  torch::optim::AdamW optimizer(
      trainable(*encoder), torch::optim::AdamWOptions(1e-2));
  for (int step = 0; step < 3; ++step) {
    AdaptedWeights adapted(*encoder);
    const auto loss = encoder(x).pow(2).mean();
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
  }
  torch::Tensor after;
  {
    torch::NoGradGuard no_grad;
    AdaptedWeights adapted(*encoder);
    after = encoder(x);
  }
  EXPECT_GT((after - before).abs().max().item<double>(), 1e-3);
  for (const auto& [key, tensor] : base_tensors(*encoder)) {
    EXPECT_TRUE(same_values(tensor, base.at(key))) << key;
  }
}

TEST_F(TransformerTest, UsingTheModelOutsideAdaptedWeightsIsAnError) {
  auto encoder = make_encoder(1, torch::kFloat32);
  inject_lora(encoder, LoRAConfig(2).target_modules(kEncoderTargets));
  const auto x = torch::randn({3, 2, 16});
  for (const bool training : {true, false}) {
    encoder->train(training);
    EXPECT_TORCHLORA_ERROR(
        encoder(x),
        "from 'layers.0.self_attn' (MultiheadAttention's in_proj_weight) is "
        "the base weight plus its LoRA adapters, computed only inside a "
        "torchlora::AdaptedWeights scope, and it was used outside one");
    {
      torch::NoGradGuard no_grad;
      EXPECT_TORCHLORA_ERROR(encoder(x), "used outside one");
    }
  }
  // Only linear1: its member is the one refused.
  auto other = make_encoder(1, torch::kFloat32);
  inject_lora(other, LoRAConfig(2).target_modules({"linear1"}));
  EXPECT_TORCHLORA_ERROR(
      other(x),
      "'layers.0.linear1' (TransformerEncoderLayer's linear1->weight)");
  // The members hold the sentinel again once a scope ends.
  {
    AdaptedWeights adapted(*other);
    other(x);
  }
  EXPECT_TORCHLORA_ERROR(other(x), "used outside one");
}

TEST_F(TransformerTest, ABackwardAfterTheAdaptersChangedInTheScopeIsAnError) {
  auto encoder = make_encoder(2, torch::kFloat32);
  inject_lora(encoder, LoRAConfig(2).target_modules(kEncoderTargets));
  const auto x = torch::randn({3, 2, 16});
  torch::optim::SGD optimizer(
      trainable(*encoder), torch::optim::SGDOptions(0.1));
  AdaptedWeights adapted(*encoder); // made once, outside the loop: wrong
  // Gradient accumulation before the step is fine.
  encoder(x).sum().backward();
  encoder(x).sum().backward();
  optimizer.step();
  const auto stale = encoder(x).sum();
  EXPECT_TORCHLORA_ERROR(
      stale.backward(),
      "was computed by a torchlora::AdaptedWeights before its adapters changed "
      "(an optimizer step, or an in-place change of lora_A/lora_B)");
}

TEST_F(TransformerTest, ChangingAdaptersWhileAScopeLivesIsRefused) {
  auto encoder = make_encoder(2, torch::kFloat32);
  inject_lora(encoder, LoRAConfig(2).target_modules(kEncoderTargets));
  AdaptedWeights adapted(*encoder);
  const auto before = torchlora_test::snapshot(*encoder);
  EXPECT_TORCHLORA_ERROR(
      set_scale(*encoder, "default", 0.5),
      "set_scale while a torchlora::AdaptedWeights holds the weight computed "
      "for 'layers.0.self_attn'");
  EXPECT_TORCHLORA_ERROR(
      merge(*encoder), "merge while a torchlora::AdaptedWeights");
  EXPECT_TORCHLORA_ERROR(
      DisableAdapters off(*encoder), "while a torchlora::AdaptedWeights");
  torchlora_test::expect_unchanged(before, *encoder);
  EXPECT_TORCHLORA_ERROR(
      AdapterRouting routing(*encoder, {"default", "default"}),
      "AdapterRouting cannot route rows through 'layers.0.self_attn'");
}

TEST_F(TransformerTest, DisabledAdaptersGiveTheBaseOutputBitForBit) {
  auto encoder = make_encoder(4, torch::kFloat32);
  auto plain = make_encoder(4, torch::kFloat32);
  inject_lora(encoder, LoRAConfig(4).target_modules(kEncoderTargets));
  randomize_adapters(*encoder);
  const auto x = torch::randn({3, 2, 16});
  torch::NoGradGuard no_grad;
  torch::Tensor off_output, on_output;
  {
    DisableAdapters off(*encoder);
    AdaptedWeights adapted(*encoder);
    off_output = encoder(x);
  }
  {
    AdaptedWeights adapted(*encoder);
    on_output = encoder(x);
  }
  EXPECT_TRUE(same_values(off_output, plain(x)));
  EXPECT_FALSE(same_values(on_output, off_output));
}

TEST_F(TransformerTest, MergeUnmergeAndUnloadAreExact) {
  auto encoder = make_encoder(6, torch::kFloat32);
  auto plain = make_encoder(6, torch::kFloat32);
  const auto keys = plain->named_parameters().keys();
  inject_lora(encoder, LoRAConfig(4).alpha(4).target_modules(kEncoderTargets));
  randomize_adapters(*encoder);
  const auto x = torch::randn({4, 2, 16});
  torch::NoGradGuard no_grad;
  torch::Tensor adapted_output;
  {
    AdaptedWeights adapted(*encoder);
    adapted_output = encoder(x);
  }
  merge(*encoder); // no scope needed while merged
  EXPECT_TRUE(same_values(encoder(x), adapted_output));
  unmerge(*encoder);
  EXPECT_TORCHLORA_ERROR(encoder(x), "used outside one");
  for (const auto& [key, tensor] : base_tensors(*plain)) {
    EXPECT_TRUE(same_values(encoder->named_parameters()[key], tensor)) << key;
  }
  merge(*encoder, MergeOptions().keep_original(false));
  EXPECT_TRUE(torch::allclose(encoder(x), adapted_output, 1e-5, 1e-5));
  unmerge(*encoder);

  auto unloaded = make_encoder(6, torch::kFloat32);
  inject_lora(unloaded, LoRAConfig(4).target_modules(kEncoderTargets));
  randomize_adapters(*unloaded);
  unload(*unloaded);
  EXPECT_TRUE(same_values(unloaded(x), plain(x)));
  EXPECT_EQ(unloaded->named_parameters().keys(), keys);

  merge_and_unload(*encoder);
  EXPECT_TRUE(same_values(encoder(x), adapted_output));
  EXPECT_EQ(encoder->named_parameters().keys(), keys);
  EXPECT_EQ(
      torchlora_test::module_tree(*encoder),
      torchlora_test::module_tree(*plain));
}

TEST_F(TransformerTest, SeveralAdaptersAndScales) {
  auto encoder = make_encoder(8, torch::kFloat64);
  inject_lora(encoder, LoRAConfig(2).alpha(2).target_modules(kEncoderTargets));
  inject_lora(
      encoder,
      LoRAConfig(3).alpha(6).adapter_name("fr").target_modules({"linear2"}));
  randomize_adapters(*encoder);
  set_adapter(*encoder, {"default", "fr"});
  set_scale(*encoder, "fr", 0.5);
  // By hand: linear2 gets both adapters, fr's at 2 * 0.5.
  auto plain = make_encoder(8, torch::kFloat64);
  auto reference = reference_of(*encoder);
  reference.adapt(*plain, 1.0);
  const auto params = encoder->named_parameters();
  for (const char* layer : {"layers.0.linear2", "layers.1.linear2"}) {
    auto* linear = plain->named_modules()[layer]->as<nn::LinearImpl>();
    linear->weight = linear->weight +
        1.0 *
            torch::mm(
                params[std::string(layer) + ".lora_B.fr.weight"],
                params[std::string(layer) + ".lora_A.fr.weight"]);
  }
  const auto x = torch::randn({3, 2, 16}, torch::kFloat64);
  torch::NoGradGuard no_grad;
  AdaptedWeights adapted(*encoder);
  EXPECT_TRUE(torch::allclose(encoder(x), plain(x), 0, 1e-12));
}

TEST_F(TransformerTest, AdapterFilesRoundTripWithPeftKeys) {
  const auto dir =
      std::filesystem::temp_directory_path() / "torchlora_transformer_adapter";
  std::filesystem::remove_all(dir);
  auto decoder = make_decoder(9, torch::kFloat32);
  inject_lora(decoder, LoRAConfig(4).alpha(8).target_modules(kDecoderTargets));
  randomize_adapters(*decoder);
  save_adapter(*decoder, dir.string());
  const auto tensors =
      safetensors::load((dir / "adapter_model.safetensors").string());
  EXPECT_EQ(tensors.size(), 24u);
  // peft holds an adapted attention as base_layer, its out_proj inside.
  EXPECT_EQ(
      tensors["base_model.model.layers.1.multihead_attn.lora_B.weight"].sizes(),
      torch::IntArrayRef({48, 4}));
  EXPECT_EQ(
      tensors
          ["base_model.model.layers.0.self_attn.base_layer.out_proj.lora_A.weight"]
              .sizes(),
      torch::IntArrayRef({4, 16}));

  auto loaded = make_decoder(9, torch::kFloat32);
  load_adapter(*loaded, dir.string());
  const auto target = torch::randn({3, 2, 16});
  const auto memory = torch::randn({5, 2, 16});
  torch::NoGradGuard no_grad;
  torch::Tensor want, got;
  {
    AdaptedWeights adapted(*decoder);
    want = decoder(target, memory);
  }
  {
    AdaptedWeights adapted(*loaded);
    got = loaded(target, memory);
  }
  EXPECT_TRUE(same_values(got, want));
  EXPECT_TORCHLORA_ERROR(
      save_adapter(
          *decoder,
          dir.string(),
          SaveAdapterOptions().bias(LoRABias::lora_only)),
      "save_adapter: bias = \"lora_only\" is not supported with adapted "
      "MultiheadAttention layers");
  std::filesystem::remove_all(dir);
}

TEST_F(TransformerTest, ALoneLoRALayerIsNoModelForAdapterFiles) {
  const auto dir =
      std::filesystem::temp_directory_path() / "torchlora_lone_layer_adapter";
  std::filesystem::remove_all(dir);
  torchlora::LoRAMultiheadAttention attention(
      torch::nn::MultiheadAttention(8, 2), LoRAOptions(2));
  torchlora::LoRALinear linear(torch::nn::Linear(4, 3), LoRAOptions(2));
  for (torch::nn::Module* layer :
       std::vector<torch::nn::Module*>{attention.get(), linear.get()}) {
    EXPECT_TORCHLORA_ERROR(
        save_adapter(*layer, dir.string()),
        "save_adapter: the model is itself a " + layer->name() +
            "; adapter files hold the layers of a model by their paths, and "
            "this layer has none. Register it in a module "
            "(register_module(\"layer\", ...)) and pass that module. Nothing "
            "was changed.");
    EXPECT_FALSE(std::filesystem::exists(dir));
  }
  // A file of the layer inside a model does not load into the lone layer.
  torch::nn::Sequential model;
  model->push_back(torch::nn::Linear(4, 3));
  inject_lora(model, LoRAConfig(2).target_modules({"0"}));
  save_adapter(*model, dir.string());
  EXPECT_TORCHLORA_ERROR(
      load_adapter(*linear, dir.string()),
      "load_adapter: the model is itself a torchlora::LoRALinear");
  EXPECT_EQ(linear->adapter_names(), std::vector<std::string>{"default"});
  std::filesystem::remove_all(dir);
}

TEST_F(TransformerTest, AnOutProjAdapterTheAttentionLacksKeepsItsOwnKeys) {
  const auto dir =
      std::filesystem::temp_directory_path() / "torchlora_out_proj_adapter";
  std::filesystem::remove_all(dir);
  auto encoder = make_encoder(12, torch::kFloat32);
  inject_lora(encoder, LoRAConfig(2).target_modules({"out_proj"}));
  inject_lora(
      encoder, LoRAConfig(2).adapter_name("b").target_modules({"self_attn"}));
  randomize_adapters(*encoder);
  set_adapter(*encoder, {"default"});
  save_adapter(*encoder, dir.string());
  const auto tensors =
      safetensors::load((dir / "adapter_model.safetensors").string());
  EXPECT_EQ(tensors.size(), 4u);
  EXPECT_NE(
      tensors.find(
          "base_model.model.layers.1.self_attn.out_proj.lora_B.weight"),
      nullptr);

  auto loaded = make_encoder(12, torch::kFloat32);
  load_adapter(*loaded, dir.string());
  const auto x = torch::randn({3, 2, 16});
  torch::NoGradGuard no_grad;
  AdaptedWeights adapted(*encoder);
  AdaptedWeights adapted_loaded(*loaded);
  EXPECT_TRUE(same_values(loaded(x), encoder(x)));
  std::filesystem::remove_all(dir);
}

TEST_F(TransformerTest, CloneAndToKeepTheAdaptedAttention) {
  auto encoder = make_encoder(10, torch::kFloat32);
  inject_lora(encoder, LoRAConfig(2).target_modules({"self_attn"}));
  randomize_adapters(*encoder);
  auto attention = std::dynamic_pointer_cast<LoRAMultiheadAttentionImpl>(
      encoder->named_modules()["layers.0.self_attn"]);
  ASSERT_TRUE(attention);
  auto copy =
      std::dynamic_pointer_cast<LoRAMultiheadAttentionImpl>(attention->clone());
  ASSERT_TRUE(copy);
  EXPECT_EQ(
      copy->named_parameters().keys(), attention->named_parameters().keys());
  const auto q = torch::randn({4, 2, 16});
  torch::NoGradGuard no_grad;
  torch::Tensor through_layer;
  {
    AdaptedWeights adapted(*encoder);
    through_layer = std::get<0>(
        encoder->layers[0]->as<nn::TransformerEncoderLayer>()->self_attn(
            q, q, q));
  }
  EXPECT_TRUE(torch::allclose(
      std::get<0>(copy->forward(q, q, q)), through_layer, 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(
      std::get<0>(attention->forward(q, q, q)), through_layer, 1e-6, 1e-6));

  encoder->to(torch::kFloat64);
  AdaptedWeights adapted(*encoder);
  EXPECT_EQ(encoder(q.to(torch::kFloat64)).scalar_type(), torch::kFloat64);
}

TEST_F(TransformerTest, WhatABoundMemberCannotHonourIsRefused) {
  auto encoder = make_encoder(11, torch::kFloat32);
  const auto before = torchlora_test::snapshot(*encoder);
  EXPECT_TORCHLORA_ERROR(
      inject_lora(
          encoder, LoRAConfig(2).dropout(0.1).target_modules({"linear1"})),
      "(TransformerEncoderLayer's linear1->weight) needs dropout 0, got 0.1: that "
      "LibTorch module reads the layer's weight directly");
  EXPECT_TORCHLORA_ERROR(
      inject_lora(
          encoder, LoRAConfig(2).dropout(0.1).target_modules({"self_attn"})),
      "needs dropout 0, got 0.1");
  torchlora_test::expect_unchanged(before, *encoder);
  encoder(torch::randn({2, 1, 16})); // still the plain model

  nn::MultiheadAttention separate(
      nn::MultiheadAttentionOptions(16, 2).kdim(8).vdim(8));
  EXPECT_TORCHLORA_ERROR(
      LoRAMultiheadAttention(separate, LoRAOptions(2)),
      "cannot adapt a MultiheadAttention whose kdim (8) or vdim (8) differs "
      "from embed_dim (16)");
}

} // namespace

} // namespace torchlora_transformer_test
