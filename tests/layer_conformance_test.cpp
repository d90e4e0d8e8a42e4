// What every LoRA layer kind promises, run for each kind (a typed test
// suite): adding a kind to `Kinds` below is all it takes to test it here.
#include "test_support.h"

#include <torchlora/torchlora.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_layer_conformance_test {

namespace {

using torchlora::LoRAInit;
using torchlora::LoRAOptions;
using torchlora_test::expect_unchanged;
using torchlora_test::snapshot;

/// Each kind: its plain layer (float64), an input, how to call both, and
/// the names of its adapter matrices (as in peft).
struct LinearKind {
  using Plain = torch::nn::Linear;
  using LoRA = torchlora::LoRALinear;
  static constexpr const char* kPrefix = "lora_";
  static constexpr bool kMatrixHasWeight = true;
  static constexpr bool kRoutesRows = true;
  static constexpr bool kOutputLinearInWeight = true;
  static Plain plain() {
    return Plain(torch::nn::LinearOptions(6, 5));
  }
  static torch::Tensor input() {
    return torch::randn({4, 6}, torch::kDouble);
  }
  template <typename Layer>
  static torch::Tensor run(Layer& layer, const torch::Tensor& x) {
    return layer(x);
  }
};

struct EmbeddingKind {
  using Plain = torch::nn::Embedding;
  using LoRA = torchlora::LoRAEmbedding;
  static constexpr const char* kPrefix = "lora_embedding_";
  static constexpr bool kMatrixHasWeight = false;
  static constexpr bool kRoutesRows = true;
  static constexpr bool kOutputLinearInWeight = true;
  static Plain plain() {
    return Plain(torch::nn::EmbeddingOptions(10, 4));
  }
  static torch::Tensor input() {
    return torch::randint(0, 10, {4, 3}, torch::kLong);
  }
  template <typename Layer>
  static torch::Tensor run(Layer& layer, const torch::Tensor& x) {
    return layer(x);
  }
};

template <size_t D, typename PlainT, typename LoRAT, int64_t... InputShape>
struct ConvKind {
  using Plain = PlainT;
  using LoRA = LoRAT;
  static constexpr const char* kPrefix = "lora_";
  static constexpr bool kMatrixHasWeight = true;
  static constexpr bool kRoutesRows = true;
  static constexpr bool kOutputLinearInWeight = true;
  static Plain plain() {
    return Plain(torch::nn::ConvOptions<D>(3, 4, 3).padding(1));
  }
  static torch::Tensor input() {
    return torch::randn({InputShape...}, torch::kDouble);
  }
  template <typename Layer>
  static torch::Tensor run(Layer& layer, const torch::Tensor& x) {
    return layer(x);
  }
};
using Conv1dKind =
    ConvKind<1, torch::nn::Conv1d, torchlora::LoRAConv1d, 4, 3, 7>;
using Conv2dKind =
    ConvKind<2, torch::nn::Conv2d, torchlora::LoRAConv2d, 4, 3, 5, 5>;
using Conv3dKind =
    ConvKind<3, torch::nn::Conv3d, torchlora::LoRAConv3d, 4, 3, 4, 4, 4>;

struct MultiheadAttentionKind {
  using Plain = torch::nn::MultiheadAttention;
  using LoRA = torchlora::LoRAMultiheadAttention;
  static constexpr const char* kPrefix = "lora_";
  static constexpr bool kMatrixHasWeight = true;
  static constexpr bool kRoutesRows = false;
  static constexpr bool kOutputLinearInWeight = false;
  static Plain plain() {
    return Plain(torch::nn::MultiheadAttentionOptions(8, 2));
  }
  static torch::Tensor input() {
    return torch::randn({5, 4, 8}, torch::kDouble); // [tokens, batch, embed]
  }
  template <typename Layer>
  static torch::Tensor run(Layer& layer, const torch::Tensor& x) {
    return std::get<0>(layer(x, x, x));
  }
};

using Kinds = ::testing::Types<
    LinearKind,
    EmbeddingKind,
    Conv1dKind,
    Conv2dKind,
    Conv3dKind,
    MultiheadAttentionKind>;

/// The gtest names of the kinds, for readable test names.
struct KindNames {
  template <typename T>
  static std::string GetName(int) {
    if (std::is_same<T, LinearKind>::value)
      return "Linear";
    if (std::is_same<T, EmbeddingKind>::value)
      return "Embedding";
    if (std::is_same<T, Conv1dKind>::value)
      return "Conv1d";
    if (std::is_same<T, Conv2dKind>::value)
      return "Conv2d";
    if (std::is_same<T, Conv3dKind>::value)
      return "Conv3d";
    return "MultiheadAttention";
  }
};

double value_of(const torch::Tensor& scalar) {
  return scalar.item<double>();
}

template <typename Kind>
class LayerConformanceTest : public torchlora_test::Seeded {
 protected:
  using Plain = typename Kind::Plain;
  using LoRA = typename Kind::LoRA;

  /// A float64 plain layer.
  static Plain plain() {
    auto layer = Kind::plain();
    layer->to(torch::kDouble);
    return layer;
  }

  /// The in-memory name of matrix `matrix` of adapter `adapter`.
  static std::string matrix_name(
      const char* matrix,
      const std::string& adapter) {
    return std::string(Kind::kPrefix) + matrix + "." + adapter +
        (Kind::kMatrixHasWeight ? ".weight" : "");
  }

  /// Options whose adapter changes the output (B and A both random).
  static LoRAOptions changing(int64_t rank = 2) {
    return LoRAOptions(rank).alpha(3).init(LoRAInit::random);
  }

  static void expect_close(const torch::Tensor& a, const torch::Tensor& b) {
    ASSERT_EQ(a.sizes(), b.sizes());
    EXPECT_TRUE(torch::allclose(a, b, /*rtol=*/1e-9, /*atol=*/1e-10))
        << (a - b).abs().max().item<double>();
  }
};

TYPED_TEST_SUITE(LayerConformanceTest, Kinds, KindNames);

TYPED_TEST(LayerConformanceTest, AFreshAdapterChangesNothing) {
  auto plain = this->plain();
  const auto x = TypeParam::input();
  const auto expected = TypeParam::run(plain, x).detach().clone();
  typename TypeParam::LoRA layer(plain, LoRAOptions(4).alpha(8));
  this->expect_close(TypeParam::run(layer, x), expected);
  EXPECT_FALSE(layer->weight.requires_grad()); // the base is frozen
  EXPECT_EQ(
      layer->weight.data_ptr(),
      plain->named_parameters().begin()->value().data_ptr())
      << "the base tensors are shared, not copied";
}

TYPED_TEST(LayerConformanceTest, MergeMatchesUnmergedAndUnmergeIsExact) {
  auto plain = this->plain();
  const auto x = TypeParam::input();
  typename TypeParam::LoRA layer(plain, this->changing());
  const auto unmerged = TypeParam::run(layer, x).detach().clone();
  EXPECT_FALSE(torch::allclose(unmerged, TypeParam::run(plain, x)))
      << "the adapter must change the output for this test to mean anything";
  const auto weight = layer->weight.detach().clone();
  layer->merge();
  EXPECT_TRUE(layer->merged());
  this->expect_close(TypeParam::run(layer, x), unmerged);
  layer->unmerge();
  EXPECT_TRUE(torch::equal(layer->weight, weight)) << "unmerge is bit for bit";
  layer->merge_in_place();
  this->expect_close(TypeParam::run(layer, x), unmerged);
  layer->unmerge();
  this->expect_close(layer->weight, weight);
}

// The active adapters' deltas add up in the weight the layer computes with,
// and so in the output where it is linear in the weight (every kind but the
// attention, whose softmax is not).
TYPED_TEST(LayerConformanceTest, SeveralAdaptersAddUp) {
  auto plain = this->plain();
  const auto x = TypeParam::input();
  typename TypeParam::LoRA layer(plain, this->changing());
  layer->add_adapter("second", this->changing(3));
  const auto base = TypeParam::run(plain, x).detach();
  const auto weight = layer->weight.detach();
  layer->set_active_adapters({"default"});
  const auto first = TypeParam::run(layer, x).detach() - base;
  const auto first_delta = layer->adapted_weight().detach() - weight;
  layer->set_active_adapters({"second"});
  const auto second = TypeParam::run(layer, x).detach() - base;
  const auto second_delta = layer->adapted_weight().detach() - weight;
  layer->set_active_adapters({"default", "second"});
  this->expect_close(
      layer->adapted_weight(), weight + first_delta + second_delta);
  if (TypeParam::kOutputLinearInWeight) {
    this->expect_close(TypeParam::run(layer, x), base + first + second);
  }
  layer->set_scale("second", 0.5);
  this->expect_close(
      layer->adapted_weight(), weight + first_delta + 0.5 * second_delta);
  if (TypeParam::kOutputLinearInWeight) {
    this->expect_close(TypeParam::run(layer, x), base + first + 0.5 * second);
  }
  {
    torchlora::DisableAdapters off(*layer);
    this->expect_close(TypeParam::run(layer, x), base);
  }
  layer->delete_adapter("default");
  EXPECT_EQ(layer->adapter_names(), std::vector<std::string>{"second"});
  EXPECT_EQ(
      layer->named_parameters().find(this->matrix_name("A", "default")),
      nullptr);
}

// The adapted weight (what `AdaptedWeights` gives LibTorch's modules) is
// differentiable in A and B to the second order. The loss <W', G> is linear
// in A and in B, so differences of the unrecorded weight are exact
// references for the first and second derivatives.
TYPED_TEST(LayerConformanceTest, AdaptedWeightGradientsMatchDifferences) {
  auto plain = this->plain();
  typename TypeParam::LoRA layer(plain, this->changing());
  auto params = layer->named_parameters();
  torch::Tensor A = params[this->matrix_name("A", "default")];
  torch::Tensor B = params[this->matrix_name("B", "default")];
  const torch::Tensor G = torch::randn_like(layer->weight);
  const torch::Tensor U = torch::randn_like(A);
  const torch::Tensor V = torch::randn_like(A);
  const torch::Tensor W = torch::randn_like(B);
  auto loss = [&]() -> torch::Tensor {
    return (layer->adapted_weight() * G).sum();
  };
  auto grad_A = [&](bool create_graph) -> torch::Tensor {
    return torch::autograd::grad(
        {loss()}, {A}, {}, /*retain_graph=*/true, create_graph)[0];
  };
  auto shifted = [&](torch::Tensor& tensor, const torch::Tensor& by) {
    torch::NoGradGuard no_grad;
    tensor.add_(by);
  };

  const torch::Tensor g_A = grad_A(false);
  double before = 0;
  double after = 0;
  {
    torch::NoGradGuard no_grad;
    before = value_of(loss());
  }
  shifted(A, U);
  {
    torch::NoGradGuard no_grad;
    after = value_of(loss());
  }
  shifted(A, -U);
  EXPECT_NEAR(value_of((g_A * U).sum()), after - before, 1e-8);

  const torch::Tensor g_A_graph = grad_A(true);
  const torch::Tensor h_B =
      torch::autograd::grad({(g_A_graph * V).sum()}, {B})[0];
  shifted(B, W);
  const torch::Tensor g_A_moved = grad_A(false);
  shifted(B, -W);
  EXPECT_NEAR(
      value_of((h_B * W).sum()), value_of(((g_A_moved - g_A) * V).sum()), 1e-8);
}

TYPED_TEST(LayerConformanceTest, MatricesHavePeftsNamesAndShapes) {
  auto plain = this->plain();
  typename TypeParam::LoRA layer(plain, LoRAOptions(3));
  layer->add_adapter("fr", LoRAOptions(5));
  const auto params = layer->named_parameters();
  for (const auto& [adapter, rank] :
       std::vector<std::pair<std::string, int64_t>>{
           {"default", 3}, {"fr", 5}}) {
    const auto* A = params.find(this->matrix_name("A", adapter));
    const auto* B = params.find(this->matrix_name("B", adapter));
    ASSERT_NE(A, nullptr) << this->matrix_name("A", adapter);
    ASSERT_NE(B, nullptr) << this->matrix_name("B", adapter);
    // A has the rank in its first dimension and B in its second, whatever
    // the kind's layout around it.
    EXPECT_EQ(A->size(0), rank);
    EXPECT_EQ(B->size(1), rank);
  }
  EXPECT_EQ(layer->adapter_parameters().size(), 4u);
}

TYPED_TEST(LayerConformanceTest, AdapterFilesRoundTripWithPeftKeys) {
  namespace fs = std::filesystem;
  const auto x = TypeParam::input();
  // Adapted the way a file's adapter is: by inject_lora (which also adapts
  // a MultiheadAttention's out_proj, as peft does).
  auto model = std::make_shared<torch::nn::Module>();
  model->register_module("layer", this->plain().ptr());
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(2)
          .alpha(3)
          .init(LoRAInit::random)
          .target_modules({"layer"}));
  typename TypeParam::LoRA layer(
      std::dynamic_pointer_cast<typename TypeParam::LoRA::Impl>(
          model->named_children()["layer"]));
  ASSERT_FALSE(layer.is_empty());
  auto plain = layer->base_layer();
  const auto dir = fs::temp_directory_path() /
      ("torchlora_conformance_" + std::string(TypeParam::LoRA::Impl::kName));
  fs::remove_all(dir);
  torchlora::save_adapter(model, dir.string());

  const auto tensors = torchlora::safetensors::load(
      (dir / "adapter_model.safetensors").string());
  for (const char* matrix : {"A", "B"}) {
    const auto key = std::string("base_model.model.layer.") +
        TypeParam::kPrefix + matrix +
        (TypeParam::kMatrixHasWeight ? ".weight" : "");
    EXPECT_NE(tensors.find(key), nullptr) << key;
  }

  // The same base in a new model: loading the file gives the same layer.
  // (Only the model holds it: inject_lora refuses a layer held elsewhere.)
  auto fresh = std::make_shared<torch::nn::Module>();
  {
    auto base_copy = this->plain();
    torch::NoGradGuard no_grad;
    auto copies = base_copy->named_parameters();
    for (const auto& item : plain->named_parameters()) {
      if (auto* copy = copies.find(item.key())) { // base tensors only
        copy->copy_(item.value());
      }
    }
    fresh->register_module("layer", base_copy.ptr());
  }
  torchlora::load_adapter(fresh, dir.string());
  auto loaded_impl = std::dynamic_pointer_cast<typename TypeParam::LoRA::Impl>(
      fresh->named_children()["layer"]);
  ASSERT_NE(loaded_impl, nullptr);
  typename TypeParam::LoRA loaded(loaded_impl);
  this->expect_close(TypeParam::run(loaded, x), TypeParam::run(layer, x));
  fs::remove_all(dir);
}

TYPED_TEST(LayerConformanceTest, CloneIsDeepAndToConverts) {
  auto plain = this->plain();
  const auto x = TypeParam::input();
  typename TypeParam::LoRA layer(plain, this->changing());
  const auto expected = TypeParam::run(layer, x).detach().clone();
  auto copy_impl =
      std::dynamic_pointer_cast<typename TypeParam::LoRA::Impl>(layer->clone());
  ASSERT_NE(copy_impl, nullptr);
  typename TypeParam::LoRA copy(copy_impl);
  this->expect_close(TypeParam::run(copy, x), expected);
  EXPECT_NE(copy->weight.data_ptr(), layer->weight.data_ptr());
  {
    torch::NoGradGuard no_grad;
    copy->named_parameters()[this->matrix_name("B", "default")].add_(1.0);
  }
  this->expect_close(
      TypeParam::run(layer, x), expected); // the original is untouched
  EXPECT_EQ(copy->adapter_names(), layer->adapter_names());

  layer->to(torch::kFloat);
  EXPECT_EQ(layer->weight.scalar_type(), torch::kFloat);
  EXPECT_EQ(
      layer->named_parameters()[this->matrix_name("A", "default")]
          .scalar_type(),
      torch::kFloat);
  const auto x32 = x.is_floating_point() ? x.to(torch::kFloat) : x;
  EXPECT_TRUE(torch::allclose(
      TypeParam::run(layer, x32).to(torch::kDouble), expected, 1e-4, 1e-4));
}

TYPED_TEST(LayerConformanceTest, BadCallsAreRefusedAndChangeNothing) {
  auto plain = this->plain();
  typename TypeParam::LoRA layer(plain, this->changing());
  const auto before = snapshot(*layer);
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("zero", LoRAOptions(0)), "needs a rank > 0, got 0");
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("default", LoRAOptions(2)),
      "already has an adapter named \"default\"");
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("a.b", LoRAOptions(2)), "must not contain '.'");
  EXPECT_TORCHLORA_ERROR(
      layer->set_scale("default", std::numeric_limits<double>::quiet_NaN()),
      "needs a finite scale");
  EXPECT_TORCHLORA_ERROR(
      layer->set_scale("missing", 1.0), "has no adapter named \"missing\"");
  expect_unchanged(before, *layer);
  layer->merge();
  EXPECT_TORCHLORA_ERROR(
      layer->add_adapter("late", LoRAOptions(2)), "on a merged layer");
  EXPECT_TORCHLORA_ERROR(
      layer->set_adapters_enabled(false),
      "cannot disable the adapters of a merged layer");
  layer->unmerge();
  expect_unchanged(before, *layer);
}

TYPED_TEST(LayerConformanceTest, RowsAreRoutedToTheirAdaptersWhereSupported) {
  auto plain = this->plain();
  const auto x = TypeParam::input();
  typename TypeParam::LoRA layer(plain, this->changing());
  layer->add_adapter("second", this->changing(3));
  auto model = std::make_shared<torch::nn::Module>();
  model->register_module("layer", layer.ptr());
  const auto rows = x.size(0);
  std::vector<std::string> names;
  for (int64_t i = 0; i < rows; ++i) {
    names.push_back(i % 2 == 0 ? "default" : "second");
  }
  if (!TypeParam::kRoutesRows) {
    torchlora::AdapterRouting routing(model, names);
    EXPECT_TORCHLORA_ERROR(TypeParam::run(layer, x), "cannot route rows");
    return;
  }
  torch::Tensor routed;
  {
    torchlora::AdapterRouting routing(model, names);
    routed = TypeParam::run(layer, x).detach();
  }
  for (const auto* adapter : {"default", "second"}) {
    layer->set_active_adapters({adapter});
    const auto alone = TypeParam::run(layer, x).detach();
    for (int64_t i = 0; i < rows; ++i) {
      if (names[static_cast<size_t>(i)] == adapter) {
        this->expect_close(routed[i], alone[i]);
      }
    }
  }
}

} // namespace

} // namespace torchlora_layer_conformance_test
