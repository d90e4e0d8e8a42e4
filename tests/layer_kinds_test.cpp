// LoRAEmbedding and LoRAConv1d/2d/3d as layers and inside models: fresh
// adapters, merging, unloading, errors, injection into a CNN with an
// embedding beside it, saving and loading in peft's format.
#include "test_support.h"

#include <torchlora/torchlora.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_layer_kinds_test {

using torchlora::LoRAConfig;
using torchlora::LoRAInit;
using torchlora::LoRAOptions;
using torchlora_test::base_tensors;
using torchlora_test::expect_unchanged;
using torchlora_test::snapshot;
namespace fs = std::filesystem;

namespace {

class LayerKindsTest : public torchlora_test::Seeded {
 protected:
  void SetUp() override {
    Seeded::SetUp();
    dir = ::testing::TempDir() + "/layer_kinds_" +
        ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir);
  }
  std::string dir;
};

/// A small CNN in ordinary LibTorch style: convs in a Sequential, a tag
/// embedding registered beside them, a Linear head.
struct CnnImpl : torch::nn::Module {
  CnnImpl() {
    features = register_module(
        "features",
        torch::nn::Sequential(
            torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)),
            torch::nn::ReLU(),
            torch::nn::MaxPool2d(torch::nn::MaxPool2dOptions(2)),
            torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3).padding(1)),
            torch::nn::ReLU(),
            torch::nn::AdaptiveAvgPool2d(
                torch::nn::AdaptiveAvgPool2dOptions(1))));
    register_module("embed", torch::nn::Embedding(10, 8));
    head = register_module(
        "head",
        torch::nn::Sequential(
            torch::nn::Linear(8, 16),
            torch::nn::ReLU(),
            torch::nn::Linear(16, 3)));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& tags) {
    const auto h = features->forward(x).flatten(1);
    // The registered child, whatever inject_lora made of it.
    return head->forward(
        h + torchlora::layer_forward(*named_children()["embed"], tags));
  }
  torch::nn::Sequential features{nullptr};
  torch::nn::Sequential head{nullptr};
};
TORCH_MODULE(Cnn);

/// A model author's mistake: a plain typed Embedding member.
struct TypedEmbeddingNetImpl : torch::nn::Module {
  TypedEmbeddingNetImpl() {
    embed = register_module("embed", torch::nn::Embedding(10, 4));
    out = register_module("out", torch::nn::Linear(4, 2));
  }
  torch::Tensor forward(const torch::Tensor& tags) {
    return out(embed(tags));
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear out{nullptr};
};
TORCH_MODULE(TypedEmbeddingNet);

torch::Tensor images() {
  return torch::randn({3, 1, 8, 8});
}

torch::Tensor tags() {
  return torch::tensor({1, 4, 9}, torch::kLong);
}

/// Every adapter tensor of `model` filled with random values, so that the
/// adapters change the output.
void randomize_adapters(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    if (item.key().find("lora_") != std::string::npos) {
      item.value().normal_(0, 0.5);
    }
  }
}

/// The LoRA layer at `index` of a Sequential, or null.
template <typename Impl>
std::shared_ptr<Impl> lora_at(const torch::nn::Sequential& seq, size_t index) {
  return std::dynamic_pointer_cast<Impl>(seq->ptr(index));
}

/// Fresh adapters, merging and unmerging, checked on one layer of a kind.
template <typename Layer, typename Input>
void check_merge_cycle(Layer& layer, const Input& x) {
  const auto base_output = layer->base_layer()->forward(x);
  EXPECT_TRUE(torch::equal(layer(x), base_output)) << "a fresh adapter";
  randomize_adapters(*layer);
  const auto weight_before = layer->weight.detach().clone();
  const auto adapted = layer(x);
  EXPECT_FALSE(torch::allclose(adapted, base_output, 1e-4, 1e-4));
  layer->merge();
  EXPECT_TRUE(layer->merged());
  EXPECT_TRUE(torch::allclose(layer(x), adapted, 1e-5, 1e-5));
  EXPECT_TRUE(
      torch::allclose(layer->base_layer()->forward(x), adapted, 1e-5, 1e-5));
  layer->unmerge();
  EXPECT_TRUE(torch::equal(layer->weight, weight_before))
      << "bit-exact unmerge";
  EXPECT_TRUE(torch::equal(layer(x), adapted));
}

/// `layer` with random adapters, moved to the GPU: the output and the
/// gradients match the CPU's, merging matches, unmerging is bit-exact.
template <typename Layer>
void check_on_the_gpu(Layer& layer, const torch::Tensor& x) {
  randomize_adapters(*layer);
  const auto cpu_output = layer(x);
  cpu_output.square().sum().backward();
  std::map<std::string, torch::Tensor> cpu_gradients;
  for (auto& item : layer->named_parameters()) {
    if (item.value().grad().defined()) {
      cpu_gradients[item.key()] = item.value().grad().clone();
      item.value().mutable_grad() = torch::Tensor();
    }
  }
  EXPECT_FALSE(cpu_gradients.empty());
  layer->to(torch::kCUDA);
  const auto gpu_x = x.to(torch::kCUDA);
  const auto gpu_output = layer(gpu_x);
  ASSERT_TRUE(gpu_output.is_cuda());
  EXPECT_TRUE(torch::allclose(gpu_output.cpu(), cpu_output, 1e-4, 1e-4));
  gpu_output.square().sum().backward();
  for (auto& item : layer->named_parameters()) {
    const auto& grad = item.value().grad();
    const auto expected = cpu_gradients.find(item.key());
    ASSERT_EQ(grad.defined(), expected != cpu_gradients.end()) << item.key();
    if (grad.defined()) {
      EXPECT_TRUE(torch::allclose(grad.cpu(), expected->second, 1e-3, 1e-4))
          << item.key();
    }
  }
  torch::NoGradGuard no_grad;
  const auto weight_before = layer->weight.clone();
  const auto adapted = layer(gpu_x);
  layer->merge();
  EXPECT_TRUE(layer->weight.is_cuda());
  EXPECT_TRUE(torch::allclose(layer(gpu_x), adapted, 1e-4, 1e-4));
  layer->unmerge();
  EXPECT_TRUE(torch::equal(layer->weight, weight_before));
}

} // namespace

TEST_F(LayerKindsTest, EveryKindRunsOnTheGpu_CUDA) {
  SKIP_WITHOUT_CUDA();
  torchlora::LoRAEmbedding emb(
      torch::nn::Embedding(torch::nn::EmbeddingOptions(12, 5).padding_idx(3)),
      LoRAOptions(3).alpha(6));
  check_on_the_gpu(emb, torch::tensor({{0, 3, 11}, {3, 5, 7}}, torch::kLong));
  torchlora::LoRAConv1d conv1(
      torch::nn::Conv1d(torch::nn::Conv1dOptions(3, 5, 3).stride(2)),
      LoRAOptions(2));
  check_on_the_gpu(conv1, torch::randn({2, 3, 11}));
  torchlora::LoRAConv2d conv2(
      torch::nn::Conv2d(
          torch::nn::Conv2dOptions(3, 4, 3).padding(1).padding_mode(
              torch::kReflect)),
      LoRAOptions(4).alpha(8));
  check_on_the_gpu(conv2, torch::randn({2, 3, 6, 5}));
  torchlora::LoRAConv3d conv3(
      torch::nn::Conv3d(torch::nn::Conv3dOptions(2, 3, 2).padding(1)),
      LoRAOptions(2));
  check_on_the_gpu(conv3, torch::randn({1, 2, 3, 4, 5}));
}

TEST_F(LayerKindsTest, TheDocumentedCallsCompileAndHold) {
  torchlora::LoRAEmbedding emb(
      torch::nn::Embedding(32000, 512), torchlora::LoRAOptions(8).alpha(16));
  torchlora::LoRAConv2d conv(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(64, 128, 3).padding(1)),
      torchlora::LoRAOptions(4));
  torchlora::LoRAConv1d conv1(
      torch::nn::Conv1d(torch::nn::Conv1dOptions(8, 12, 5).stride(2)),
      torchlora::LoRAOptions(2));
  Cnn cnn;
  const auto paths = torchlora::inject_lora(
      *cnn,
      torchlora::LoRAConfig(4).target_modules(
          {"features.0", "features.3", "embed"}));
  EXPECT_EQ(
      std::set<std::string>(paths.begin(), paths.end()),
      (std::set<std::string>{"features.0", "features.3", "embed"}));
  EXPECT_EQ(
      emb(torch::tensor({{1, 2, 3}})).sizes(),
      (std::vector<int64_t>{1, 3, 512}));
  EXPECT_EQ(
      conv(torch::randn({2, 64, 16, 16})).sizes(),
      (std::vector<int64_t>{2, 128, 16, 16}));
  EXPECT_EQ(
      conv1(torch::randn({2, 8, 21})).sizes(),
      (std::vector<int64_t>{2, 12, 9}));
  // Peft's names and shapes in memory.
  const auto params = emb->named_parameters();
  EXPECT_EQ(
      params["lora_embedding_A.default"].sizes(),
      (std::vector<int64_t>{8, 32000}));
  EXPECT_EQ(
      params["lora_embedding_B.default"].sizes(),
      (std::vector<int64_t>{512, 8}));
  EXPECT_EQ(
      conv->named_parameters()["lora_A.default.weight"].sizes(),
      (std::vector<int64_t>{4, 64, 3, 3}));
  EXPECT_EQ(
      conv->named_parameters()["lora_B.default.weight"].sizes(),
      (std::vector<int64_t>{128, 4, 1, 1}));
  EXPECT_DOUBLE_EQ(emb->scaling("default"), 2.0);
}

TEST_F(LayerKindsTest, EveryKindSharesItsBaseTensorsAndOptions) {
  torch::nn::Embedding base_embedding(
      torch::nn::EmbeddingOptions(6, 3).padding_idx(-1));
  torchlora::LoRAEmbedding emb(base_embedding, LoRAOptions(2));
  EXPECT_TRUE(emb->weight.is_same(base_embedding->weight));
  EXPECT_FALSE(emb->bias.defined());
  EXPECT_EQ(emb->options.padding_idx(), 5);
  EXPECT_FALSE(emb->weight.requires_grad());
  torch::nn::Conv1d base_conv(torch::nn::Conv1dOptions(2, 3, 3).dilation(2));
  torchlora::LoRAConv1d conv(base_conv, LoRAOptions(2));
  EXPECT_TRUE(conv->weight.is_same(base_conv->weight));
  EXPECT_TRUE(conv->bias.is_same(base_conv->bias));
  EXPECT_EQ(conv->options.dilation()->at(0), 2);
  const auto names = conv->named_parameters().keys();
  EXPECT_EQ(
      std::set<std::string>(names.begin(), names.end()),
      (std::set<std::string>{
          "weight", "bias", "lora_A.default.weight", "lora_B.default.weight"}));
  // Built from options: a plain trainable layer with the base's keys.
  torchlora::LoRAConv2d plain(torch::nn::Conv2dOptions(2, 3, 3));
  EXPECT_TRUE(plain->weight.requires_grad());
  EXPECT_TRUE(plain->adapter_names().empty());
  EXPECT_EQ(plain->named_parameters().size(), 2u);
  // Each kind is named as its type, on LibTorch 1.x (where Module is a
  // virtual base) and 2.x alike, clones too.
  EXPECT_EQ(emb->name(), "torchlora::LoRAEmbedding");
  EXPECT_EQ(plain->name(), "torchlora::LoRAConv2d");
  EXPECT_EQ(plain->clone()->name(), "torchlora::LoRAConv2d");
  EXPECT_EQ(torchlora::LoRALinear(3, 4)->name(), "torchlora::LoRALinear");
  EXPECT_EQ(
      torchlora::LoRAConv1d(torch::nn::Conv1dOptions(1, 1, 1))->name(),
      "torchlora::LoRAConv1d");
  std::ostringstream printed;
  emb->pretty_print(printed);
  EXPECT_EQ(
      printed.str(),
      "torchlora::LoRAEmbedding(num_embeddings=6, embedding_dim=3, "
      "padding_idx=5, rank=2, alpha=1, dropout=0)");
}

TEST_F(LayerKindsTest, APlainLoRAEmbeddingIsTheBaseEmbedding) {
  // Built from options with no adapter, every Embedding option acts as in
  // torch::nn::Embedding: values, max_norm's renormalisation of the table,
  // gradients (padding row, frequency scaling, sparse).
  const auto indices = torch::tensor({{1, 3, 3}, {0, 1, 3}});
  for (int variant = 0; variant < 4; ++variant) {
    auto options = torch::nn::EmbeddingOptions(5, 3);
    if (variant == 0) {
      options.max_norm(0.5).scale_grad_by_freq(true);
    } else if (variant == 1) {
      options.scale_grad_by_freq(true).padding_idx(3);
    } else if (variant == 2) {
      options.sparse(true).padding_idx(-2);
    } else {
      options.max_norm(0.5).norm_type(1.0);
    }
    SCOPED_TRACE("variant " + std::to_string(variant));
    torch::nn::Embedding plain(options);
    torchlora::LoRAEmbedding layer(options);
    {
      torch::NoGradGuard no_grad;
      layer->weight.copy_(plain->weight);
    }
    const auto w = torch::randn({2, 3, 3});
    const auto y_plain = plain(indices);
    const auto y = layer(indices);
    EXPECT_TRUE(torch::equal(y, y_plain));
    EXPECT_TRUE(torch::equal(layer->weight, plain->weight));
    (y_plain * w).sum().backward();
    (y * w).sum().backward();
    ASSERT_EQ(
        layer->weight.grad().is_sparse(), plain->weight.grad().is_sparse());
    EXPECT_TRUE(torch::allclose(
        layer->weight.grad().to_dense(), plain->weight.grad().to_dense()));
  }
}

TEST_F(LayerKindsTest, FreshAdaptersChangeNothingAndMergeIsExactPerKind) {
  torchlora::LoRAEmbedding emb(
      torch::nn::Embedding(torch::nn::EmbeddingOptions(12, 5).padding_idx(3)),
      LoRAOptions(3).alpha(6));
  check_merge_cycle(emb, torch::tensor({{0, 3, 11}, {3, 5, 7}}, torch::kLong));
  torchlora::LoRAConv1d conv1(
      torch::nn::Conv1d(
          torch::nn::Conv1dOptions(3, 5, 3).stride(2).dilation(2)),
      LoRAOptions(2));
  check_merge_cycle(conv1, torch::randn({2, 3, 11}));
  torchlora::LoRAConv2d conv2(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, {3, 2})
                            .padding(1)
                            .padding_mode(torch::kReflect)),
      LoRAOptions(4).alpha(8));
  check_merge_cycle(conv2, torch::randn({2, 3, 6, 5}));
  torchlora::LoRAConv3d conv3(
      torch::nn::Conv3d(torch::nn::Conv3dOptions(2, 3, {1, 1, 3}).padding(1)),
      LoRAOptions(2));
  check_merge_cycle(conv3, torch::randn({1, 2, 3, 4, 5}));
  // A grouped convolution whose adapter stays within its groups merges.
  torchlora::LoRAConv2d grouped(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 6, 3).groups(2)),
      LoRAOptions(2));
  const auto x = torch::randn({1, 4, 5, 5});
  {
    torch::NoGradGuard no_grad;
    // A's rank row r of group g reads only group g's input channels.
    auto A = grouped->named_parameters()["lora_A.default.weight"];
    A.normal_();
    A[0].narrow(0, 2, 2).zero_();
    A[1].narrow(0, 0, 2).zero_();
    grouped->named_parameters()["lora_B.default.weight"].normal_();
  }
  const auto adapted = grouped(x);
  grouped->merge();
  EXPECT_TRUE(torch::allclose(grouped(x), adapted, 1e-5, 1e-5));
  grouped->unmerge();
}

TEST_F(LayerKindsTest, GroupedConvolutionsRefuseAMergeThatCrossesGroups) {
  torchlora::LoRAConv2d layer(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 6, 3).groups(2)),
      LoRAOptions(2).init(LoRAInit::random));
  const auto x = torch::randn({1, 4, 5, 5});
  const auto before = snapshot(*layer);
  const auto adapted = layer(x);
  EXPECT_TORCHLORA_ERROR(
      layer->merge(),
      "cannot merge this LoRAConv2d: its base is a grouped convolution "
      "(groups = 2)");
  EXPECT_FALSE(layer->merged());
  expect_unchanged(before, *layer);
  // Not bit for bit: LibTorch 2.6's first grouped convolution on the CPU
  // may differ in the last bit from later ones.
  EXPECT_TRUE(torch::allclose(layer(x), adapted, 1e-6, 1e-6));
  // At model level too, before any layer changes.
  auto model = torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 1)), layer);
  torchlora::inject_lora(
      model, LoRAConfig(2).target_modules({"0"}).init(LoRAInit::random));
  const auto model_before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::merge_and_unload(model), "'1': cannot merge this LoRAConv2d");
  expect_unchanged(model_before, *model);
  EXPECT_TRUE(
      std::dynamic_pointer_cast<torchlora::LoRAConv2dImpl>(model->ptr(0)));
  EXPECT_TORCHLORA_ERROR(
      torchlora::LoRAConv2d(
          torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 6, 3).groups(2)),
          LoRAOptions(3)),
      "needs a rank divisible by the groups, got rank 3");
}

TEST_F(LayerKindsTest, WrongInputsAreNamedErrors) {
  torchlora::LoRAConv2d conv(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3)), LoRAOptions(2));
  EXPECT_TORCHLORA_ERROR(
      conv(torch::randn({2, 5, 8, 8})),
      "LoRAConv2d expects an input of shape [N, 3, H, W] or [3, H, W] "
      "(in_channels = 3), got an input of shape [2, 5, 8, 8]");
  EXPECT_TORCHLORA_ERROR(
      conv(torch::randn({2, 3, 8})), "got an input of shape [2, 3, 8]");
  torchlora::LoRAConv1d conv1(
      torch::nn::Conv1d(torch::nn::Conv1dOptions(2, 4, 3)), LoRAOptions(2));
  EXPECT_TORCHLORA_ERROR(
      conv1(torch::randn({1, 2, 3, 4})),
      "LoRAConv1d expects an input of shape [N, 2, L] or [2, L]");
  torchlora::LoRAEmbedding emb(torch::nn::Embedding(10, 4), LoRAOptions(2));
  EXPECT_TORCHLORA_ERROR(
      emb(torch::tensor({1, 10})),
      "LoRAEmbedding expects indices in [0, 10), got indices from 1 to 10");
  EXPECT_TORCHLORA_ERROR(
      emb(torch::tensor({-1, 2})), "got indices from -1 to 2");
  EXPECT_TORCHLORA_ERROR(
      emb(torch::tensor({1.0, 2.0})),
      "LoRAEmbedding expects integer indices (int64 or int32), got Float");
  EXPECT_TORCHLORA_ERROR(
      torchlora::LoRAEmbedding(
          torch::nn::Embedding(
              torch::nn::EmbeddingOptions(10, 4).max_norm(1.0)),
          LoRAOptions(2)),
      "to an Embedding with max_norm = 1");
  EXPECT_TORCHLORA_ERROR(
      torchlora::LoRAEmbedding(
          torch::nn::Embedding(torch::nn::EmbeddingOptions(10, 4).sparse(true)),
          LoRAOptions(2)),
      "to an Embedding with sparse = true");
  // A refused wrap leaves the base trainable.
  torch::nn::Embedding sparse(torch::nn::EmbeddingOptions(10, 4).sparse(true));
  EXPECT_TORCHLORA_ERROR(
      torchlora::LoRAEmbedding(sparse, LoRAOptions(2)),
      "to an Embedding with sparse = true");
  EXPECT_TRUE(sparse->weight.requires_grad());
}

/// A base layer shaped like a Linear that is not a torch::nn::Linear.
struct OtherLinearImpl : torch::nn::Cloneable<OtherLinearImpl> {
  explicit OtherLinearImpl(const torch::nn::LinearOptions& options_)
      : options(options_) {
    reset();
  }
  void reset() override {
    weight = register_parameter(
        "weight",
        torch::randn({options.out_features(), options.in_features()}));
    bias = register_parameter("bias", torch::randn({options.out_features()}));
  }
  void reset_parameters() {}
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::nn::functional::linear(x, weight, bias);
  }
  torch::nn::LinearOptions options;
  torch::Tensor weight, bias;
};
using OtherLinearLoRAImpl = torchlora::LoRALinearImplT<OtherLinearImpl>;
TORCH_MODULE(OtherLinearLoRA);

TEST_F(LayerKindsTest, LayerForwardRunsEveryOneInputKindAndNamesTheRest) {
  torch::manual_seed(3);
  struct Case {
    std::shared_ptr<torch::nn::Module> layer;
    torch::Tensor input;
    std::function<torch::Tensor()> own_forward; // as a model calls it
  };
  std::vector<Case> layers;
  const auto add = [&](auto plain, auto lora, torch::Tensor input) {
    layers.push_back(
        {plain.ptr(), input, [=]() mutable { return plain(input); }});
    layers.push_back(
        {lora.ptr(), input, [=]() mutable { return lora(input); }});
  };
  add(torch::nn::Linear(4, 3),
      torchlora::LoRALinear(torch::nn::Linear(4, 3), LoRAOptions(2)),
      torch::randn({2, 4}));
  add(torch::nn::Embedding(10, 4),
      torchlora::LoRAEmbedding(torch::nn::Embedding(10, 4), LoRAOptions(2)),
      torch::tensor({1, 7, 3}));
  add(torch::nn::Conv1d(torch::nn::Conv1dOptions(2, 3, 3)),
      torchlora::LoRAConv1d(
          torch::nn::Conv1d(torch::nn::Conv1dOptions(2, 3, 3)), LoRAOptions(2)),
      torch::randn({1, 2, 6}));
  add(torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3)),
      torchlora::LoRAConv2d(
          torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3)), LoRAOptions(2)),
      torch::randn({1, 2, 5, 5}));
  add(torch::nn::Conv3d(torch::nn::Conv3dOptions(2, 3, 2)),
      torchlora::LoRAConv3d(
          torch::nn::Conv3d(torch::nn::Conv3dOptions(2, 3, 2)), LoRAOptions(2)),
      torch::randn({1, 2, 3, 3, 3}));
  for (const auto& [layer, input, own_forward] : layers) {
    SCOPED_TRACE(layer->name());
    auto* lora = dynamic_cast<torchlora::LoRALayer*>(layer.get());
    if (lora != nullptr) {
      for (auto& B : lora->adapter_parameters()) {
        torch::NoGradGuard no_grad;
        B.normal_(); // A and B both nonzero: the adapter shows in the output
      }
    }
    EXPECT_TRUE(
        torch::equal(torchlora::layer_forward(*layer, input), own_forward()));
  }
  torch::nn::Sequential sequential(torch::nn::Linear(4, 3));
  OtherLinearLoRA other(torch::nn::LinearOptions(4, 3));
  EXPECT_TORCHLORA_ERROR(
      torchlora::layer_forward(*other, torch::randn({2, 4})),
      "layer_forward runs the LoRA layers of torch::nn::Linear, Embedding, "
      "Conv1d, Conv2d, Conv3d and MultiheadAttention layers; this "
      "torchlora::LoRALinear wraps another base layer: call its own forward");
  EXPECT_TORCHLORA_ERROR(
      torchlora::layer_forward(*sequential, torch::randn({2, 4})),
      "layer_forward needs a layer torchlora adapts (torch::nn::Linear, "
      "Embedding, Conv1d, Conv2d, Conv3d and MultiheadAttention layers and "
      "their torchlora LoRA layers), got a torch::nn::Sequential");
  torch::nn::MultiheadAttention attention(8, 2);
  EXPECT_TORCHLORA_ERROR(
      torchlora::layer_forward(*attention, torch::randn({3, 1, 8})),
      "layer_forward runs layers with one input; a "
      "torch::nn::MultiheadAttention takes several: call its own forward");
}

/// A grouped convolution (groups = 2) and a Linear after it.
struct GroupedNetImpl : torch::nn::Module {
  GroupedNetImpl() {
    features = register_module(
        "features",
        torch::nn::Sequential(
            torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3).groups(2)),
            torch::nn::ReLU(),
            torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3))));
    head =
        register_module("head", torch::nn::Sequential(torch::nn::Linear(4, 4)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return head->forward(features->forward(x).mean({2, 3}));
  }
  torch::nn::Sequential features{nullptr};
  torch::nn::Sequential head{nullptr};
};
TORCH_MODULE(GroupedNet);

TEST_F(LayerKindsTest, ARefusedInjectionKeepsEachLayersActiveAdapters) {
  torch::manual_seed(5);
  GroupedNet model;
  const auto random = LoRAInit::random;
  inject_lora(
      model,
      LoRAConfig(2).adapter_name("a").init(random).target_modules({"head.0"}));
  inject_lora(
      model,
      LoRAConfig(2).adapter_name("b").init(random).target_modules(
          {"features.2"}));
  torchlora::set_adapter(*model, "b"); // head.0 has no active adapter now
  auto* head = dynamic_cast<torchlora::LoRALayer*>(
      model->head->named_children()["0"].get());
  ASSERT_NE(head, nullptr);
  ASSERT_TRUE(head->active_adapters().empty());
  const auto x = torch::randn({1, 4, 7, 7});
  const auto before = snapshot(*model);
  const auto output = model(x);
  // head.0 takes the adapter in place before the grouped convolution
  // (the layers are changed from the last) refuses rank 3.
  EXPECT_TORCHLORA_ERROR(
      inject_lora(
          model, LoRAConfig(3).target_modules({"features.0", "head.0"})),
      "cannot adapt 'features.0': adapter \"default\" on a grouped "
      "convolution (groups = 2) needs a rank divisible by the groups, got "
      "rank 3");
  expect_unchanged(before, *model);
  EXPECT_TRUE(head->active_adapters().empty());
  EXPECT_EQ(head->adapter_names(), std::vector<std::string>{"a"});
  EXPECT_TRUE(torch::equal(model(x), output));
}

TEST_F(LayerKindsTest, InjectIntoACnnWithAnEmbeddingTakesEffect) {
  Cnn model;
  const auto x = images();
  const auto t = tags();
  const auto base_output = model(x, t);
  const auto bases = base_tensors(*model);
  torchlora::inject_lora(
      *model,
      LoRAConfig(2).alpha(4).target_modules(
          {"features.0", "features.3", "embed"}));
  EXPECT_TRUE(lora_at<torchlora::LoRAConv2dImpl>(model->features, 0));
  EXPECT_TRUE(lora_at<torchlora::LoRAConv2dImpl>(model->features, 3));
  EXPECT_TRUE(
      model->named_children()["embed"]->as<torchlora::LoRAEmbeddingImpl>());
  EXPECT_TRUE(torch::equal(model(x, t), base_output)) << "fresh adapters";
  randomize_adapters(*model);
  const auto adapted = model(x, t);
  EXPECT_FALSE(torch::allclose(adapted, base_output, 1e-4, 1e-4));
  // The base keys and values are unchanged; only adapters train.
  const auto after = base_tensors(*model);
  ASSERT_EQ(after.size(), bases.size());
  for (const auto& [name, value] : bases) {
    ASSERT_TRUE(after.count(name)) << name;
    EXPECT_TRUE(torch::equal(after.at(name), value)) << name;
  }
  const auto count = torchlora::count_parameters(*model);
  EXPECT_EQ(
      count.trainable,
      (2 * 1 * 9 + 4 * 2) + (2 * 4 * 9 + 8 * 2) + (2 * 10 + 8 * 2));
  model(x, t).sum().backward();
  for (const auto& item : model->named_parameters()) {
    EXPECT_EQ(
        item.value().grad().defined(),
        item.key().find("lora_") != std::string::npos)
        << item.key();
  }
  // Switching off, and a second adapter.
  {
    torchlora::DisableAdapters off(*model);
    EXPECT_TRUE(torch::equal(model(x, t), base_output));
  }
  torchlora::inject_lora(
      *model,
      LoRAConfig(2).adapter_name("other").target_modules(
          {"features.3", "embed"}));
  torchlora::set_adapter(*model, "other");
  EXPECT_TRUE(torch::equal(model(x, t), base_output)) << "fresh 'other'";
  torchlora::set_adapter(*model, "default");
  EXPECT_TRUE(torch::equal(model(x, t), adapted));
  torchlora::delete_adapter(*model, "other");
  // merge_and_unload gives the plain types back with the adapted output.
  torchlora::merge_and_unload(*model);
  EXPECT_TRUE(model->features->ptr(0)->as<torch::nn::Conv2dImpl>());
  EXPECT_TRUE(model->features->ptr(3)->as<torch::nn::Conv2dImpl>());
  EXPECT_TRUE(model->named_children()["embed"]->as<torch::nn::EmbeddingImpl>());
  EXPECT_TRUE(torch::allclose(model(x, t), adapted, 1e-5, 1e-5));
  for (const auto& item : model->named_parameters()) {
    EXPECT_EQ(item.key().find("lora_"), std::string::npos) << item.key();
  }
}

TEST_F(LayerKindsTest, AllLinearTakesLinearLayersOnly) {
  Cnn model;
  const auto paths = torchlora::inject_lora(
      *model, LoRAConfig(2).target_modules({"all-linear"}));
  EXPECT_EQ(paths, (std::vector<std::string>{"head.0", "head.2"}));
  EXPECT_TRUE(model->features->ptr(0)->as<torch::nn::Conv2dImpl>());
  EXPECT_TRUE(model->named_children()["embed"]->as<torch::nn::EmbeddingImpl>());
}

TEST_F(LayerKindsTest, ATargetedTypedPlainEmbeddingMemberIsRefused) {
  TypedEmbeddingNet model;
  const auto before = snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::inject_lora(
          *model, LoRAConfig(2).target_modules({"embed", "out"})),
      "cannot adapt 'embed': this torch::nn::Embedding is also held outside "
      "the model's registry and containers");
  EXPECT_TORCHLORA_ERROR(
      torchlora::inject_lora(*model, LoRAConfig(2).target_modules({"embed"})),
      "Declare the member as `torchlora::LoRAEmbedding embed{nullptr};`");
  expect_unchanged(before, *model);
  EXPECT_TRUE(model->named_children()["out"]->as<torch::nn::LinearImpl>());
}

TEST_F(LayerKindsTest, SavedAdaptersHavePeftsKeysAndLoadIntoAFreshModel) {
  Cnn trained;
  Cnn fresh;
  torch::save(trained, dir + ".base.pt");
  torch::load(fresh, dir + ".base.pt");
  const auto config = LoRAConfig(2)
                          .alpha(4)
                          .target_modules({"features.0", "features.3", "embed"})
                          .modules_to_save({"head"});
  torchlora::inject_lora(*trained, config);
  randomize_adapters(*trained);
  {
    torch::NoGradGuard no_grad;
    trained->head->ptr(2)->as<torch::nn::LinearImpl>()->weight.add_(1);
  }
  torchlora::save_adapter(*trained, dir, config);
  const auto tensors =
      torchlora::safetensors::load(dir + "/adapter_model.safetensors");
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& item : tensors) {
    shapes[item.key()] = item.value().sizes().vec();
  }
  const std::string p = "base_model.model.";
  EXPECT_EQ(
      shapes.at(p + "embed.lora_embedding_A"), (std::vector<int64_t>{2, 10}));
  EXPECT_EQ(
      shapes.at(p + "embed.lora_embedding_B"), (std::vector<int64_t>{8, 2}));
  EXPECT_EQ(
      shapes.at(p + "features.0.lora_A.weight"),
      (std::vector<int64_t>{2, 1, 3, 3}));
  EXPECT_EQ(
      shapes.at(p + "features.0.lora_B.weight"),
      (std::vector<int64_t>{4, 2, 1, 1}));
  EXPECT_EQ(
      shapes.at(p + "features.3.lora_A.weight"),
      (std::vector<int64_t>{2, 4, 3, 3}));
  EXPECT_EQ(
      shapes.at(p + "features.3.lora_B.weight"),
      (std::vector<int64_t>{8, 2, 1, 1}));
  EXPECT_EQ(shapes.at(p + "head.2.weight"), (std::vector<int64_t>{3, 16}));
  std::ifstream config_file(dir + "/adapter_config.json");
  const auto json = nlohmann::json::parse(config_file);
  EXPECT_EQ(json.at("r"), 2);
  EXPECT_EQ(json.at("peft_type"), "LORA");

  const auto x = images();
  const auto t = tags();
  torchlora::load_adapter(*fresh, dir);
  EXPECT_TRUE(torch::equal(fresh(x, t), trained(x, t)));
  EXPECT_TRUE(lora_at<torchlora::LoRAConv2dImpl>(fresh->features, 3));
  EXPECT_TRUE(
      fresh->named_children()["embed"]->as<torchlora::LoRAEmbeddingImpl>());
  // A file whose conv matrix has another kernel is refused, naming it.
  Cnn other;
  torch::load(other, dir + ".base.pt");
  auto bad = tensors;
  bad[p + "features.0.lora_A.weight"] = torch::zeros({2, 1, 2, 2});
  torchlora::safetensors::save(dir + "/adapter_model.safetensors", bad);
  const auto before = snapshot(*other);
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*other, dir), "features.0.lora_A.weight");
  expect_unchanged(before, *other);
}

TEST_F(LayerKindsTest, LoadingIntoAnExistingAdapterNeedsTheFilesScaling) {
  Cnn saved;
  torch::save(saved, dir + ".base.pt");
  const auto config = LoRAConfig(2).alpha(5).use_rslora(true).target_modules(
      {"features.0", "embed"});
  torchlora::inject_lora(*saved, config);
  randomize_adapters(*saved);
  torchlora::save_adapter(*saved, dir, config);
  // Only tensors are copied into an existing adapter, so its scaling must
  // be the file's.
  Cnn other;
  torch::load(other, dir + ".base.pt");
  torchlora::inject_lora(
      *other, LoRAConfig(2).alpha(1).target_modules({"features.0", "embed"}));
  const auto before = snapshot(*other);
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*other, dir),
      "load_adapter: 'features.0' already has adapter \"default\" with "
      "alpha = 1, use_rslora = 0, but the file's config gives it alpha = 5, "
      "use_rslora = 1");
  expect_unchanged(before, *other);
  // Into an adapter of the same scaling it loads, with the same output.
  Cnn same;
  torch::load(same, dir + ".base.pt");
  torchlora::inject_lora(*same, config);
  torchlora::load_adapter(*same, dir);
  const auto x = images();
  EXPECT_TRUE(torch::equal(same(x, tags()), saved(x, tags())));
}

TEST_F(LayerKindsTest, AFailedLoadLeavesAMergedLayerMerged) {
  torchlora::LoRAConv2d layer(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3)),
      LoRAOptions(2).init(LoRAInit::random));
  const auto x = torch::randn({1, 3, 5, 5});
  layer->merge();
  const auto merged_output = layer(x);
  const auto before = snapshot(*layer);
  // A checkpoint of the plain convolution has no adapters.
  torch::nn::Conv2d plain(torch::nn::Conv2dOptions(3, 4, 3));
  std::stringstream stream;
  torch::save(plain, stream);
  // LibTorch's own error, naming what the checkpoint lacks.
  EXPECT_LIBTORCH_ERROR(torch::load(layer, stream), "lora_A");
  EXPECT_TRUE(layer->merged());
  expect_unchanged(before, *layer);
  EXPECT_TRUE(torch::equal(layer(x), merged_output));
  layer->unmerge(); // the weight from before merge() is still there
  EXPECT_FALSE(torch::allclose(layer->weight, before.at("weight").values));
}

TEST_F(LayerKindsTest, ChannelsLastWeightsMergeAsContiguousOnes) {
  torchlora::LoRAConv2d layer(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 5, 3).padding(1)),
      LoRAOptions(2).init(LoRAInit::random));
  torchlora::LoRAConv2d contiguous(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 5, 3).padding(1)),
      LoRAOptions(2));
  {
    torch::NoGradGuard no_grad;
    for (auto& item : contiguous->named_parameters()) {
      item.value().copy_(layer->named_parameters()[item.key()]);
    }
  }
  layer->weight.set_data(
      layer->weight.contiguous(at::MemoryFormat::ChannelsLast));
  const auto before = layer->weight.detach().clone(at::MemoryFormat::Preserve);
  const auto x = torch::randn({2, 3, 6, 6});
  const auto adapted = layer(x);
  layer->merge();
  contiguous->merge();
  EXPECT_TRUE(torch::allclose(layer(x), adapted, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(layer->weight, contiguous->weight, 1e-6, 1e-6));
  layer->unmerge();
  EXPECT_TRUE(torch::equal(layer->weight, before));
}

TEST_F(LayerKindsTest, InjectionErrorsOfALayerKindNameTheLayer) {
  auto blocks = torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 1)),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 6, 3).groups(2)));
  const auto before = snapshot(*blocks);
  const auto tree = torchlora_test::module_tree(*blocks);
  EXPECT_TORCHLORA_ERROR(
      torchlora::inject_lora(blocks, LoRAConfig(3).target_modules({"0", "1"})),
      "cannot adapt '1': adapter \"default\" on a grouped convolution "
      "(groups = 2) needs a rank divisible by the groups, got rank 3");
  expect_unchanged(before, *blocks);
  EXPECT_EQ(torchlora_test::module_tree(*blocks), tree);
  torch::nn::ModuleDict tables(
      std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{
          {"tok", std::make_shared<torch::nn::EmbeddingImpl>(10, 4)},
          {"pos",
           std::make_shared<torch::nn::EmbeddingImpl>(
               torch::nn::EmbeddingOptions(8, 4).max_norm(1.0))}});
  EXPECT_TORCHLORA_ERROR(
      torchlora::inject_lora(
          tables, LoRAConfig(2).target_modules({"tok", "pos"})),
      "cannot adapt 'pos': cannot add adapter \"default\" to an Embedding "
      "with max_norm = 1");
  EXPECT_TRUE(tables["tok"]->as<torch::nn::EmbeddingImpl>());
}

TEST_F(LayerKindsTest, GroupedMergesTellNonFiniteAndZeroScaledAdapters) {
  torchlora::LoRAConv2d layer(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 6, 3).groups(2)),
      LoRAOptions(2).init(LoRAInit::random));
  const auto x = torch::randn({1, 4, 5, 5});
  // Scaled by 0, an adapter across groups changes nothing: it merges.
  layer->set_scale("default", 0.0);
  const auto base_output = layer(x);
  layer->merge();
  EXPECT_TRUE(torch::allclose(layer(x), base_output, 1e-6, 1e-6));
  layer->unmerge();
  layer->set_scale("default", 1.0);
  {
    torch::NoGradGuard no_grad;
    layer->named_parameters()["lora_B.default.weight"].fill_(NAN);
  }
  const auto before = snapshot(*layer);
  EXPECT_TORCHLORA_ERROR(
      layer->merge(), "the adapter's weights are not finite (");
  expect_unchanged(before, *layer);
}

TEST_F(LayerKindsTest, APlainSparseEmbeddingRefusesFrequencyScalingAsLibTorch) {
  const auto options =
      torch::nn::EmbeddingOptions(6, 3).sparse(true).scale_grad_by_freq(true);
  torchlora::LoRAEmbedding layer(options);
  torch::nn::Embedding plain(options);
  const auto t = torch::tensor({1, 1, 4}, torch::kLong);
  // LibTorch's own error, the same for both.
  std::string plain_message, layer_message;
  try {
    plain(t).sum().backward();
  } catch (const c10::Error& error) {
    plain_message = torchlora_test::message_of(error);
  }
  try {
    layer(t).sum().backward();
  } catch (const c10::Error& error) {
    layer_message = torchlora_test::message_of(error);
  }
  EXPECT_NE(plain_message.find("scale_grad_by_freq"), std::string::npos)
      << plain_message;
  EXPECT_EQ(layer_message, plain_message);
}

} // namespace torchlora_layer_kinds_test
