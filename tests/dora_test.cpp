// DoRA (use_dora) on every layer kind that takes it, against its formula
// written with plain ops in float64: the adapted weight
// `W + sum over adapters of (DoRA: g (W + s dW) - W; LoRA: s dW)`, g the
// magnitude over the detached channel norms of `W + s dW`, applied by the
// kind's own functional op. Many random layers and settings (fixed seeds):
// the forward, first- and second-order gradients, merged and unmerged, and
// the refusals.
#include "test_support.h"

#include <torchlora/torchlora.h>

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace torchlora_dora_test {

using torchlora::LoRAInit;
using torchlora::LoRAOptions;
using torchlora_test::message_of;
namespace F = torch::nn::functional;

using torchlora_test::coin;
using torchlora_test::uniform;
using torchlora_test::uniform_real;

namespace {

/// How a kind is checked: its layer, an input, its delta in the weight's
/// layout, its op with a given weight, and the weight axis of its channels.
struct Kind {
  std::shared_ptr<torch::nn::Module> layer;
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  torch::Tensor input;
  /// The adapter's delta `dW` from A and B, shaped like the weight.
  std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>
      delta;
  /// The base op with weight W and bias b (undefined: none).
  std::function<torch::Tensor(
      const torch::Tensor&,
      const torch::Tensor&,
      const torch::Tensor&)>
      op;
  int64_t axis = 0;
  std::string a_name = "lora_A.";
  std::string b_name = "lora_B.";
};

torchlora::LoRALayer& lora_of(const Kind& kind) {
  return *std::dynamic_pointer_cast<torchlora::LoRALayer>(kind.layer);
}

torch::Tensor param(const Kind& kind, const std::string& name) {
  return kind.layer->named_parameters()[name];
}

/// The layer's adapters as the reference sees them: A, B, magnitude and
/// factor s, as leaves of their own (copies) that record gradients.
struct RefAdapter {
  torch::Tensor A;
  torch::Tensor B;
  torch::Tensor m;
  double s;
};

std::vector<RefAdapter> reference_adapters(const Kind& kind) {
  auto& lora = lora_of(kind);
  std::vector<RefAdapter> adapters;
  for (const auto& name : lora.active_adapters()) {
    const bool weight_suffix = kind.a_name == "lora_A.";
    const auto A =
        param(kind, kind.a_name + name + (weight_suffix ? ".weight" : ""));
    const auto B =
        param(kind, kind.b_name + name + (weight_suffix ? ".weight" : ""));
    const auto& options = lora.adapter_options(name);
    torch::Tensor m;
    if (options.use_dora()) {
      m = param(kind, "lora_magnitude_vector." + name + ".weight")
              .detach()
              .clone()
              .requires_grad_(true);
    }
    adapters.push_back(RefAdapter{
        A.detach().clone().requires_grad_(true),
        B.detach().clone().requires_grad_(true),
        m,
        torchlora::lora_scaling(options) * lora.scale(name)});
  }
  return adapters;
}

/// The adapted weight, with plain ops.
torch::Tensor reference_weight(
    const Kind& kind,
    const torch::Tensor& W,
    const std::vector<RefAdapter>& adapters) {
  auto adapted = W;
  for (const auto& a : adapters) {
    const auto full = W + a.s * kind.delta(a.A, a.B);
    if (!a.m.defined()) {
      adapted = adapted + a.s * kind.delta(a.A, a.B);
      continue;
    }
    // The norm over every dimension but the channel axis, detached.
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < W.dim(); ++d) {
      if (d != kind.axis) {
        dims.push_back(d);
      }
    }
    const auto norm = full.detach().pow(2).sum(dims, /*keepdim=*/true).sqrt();
    auto shape = norm.sizes().vec();
    const auto g = a.m.reshape(shape) / norm;
    adapted = adapted + (g * full - W);
  }
  return adapted;
}

void expect_close(
    const torch::Tensor& got,
    const torch::Tensor& want,
    const std::string& what) {
  ASSERT_TRUE(got.defined()) << what;
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const double error = (got - want).abs().max().item<double>();
  const double size = want.abs().max().item<double>() + 1;
  EXPECT_LT(error, 1e-10 * size) << what;
}

/// Forward, first- and second-order gradients against the reference; the
/// merged forward too.
void check_against_reference(const Kind& kind, const std::string& where) {
  auto& lora = lora_of(kind);
  const auto W = lora.base_weight().detach();
  const auto b =
      lora.base_bias().defined() ? lora.base_bias().detach() : torch::Tensor();
  const bool float_input = kind.input.is_floating_point();
  const auto x = float_input ? kind.input.detach().clone().requires_grad_(true)
                             : kind.input;
  const auto ref_x = float_input
      ? kind.input.detach().clone().requires_grad_(true)
      : kind.input;
  auto adapters = reference_adapters(kind);
  const auto y = kind.forward(x);
  const auto y_ref = kind.op(ref_x, reference_weight(kind, W, adapters), b);
  expect_close(y, y_ref, where + " forward");

  // First order: every trainable tensor and the input.
  std::vector<torch::Tensor> ours;
  std::vector<torch::Tensor> theirs;
  for (const auto& name : lora.active_adapters()) {
    (void)name;
  }
  for (const auto& t : lora.active_adapter_parameters()) {
    ours.push_back(t);
  }
  for (const auto& a : adapters) {
    theirs.push_back(a.A);
    theirs.push_back(a.B);
    if (a.m.defined()) {
      theirs.push_back(a.m);
    }
  }
  ASSERT_EQ(ours.size(), theirs.size()) << where;
  if (float_input) {
    ours.push_back(x);
    theirs.push_back(ref_x);
  }
  const auto weights = torch::randn_like(y_ref);
  const auto grads = torch::autograd::grad(
      {(y * weights).sum()}, ours, {}, /*retain_graph=*/true, true);
  const auto ref_grads = torch::autograd::grad(
      {(y_ref * weights).sum()}, theirs, {}, /*retain_graph=*/true, true);
  for (size_t i = 0; i < ours.size(); ++i) {
    expect_close(
        grads[i], ref_grads[i], where + " gradient " + std::to_string(i));
  }
  // Second order: the gradient of <first gradients, v> in every tensor.
  torch::Tensor inner = torch::zeros({}, torch::kDouble);
  torch::Tensor ref_inner = torch::zeros({}, torch::kDouble);
  for (size_t i = 0; i < ours.size(); ++i) {
    const auto v = torch::randn_like(ref_grads[i]);
    inner = inner + (grads[i] * v).sum();
    ref_inner = ref_inner + (ref_grads[i] * v).sum();
  }
  const auto second = torch::autograd::grad(
      {inner}, ours, {}, true, false, /*allow_unused=*/true);
  const auto ref_second = torch::autograd::grad(
      {ref_inner}, theirs, {}, true, false, /*allow_unused=*/true);
  for (size_t i = 0; i < ours.size(); ++i) {
    const auto want =
        ref_second[i].defined() ? ref_second[i] : torch::zeros_like(theirs[i]);
    const auto got =
        second[i].defined() ? second[i] : torch::zeros_like(ours[i]);
    expect_close(got, want, where + " second order " + std::to_string(i));
  }

  // Merged: the plain op with the merged weight; unmerge restores the bits.
  {
    torch::NoGradGuard no_grad;
    const auto before = lora.base_weight().detach().clone();
    lora.merge(/*safe=*/false);
    expect_close(kind.forward(kind.input), y_ref.detach(), where + " merged");
    lora.unmerge();
    EXPECT_TRUE(torch::equal(lora.base_weight(), before)) << where;
  }
}

/// Random adapters (half DoRA, some plain), random values and magnitudes.
void add_random_adapters(
    const Kind& kind,
    std::mt19937& rng,
    bool allow_scale) {
  auto& lora = lora_of(kind);
  const int64_t count = uniform(rng, 1, 3);
  std::vector<std::string> active;
  for (int64_t i = 0; i < count; ++i) {
    const auto name = "a" + std::to_string(i);
    lora.add_adapter(
        name,
        LoRAOptions(uniform(rng, 1, 4))
            .alpha(uniform_real(rng, 0.5, 8))
            .use_rslora(coin(rng, 0.3))
            .use_dora(i == 0 || coin(rng, 0.6))
            .init(LoRAInit::random));
    if (allow_scale && coin(rng, 0.3)) {
      lora.set_scale(name, uniform_real(rng, -1.5, 1.5));
    }
    if (i == 0 || coin(rng, 0.8)) {
      active.push_back(name);
    }
  }
  lora.set_active_adapters(active);
  torch::NoGradGuard no_grad;
  for (auto& item : kind.layer->named_parameters()) {
    if (item.key().find("lora_magnitude_vector") != std::string::npos) {
      item.value().mul_(torch::rand_like(item.value()) + 0.5);
    }
  }
}

Kind linear_kind(std::mt19937& rng) {
  const auto in = uniform(rng, 1, 9);
  const auto out = uniform(rng, 1, 9);
  const bool bias = coin(rng);
  torchlora::LoRALinear layer(
      torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias)));
  layer->to(torch::kDouble);
  Kind kind;
  kind.layer = layer.ptr();
  kind.forward = [layer](const torch::Tensor& x) mutable { return layer(x); };
  kind.input = coin(rng)
      ? torch::randn({uniform(rng, 1, 5), in}, torch::kDouble)
      : torch::randn({2, uniform(rng, 1, 3), in}, torch::kDouble);
  kind.delta = [](const torch::Tensor& A, const torch::Tensor& B) {
    return B.mm(A);
  };
  kind.op = [](const torch::Tensor& x,
               const torch::Tensor& W,
               const torch::Tensor& b) { return F::linear(x, W, b); };
  return kind;
}

Kind embedding_kind(std::mt19937& rng) {
  const auto vocab = uniform(rng, 2, 9);
  const auto dim = uniform(rng, 1, 7);
  torchlora::LoRAEmbedding layer(torch::nn::Embedding(vocab, dim));
  layer->to(torch::kDouble);
  Kind kind;
  kind.layer = layer.ptr();
  kind.forward = [layer](const torch::Tensor& x) mutable { return layer(x); };
  kind.input = torch::randint(vocab, {uniform(rng, 1, 3), uniform(rng, 1, 4)});
  kind.delta = [](const torch::Tensor& A, const torch::Tensor& B) {
    return B.mm(A).t();
  };
  kind.op = [](const torch::Tensor& x,
               const torch::Tensor& W,
               const torch::Tensor&) { return F::embedding(x, W); };
  kind.axis = 1;
  kind.a_name = "lora_embedding_A.";
  kind.b_name = "lora_embedding_B.";
  return kind;
}

template <size_t D, typename Conv, typename LoRAConv>
Kind conv_kind(std::mt19937& rng) {
  const auto in = uniform(rng, 1, 4);
  const auto out = uniform(rng, 1, 5);
  const auto k = uniform(rng, 1, 3);
  const auto stride = uniform(rng, 1, 2);
  const auto padding = uniform(rng, 0, 1);
  const auto dilation = uniform(rng, 1, 2);
  const bool bias = coin(rng);
  Conv base(torch::nn::ConvOptions<D>(in, out, k)
                .stride(stride)
                .padding(padding)
                .dilation(dilation)
                .bias(bias));
  LoRAConv layer(base);
  layer->to(torch::kDouble);
  Kind kind;
  kind.layer = layer.ptr();
  kind.forward = [layer](const torch::Tensor& x) mutable { return layer(x); };
  std::vector<int64_t> shape{uniform(rng, 1, 2), in};
  for (size_t d = 0; d < D; ++d) {
    shape.push_back(uniform(rng, 5, 7));
  }
  if (coin(rng, 0.2)) {
    shape.erase(shape.begin()); // unbatched
  }
  kind.input = torch::randn(shape, torch::kDouble);
  kind.delta = [](const torch::Tensor& A, const torch::Tensor& B) {
    const auto r = A.size(0);
    auto shape = A.sizes().vec();
    shape[0] = B.size(0);
    return B.reshape({B.size(0), r}).mm(A.reshape({r, -1})).view(shape);
  };
  kind.op = [stride, padding, dilation](
                const torch::Tensor& x,
                const torch::Tensor& W,
                const torch::Tensor& b) {
    if constexpr (D == 1) {
      return torch::conv1d(x, W, b, stride, padding, dilation);
    } else if constexpr (D == 2) {
      return torch::conv2d(x, W, b, stride, padding, dilation);
    } else {
      return torch::conv3d(x, W, b, stride, padding, dilation);
    }
  };
  return kind;
}

Kind random_kind(int which, std::mt19937& rng) {
  switch (which) {
    case 0:
      return linear_kind(rng);
    case 1:
      return embedding_kind(rng);
    case 2:
      return conv_kind<1, torch::nn::Conv1d, torchlora::LoRAConv1d>(rng);
    case 3:
      return conv_kind<2, torch::nn::Conv2d, torchlora::LoRAConv2d>(rng);
    default:
      return conv_kind<3, torch::nn::Conv3d, torchlora::LoRAConv3d>(rng);
  }
}

/// The parameters of `model` that record gradients.
std::vector<torch::Tensor> trainable(const torch::nn::Module& model) {
  std::vector<torch::Tensor> tensors;
  for (const auto& tensor : model.parameters()) {
    if (tensor.requires_grad()) {
      tensors.push_back(tensor);
    }
  }
  return tensors;
}

const char* kKindNames[] =
    {"Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d"};

} // namespace

// Every kind, 12 random layers each: forward, gradients to second order,
// merged and unmerged, against the float64 formula.
TEST(DoraReference, EveryKindForwardGradientsAndMerge) {
  for (int which = 0; which < 5; ++which) {
    for (int trial = 0; trial < 12; ++trial) {
      std::mt19937 rng(1000 * which + trial);
      torch::manual_seed(1000 * which + trial);
      const auto kind = random_kind(which, rng);
      add_random_adapters(kind, rng, /*allow_scale=*/true);
      check_against_reference(
          kind,
          std::string(kKindNames[which]) + " trial " + std::to_string(trial));
    }
  }
}

// With dropout in training, as peft: each adapter sees its own dropped-out
// input x', and a DoRA adapter adds (g - 1) x' W^T + g s x' dW^T.
TEST(DoraReference, DropoutInTrainingFollowsPeft) {
  for (int trial = 0; trial < 6; ++trial) {
    std::mt19937 rng(77 + trial);
    torch::manual_seed(77 + trial);
    auto kind = linear_kind(rng);
    auto& lora = lora_of(kind);
    lora.add_adapter(
        "d",
        LoRAOptions(2).alpha(3).dropout(0.4).use_dora(true).init(
            LoRAInit::random));
    lora.add_adapter(
        "l", LoRAOptions(3).alpha(2).dropout(0.3).init(LoRAInit::random));
    kind.layer->train(true);
    const auto adapters = reference_adapters(kind);
    const auto W = lora.base_weight().detach();
    const auto b = lora.base_bias();
    torch::manual_seed(5);
    const auto y = kind.forward(kind.input);
    torch::manual_seed(5); // the same masks, drawn in the same order
    auto want = F::linear(kind.input, W, b);
    const auto norm = (W + adapters[0].s * adapters[0].B.mm(adapters[0].A))
                          .detach()
                          .norm(2, {1});
    const auto g = adapters[0].m / norm;
    for (size_t i = 0; i < 2; ++i) {
      const double p = i == 0 ? 0.4 : 0.3;
      const auto dropped =
          F::dropout(kind.input, F::DropoutFuncOptions().p(p).training(true));
      const auto delta = F::linear(dropped, adapters[i].B.mm(adapters[i].A));
      if (i == 0) {
        want =
            want + (g - 1) * F::linear(dropped, W) + g * adapters[i].s * delta;
      } else {
        want = want + adapters[i].s * delta;
      }
    }
    expect_close(y, want, "trial " + std::to_string(trial));
  }
}

/// LibTorch's encoder layer, small and without dropout.
torch::nn::TransformerEncoderLayer small_encoder() {
  return torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(8, 2)
          .dim_feedforward(12)
          .dropout(0));
}

// A LibTorch TransformerEncoderLayer reads linear1 and linear2 through its
// typed members: their DoRA adapters act through AdaptedWeights (the
// weight-space path). Its output and gradients equal those of a plain copy
// given the reference's adapted weights.
TEST(DoraReference, TypedMembersThroughAdaptedWeights) {
  torch::manual_seed(3);
  auto plain = small_encoder();
  plain->to(torch::kDouble);
  auto model =
      std::dynamic_pointer_cast<torch::nn::TransformerEncoderLayerImpl>(
          plain->clone());
  torchlora::inject_lora(
      *model,
      torchlora::LoRAConfig(2)
          .alpha(3)
          .use_dora(true)
          .init(LoRAInit::random)
          .target_modules({"linear1", "linear2"}));
  const auto x = torch::randn({3, 2, 8}, torch::kDouble);
  std::vector<RefAdapter> refs;
  for (const char* name : {"linear1", "linear2"}) {
    auto layer = model->named_modules()[name];
    {
      torch::NoGradGuard no_grad;
      layer->named_parameters()["lora_magnitude_vector.default.weight"].mul_(
          1.3);
    }
    Kind kind;
    kind.layer = layer;
    kind.delta = [](const torch::Tensor& A, const torch::Tensor& B) {
      return B.mm(A);
    };
    const auto adapters = reference_adapters(kind);
    refs.push_back(adapters[0]);
    const auto adapted = reference_weight(
        kind, layer->named_parameters()["weight"].detach(), adapters);
    // The plain copy's member computes with the reference's weight.
    auto& member = std::string(name) == "linear1" ? plain->linear1->weight
                                                  : plain->linear2->weight;
    member = adapted;
  }
  const auto want = plain->forward(x);
  torch::Tensor y;
  {
    torchlora::AdaptedWeights adapted(*model);
    y = model->forward(x);
  }
  expect_close(y, want, "members' forward");
  const auto weights = torch::randn_like(want);
  (y * weights).sum().backward();
  (want * weights).sum().backward();
  for (size_t i = 0; i < 2; ++i) {
    auto layer = model->named_modules()[i == 0 ? "linear1" : "linear2"];
    const auto params = layer->named_parameters();
    expect_close(
        params["lora_magnitude_vector.default.weight"].grad(),
        refs[i].m.grad(),
        "magnitude gradient");
    expect_close(
        params["lora_A.default.weight"].grad(), refs[i].A.grad(), "A gradient");
    expect_close(
        params["lora_B.default.weight"].grad(), refs[i].B.grad(), "B gradient");
  }
}

// Gradient accumulation: several backwards through one AdaptedWeights scope
// add up; a backward after the magnitude changed (an optimizer step inside
// the scope) is refused.
TEST(DoraReference, AdaptedWeightsAccumulateAndRefuseAStaleMagnitude) {
  torch::manual_seed(19);
  auto model = small_encoder();
  torchlora::inject_lora(
      *model,
      torchlora::LoRAConfig(2)
          .use_dora(true)
          .init(LoRAInit::random)
          .target_modules({"linear1"}));
  const auto m =
      model->named_parameters()["linear1.lora_magnitude_vector.default.weight"];
  const auto x = torch::randn({3, 2, 8});
  torchlora::AdaptedWeights adapted(*model);
  model->forward(x).sum().backward();
  const auto once = m.grad().clone();
  model->forward(x).sum().backward();
  EXPECT_TRUE(torch::allclose(m.grad(), 2 * once, 1e-5, 1e-6));
  const auto y = model->forward(x).sum();
  {
    torch::NoGradGuard no_grad;
    m.add_(0.1);
  }
  EXPECT_TORCHLORA_ERROR(
      y.backward(),
      "was computed by a torchlora::AdaptedWeights before its DoRA magnitude "
      "changed");
}

// inject_lora with use_dora: peft's in-memory keys, a fresh adapter changes
// nothing and its magnitude is the weight's row norms; clone, torch::save,
// printing and delete_adapter keep or drop the magnitude with the adapter.
TEST(Dora, InjectKeysCloneSaveAndDelete) {
  torch::manual_seed(4);
  torch::nn::Sequential model(
      torch::nn::Linear(6, 5),
      torch::nn::Functional(torch::relu),
      torch::nn::Linear(5, 3));
  const auto x = torch::randn({4, 6});
  const auto before = model->forward(x).detach();
  const auto w0 = model->named_parameters()["0.weight"].detach().clone();
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(2).use_dora(true).target_modules({"0", "2"}));
  const auto params = model->named_parameters();
  ASSERT_NE(params.find("0.lora_magnitude_vector.default.weight"), nullptr);
  const auto m = params["0.lora_magnitude_vector.default.weight"];
  EXPECT_EQ(m.sizes(), (c10::IntArrayRef{5}));
  EXPECT_TRUE(m.requires_grad());
  EXPECT_TRUE(torch::allclose(m, w0.norm(2, {1}), 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(model->forward(x), before, 1e-6, 1e-6));
  const auto tensors = trainable(*model);
  EXPECT_EQ(tensors.size(), 6u); // A, B, magnitude of two layers

  // Train a step so that every tensor matters.
  torch::optim::SGD sgd(tensors, 0.5);
  model->forward(x).pow(2).sum().backward();
  sgd.step();
  const auto y = model->forward(x).detach();
  EXPECT_FALSE(torch::allclose(y, before, 1e-4, 1e-4));

  auto copy =
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  EXPECT_TRUE(torch::equal(copy->forward(x), y));
  EXPECT_NE(
      copy->named_parameters()["0.lora_magnitude_vector.default.weight"]
          .data_ptr(),
      m.data_ptr());

  std::stringstream stream;
  torch::save(model, stream);
  torch::nn::Sequential reloaded(
      torch::nn::Linear(6, 5),
      torch::nn::Functional(torch::relu),
      torch::nn::Linear(5, 3));
  torchlora::inject_lora(
      reloaded,
      torchlora::LoRAConfig(2).use_dora(true).target_modules({"0", "2"}));
  torch::load(reloaded, stream);
  EXPECT_TRUE(torch::equal(reloaded->forward(x), y));

  std::ostringstream printed;
  printed << *model;
  EXPECT_NE(printed.str().find("use_dora=true"), std::string::npos)
      << printed.str();

  torchlora::delete_adapter(*model, "default");
  for (const auto& item : model->named_parameters()) {
    EXPECT_EQ(item.key().find("lora_"), std::string::npos) << item.key();
  }
}

// A DoRA adapter file in peft's layout, written by hand: the magnitude under
// `<path>.lora_magnitude_vector`, use_dora in the config. It loads with the
// formula's outputs, and save_adapter writes the same keys back.
TEST(Dora, HandBuiltPeftFileLoadsAndSavesBack) {
  torch::manual_seed(6);
  const auto dir = std::filesystem::temp_directory_path() /
      ("torchlora_dora_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  torch::nn::Sequential model(
      torch::nn::Embedding(7, 4),
      torch::nn::Linear(4, 3),
      torch::nn::Functional(
          [](const torch::Tensor& t) { return t.unsqueeze(1); }),
      torch::nn::Conv1d(torch::nn::Conv1dOptions(1, 2, 3).padding(1)));
  model->to(torch::kDouble);
  const auto params = model->named_parameters();
  torchlora::safetensors::Tensors file;
  const auto put = [&](const std::string& key, std::vector<int64_t> shape) {
    file.insert("base_model.model." + key, torch::randn(shape, torch::kDouble));
  };
  put("0.lora_embedding_A", {2, 7});
  put("0.lora_embedding_B", {4, 2});
  put("0.lora_magnitude_vector", {4});
  put("1.lora_A.weight", {2, 4});
  put("1.lora_B.weight", {3, 2});
  put("1.lora_magnitude_vector", {3});
  put("3.lora_A.weight", {2, 1, 3});
  put("3.lora_B.weight", {2, 2, 1});
  put("3.lora_magnitude_vector", {1, 2, 1});
  torchlora::safetensors::save(
      (dir / "adapter_model.safetensors").string(), file, {{"format", "pt"}});
  {
    std::ofstream config(dir / "adapter_config.json");
    config << R"({"peft_type": "LORA", "r": 2, "lora_alpha": 3,
                 "target_modules": ["0", "1", "3"], "use_dora": true,
                 "init_lora_weights": true})";
  }
  torchlora::load_adapter(model, dir.string());
  const auto get = [&](const std::string& key) {
    return file["base_model.model." + key];
  };
  const double s = 1.5;
  const auto dora = [&](const torch::Tensor& W,
                        const torch::Tensor& delta,
                        const torch::Tensor& m,
                        int64_t axis) {
    const auto full = W + s * delta;
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < W.dim(); ++d) {
      if (d != axis) {
        dims.push_back(d);
      }
    }
    const auto norm = full.pow(2).sum(dims, true).sqrt();
    return m.reshape(norm.sizes()) / norm * full;
  };
  const auto E = dora(
      params["0.weight"],
      get("0.lora_embedding_B").mm(get("0.lora_embedding_A")).t(),
      get("0.lora_magnitude_vector"),
      1);
  const auto L = dora(
      params["1.weight"],
      get("1.lora_B.weight").mm(get("1.lora_A.weight")),
      get("1.lora_magnitude_vector"),
      0);
  const auto C = dora(
      params["3.weight"],
      get("3.lora_B.weight")
          .reshape({2, 2})
          .mm(get("3.lora_A.weight").reshape({2, 3}))
          .view({2, 1, 3}),
      get("3.lora_magnitude_vector"),
      0);
  const auto tokens = torch::randint(7, {5});
  const auto want = torch::conv1d(
      F::linear(F::embedding(tokens, E), L, params["1.bias"]).unsqueeze(1),
      C,
      params["3.bias"],
      1,
      1);
  torch::NoGradGuard no_grad;
  expect_close(model->forward(tokens), want, "loaded DoRA file");

  const auto out = dir / "saved";
  torchlora::save_adapter(*model, out.string());
  const auto saved = torchlora::safetensors::load(
      (out / "adapter_model.safetensors").string());
  ASSERT_EQ(saved.size(), file.size());
  for (const auto& item : file) {
    ASSERT_NE(saved.find(item.key()), nullptr) << item.key();
    EXPECT_TRUE(torch::equal(saved[item.key()], item.value())) << item.key();
  }
  std::ifstream written(out / "adapter_config.json");
  const auto config = nlohmann::json::parse(written);
  EXPECT_EQ(config["use_dora"], true);
  std::filesystem::remove_all(dir);
}

TEST(DoraRefusals, EveryRefusalNamesTheValue) {
  torch::manual_seed(8);
  // MultiheadAttention, as in peft.
  torchlora::LoRAMultiheadAttention attention(
      torch::nn::MultiheadAttention(8, 2));
  EXPECT_TORCHLORA_ERROR(
      attention->add_adapter("d", LoRAOptions(2).use_dora(true)),
      "adapter \"d\" asks for DoRA (use_dora = true), which a "
      "LoRAMultiheadAttention does not take");
  // Grouped convolutions.
  torchlora::LoRAConv2d grouped(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3).groups(2)));
  EXPECT_TORCHLORA_ERROR(
      grouped->add_adapter("d", LoRAOptions(2).use_dora(true)),
      "asks for DoRA on a grouped convolution (groups = 2)");
  EXPECT_TRUE(grouped->adapter_names().empty());

  // Rows routed to adapters of a layer with DoRA.
  torch::nn::Sequential model(torch::nn::Linear(4, 3));
  torchlora::inject_lora(
      model, torchlora::LoRAConfig(2).use_dora(true).target_modules({"0"}));
  {
    torchlora::AdapterRouting routing(model, {"default", "__base__"});
    EXPECT_TORCHLORA_ERROR(
        model->forward(torch::randn({2, 4})),
        "has DoRA adapters, whose rescaling of the whole layer cannot be "
        "applied per row");
  }
  // merge_in_place, on the layer and on the model: nothing merged.
  const auto before = torchlora_test::snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::merge(model, torchlora::MergeOptions().keep_original(false)),
      "cannot merge '0' in place: merge_in_place cannot be undone for the "
      "DoRA adapter(s) \"default\"");
  torchlora_test::expect_unchanged(before, *model);
  auto& layer = dynamic_cast<torchlora::LoRALayer&>(*model[0]);
  EXPECT_TORCHLORA_ERROR(
      layer.merge_in_place(false), "merge_in_place cannot be undone");
  EXPECT_FALSE(layer.merged());
  // One file holds one use_dora.
  torch::nn::Sequential two(torch::nn::Linear(4, 3), torch::nn::Linear(3, 3));
  torchlora::inject_lora(
      two, torchlora::LoRAConfig(2).use_dora(true).target_modules({"0"}));
  torchlora::inject_lora(two, torchlora::LoRAConfig(2).target_modules({"1"}));
  const auto dir = std::filesystem::temp_directory_path() /
      ("torchlora_dora_refusal_" + std::to_string(::getpid()));
  EXPECT_TORCHLORA_ERROR(
      torchlora::save_adapter(*two, dir.string()),
      "some layers of adapter \"default\" use DoRA and some do not");
  // A file whose use_dora differs from the adapter the model has.
  torch::nn::Sequential plain(torch::nn::Linear(4, 3));
  torchlora::inject_lora(plain, torchlora::LoRAConfig(2).target_modules({"0"}));
  torchlora::save_adapter(*plain, dir.string());
  std::ifstream read(dir / "adapter_config.json");
  auto config = nlohmann::json::parse(read);
  read.close();
  config["use_dora"] = true;
  std::ofstream(dir / "adapter_config.json") << config.dump();
  const auto kept = torchlora_test::snapshot(*plain);
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*plain, dir.string()),
      "'0' already has adapter \"default\" with use_dora = false, but the file's "
      "config says use_dora = true");
  torchlora_test::expect_unchanged(kept, *plain);
  // The file lacks the magnitude a DoRA config needs.
  torch::nn::Sequential fresh(torch::nn::Linear(4, 3));
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*fresh, dir.string()),
      "the file has no tensor \"base_model.model.0.lora_magnitude_vector\"");
  EXPECT_EQ(fresh->named_parameters().size(), 2u);
  std::filesystem::remove_all(dir);
}

// ------------------------------------------------ PiSSA and OLoRA inits

namespace {

torch::Tensor singular_values(const torch::Tensor& W) {
  return std::get<1>(torch::linalg_svd(W, /*full_matrices=*/false));
}

bool is_diagonal(const torch::Tensor& M, double tolerance) {
  return (M - torch::diag(torch::diagonal(M))).abs().max().item<double>() <
      tolerance;
}

} // namespace

// float64 bases of random shapes, ranks and scalings: the base becomes the
// residual W - s B A and the output does not change; PiSSA's s B A is the
// best rank-r approximation (singular values S[:r], residual S[r:]) with
// A A^T = B^T B = diag(S[:r] / s); OLoRA's B has orthonormal columns and A
// is R's upper-trapezoidal rows.
TEST(WeightInits, PissaAndOloraFactorizeTheWeightAndKeepTheOutput) {
  for (int trial = 0; trial < 10; ++trial) {
    for (const auto init : {LoRAInit::pissa, LoRAInit::olora}) {
      std::mt19937 rng(300 + trial);
      torch::manual_seed(300 + trial);
      const auto in = uniform(rng, 2, 12);
      const auto out = uniform(rng, 2, 12);
      const auto rank = uniform(rng, 1, std::min(in, out));
      const auto options = LoRAOptions(rank)
                               .alpha(uniform_real(rng, 0.5, 16))
                               .use_rslora(coin(rng))
                               .init(init);
      torch::nn::Linear base(torch::nn::LinearOptions(in, out).bias(coin(rng)));
      base->to(torch::kDouble);
      const auto W = base->weight.detach().clone();
      const auto x = torch::randn({3, in}, torch::kDouble);
      const auto before = base(x).detach();
      torchlora::LoRALinear layer(base, options);
      const double s = torchlora::lora_scaling(options);
      const auto A =
          layer->named_parameters()["lora_A.default.weight"].detach();
      const auto B =
          layer->named_parameters()["lora_B.default.weight"].detach();
      const auto where = std::string(torchlora::to_string(init)) + " trial " +
          std::to_string(trial);
      // The base layer's own tensor holds the residual.
      EXPECT_EQ(base->weight.data_ptr(), layer->weight.data_ptr()) << where;
      expect_close(
          layer->weight.detach() + s * B.mm(A), W, where + " residual");
      expect_close(layer(x).detach(), before, where + " output");
      if (init == LoRAInit::pissa) {
        const auto S = singular_values(W);
        expect_close(
            singular_values(s * B.mm(A)).narrow(0, 0, rank),
            S.narrow(0, 0, rank),
            where + " kept");
        if (rank < S.size(0)) {
          expect_close(
              singular_values(layer->weight.detach())
                  .narrow(0, 0, S.size(0) - rank),
              S.narrow(0, rank, S.size(0) - rank),
              where + " left");
        }
        EXPECT_TRUE(is_diagonal(A.mm(A.t()), 1e-10)) << where;
        expect_close(
            torch::diagonal(B.t().mm(B)),
            S.narrow(0, 0, rank) / s,
            where + " B");
        expect_close(
            torch::diagonal(A.mm(A.t())),
            S.narrow(0, 0, rank) / s,
            where + " A");
      } else {
        expect_close(
            B.t().mm(B),
            torch::eye(rank, torch::kDouble),
            where + " orthonormal");
        expect_close(A.tril(-1), torch::zeros_like(A), where + " triangular");
      }
    }
  }
}

// pissa_niter: a randomized SVD close to the exact one on a matrix whose
// spectrum falls off; drawn from LibTorch's generator (seeded: repeatable).
TEST(WeightInits, RandomizedPissaApproachesTheSvd) {
  torch::manual_seed(12);
  const auto W = torch::randn({24, 3}, torch::kDouble)
                     .mm(torch::randn({3, 20}, torch::kDouble))
                     .add(torch::randn({24, 20}, torch::kDouble) * 1e-3);
  const auto S = singular_values(W);
  const auto run = [&](int64_t seed) {
    torch::manual_seed(seed);
    torch::nn::Linear base(20, 24);
    base->to(torch::kDouble);
    {
      torch::NoGradGuard no_grad;
      base->weight.copy_(W);
    }
    torchlora::LoRALinear layer(
        base, LoRAOptions(3).alpha(3).init(LoRAInit::pissa).pissa_niter(4));
    return layer->weight.detach().clone();
  };
  const auto residual = run(1);
  const double left =
      S.narrow(0, 3, S.size(0) - 3).pow(2).sum().sqrt().item<double>();
  EXPECT_NEAR(residual.norm().item<double>(), left, 0.01 * left);
  EXPECT_TRUE(torch::equal(run(1), residual));
}

// Adapters kept in bf16 over a float32 base: the residual is taken from the
// rounded A and B, so the output still does not change.
TEST(WeightInits, RoundedAdaptersStillKeepTheOutput) {
  torch::manual_seed(17);
  torch::nn::Linear base(32, 24);
  const auto x = torch::randn({5, 32});
  const auto before = base(x).detach();
  const auto W = base->weight.detach().clone();
  torchlora::LoRALinear layer(
      base,
      LoRAOptions(8).alpha(8).init(LoRAInit::pissa).dtype(torch::kBFloat16));
  const auto params = layer->named_parameters();
  const auto A = params["lora_A.default.weight"].detach().to(torch::kFloat);
  const auto B = params["lora_B.default.weight"].detach().to(torch::kFloat);
  // Up to float32 rounding, not bf16's (2^-8).
  EXPECT_LT(
      (layer->weight.detach() + B.mm(A) - W).abs().max().item<double>(), 1e-6);
  // The bf16 adapter's own product still rounds: the output moves by that.
  EXPECT_LT((layer(x) - before).abs().max().item<double>(), 2e-2);
}

// Layers that differ only in an init that does not touch the base save as
// one file; a clone of a magnitude module has a magnitude of its own.
TEST(Dora, PlainInitsMixAndMagnitudeModulesCloneDeep) {
  torch::nn::Sequential model(torch::nn::Linear(4, 3), torch::nn::Linear(3, 2));
  torchlora::inject_lora(
      model, torchlora::LoRAConfig(2).use_dora(true).target_modules({"0"}));
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(2)
          .use_dora(true)
          .init(LoRAInit::gaussian)
          .target_modules({"1"}));
  const auto dir = std::filesystem::temp_directory_path() /
      ("torchlora_dora_mix_" + std::to_string(::getpid()));
  EXPECT_NO_THROW(torchlora::save_adapter(*model, dir.string()));
  std::filesystem::remove_all(dir);
  auto layer = std::dynamic_pointer_cast<torchlora::LoRALinearImpl>(model[0]);
  const auto copy = layer->lora_magnitude_vector->clone();
  const auto original =
      layer->named_parameters()["lora_magnitude_vector.default.weight"];
  const auto copied = copy->named_parameters()["default.weight"];
  EXPECT_TRUE(torch::equal(original, copied));
  EXPECT_NE(original.data_ptr(), copied.data_ptr());
}

// A bf16 base: factorized in float32, the residual rounded once to bf16.
TEST(WeightInits, HalfPrecisionBasesAreFactorizedInFloat32) {
  torch::manual_seed(13);
  for (const auto init : {LoRAInit::pissa, LoRAInit::olora}) {
    torch::nn::Linear base(16, 12);
    const auto W = base->weight.detach().clone();
    base->to(torch::kBFloat16);
    const auto W16 = base->weight.detach().to(torch::kFloat).clone();
    torchlora::LoRALinear layer(
        base, LoRAOptions(4).alpha(8).init(init).dtype(torch::kFloat));
    const auto A = layer->named_parameters()["lora_A.default.weight"].detach();
    const auto B = layer->named_parameters()["lora_B.default.weight"].detach();
    EXPECT_EQ(A.scalar_type(), torch::kFloat);
    EXPECT_EQ(layer->weight.scalar_type(), torch::kBFloat16);
    const auto restored =
        layer->weight.detach().to(torch::kFloat) + 2 * B.mm(A);
    // One bf16 rounding of the residual: 2^-8 of its size.
    EXPECT_LT(
        (restored - W16).abs().max().item<double>(),
        layer->weight.detach().to(torch::kFloat).abs().max().item<double>() /
            128)
        << torchlora::to_string(init);
    (void)W;
  }
}

// save_adapter writes peft's init name; load_adapter, like peft, runs the
// init on the base it loads into (the original model) and then copies the
// trained A and B: the trained model's outputs.
TEST(WeightInits, FilesNameTheInitAndReloadOntoTheOriginalBase) {
  const auto dir = std::filesystem::temp_directory_path() /
      ("torchlora_pissa_" + std::to_string(::getpid()));
  for (const auto& [init, niter, name] :
       std::vector<std::tuple<LoRAInit, int64_t, std::string>>{
           {LoRAInit::pissa, 0, "pissa"},
           {LoRAInit::olora, 0, "olora"},
           {LoRAInit::gaussian, 0, "gaussian"}}) {
    torch::manual_seed(14);
    torch::nn::Sequential original(
        torch::nn::Linear(6, 5),
        torch::nn::Functional(torch::relu),
        torch::nn::Linear(5, 4));
    auto model =
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(original->clone());
    const auto config = torchlora::LoRAConfig(2)
                            .alpha(4)
                            .init(init)
                            .pissa_niter(niter)
                            .target_modules({"0", "2"});
    torchlora::inject_lora(*model, config);
    const auto x = torch::randn({3, 6});
    torch::optim::SGD sgd(trainable(*model), 0.1);
    model->forward(x).pow(2).sum().backward();
    sgd.step();
    const auto trained = model->forward(x).detach();
    std::filesystem::remove_all(dir);
    torchlora::save_adapter(*model, dir.string());
    std::ifstream read(dir / "adapter_config.json");
    EXPECT_EQ(nlohmann::json::parse(read)["init_lora_weights"], name);
    auto fresh =
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(original->clone());
    torchlora::load_adapter(*fresh, dir.string());
    EXPECT_TRUE(torch::allclose(fresh->forward(x), trained, 1e-6, 1e-6))
        << name;
  }
  std::filesystem::remove_all(dir);
}

TEST(WeightInitRefusals, EveryRefusalNamesTheValueAndChangesNothing) {
  torch::manual_seed(15);
  torchlora::LoRAEmbedding embedding(torch::nn::Embedding(6, 4));
  EXPECT_TORCHLORA_ERROR(
      embedding->add_adapter("p", LoRAOptions(2).init(LoRAInit::pissa)),
      "adapter \"p\" asks for init pissa, which factorizes a Linear's [out, "
      "in] weight; a LoRAEmbedding has none");
  torchlora::LoRAConv2d conv(torch::nn::Conv2d(2, 3, 3));
  EXPECT_TORCHLORA_ERROR(
      conv->add_adapter("o", LoRAOptions(2).init(LoRAInit::olora)),
      "asks for init olora, which factorizes a Linear's");
  torch::nn::Linear base(3, 5);
  const auto W = base->weight.detach().clone();
  torchlora::LoRALinear linear(base);
  EXPECT_TORCHLORA_ERROR(
      linear->add_adapter("big", LoRAOptions(4).init(LoRAInit::pissa)),
      "asks for init pissa with rank 4, more than the weight's [5, 3] has (at "
      "most 3)");
  EXPECT_TORCHLORA_ERROR(
      linear->add_adapter(
          "n", LoRAOptions(2).init(LoRAInit::pissa).pissa_niter(-1)),
      "pissa_niter must be >= 0 (0: an exact SVD), got -1");
  EXPECT_TORCHLORA_ERROR(
      linear->add_adapter("n", LoRAOptions(2).pissa_niter(3)),
      "pissa_niter = 3 needs init(LoRAInit::pissa), got init kaiming_uniform");
  EXPECT_TRUE(torch::equal(linear->weight, W));
  EXPECT_TRUE(linear->adapter_names().empty());
  // A weight with NaN cannot be factorized: no adapter, no stray matrices.
  {
    torch::NoGradGuard no_grad;
    linear->weight[0][0] = std::nan("");
  }
  EXPECT_TORCHLORA_ERROR(
      linear->add_adapter("p", LoRAOptions(2).init(LoRAInit::pissa)),
      "asks for init pissa, which factorizes the weight, but this "
      "LoRALinear's weight holds NaN or Inf");
  EXPECT_EQ(linear->named_parameters().size(), 2u);
  // A refused constructor leaves the base as it was, trainable.
  torch::nn::Embedding table(5, 3);
  EXPECT_TORCHLORA_ERROR(
      torchlora::LoRAEmbedding(table, LoRAOptions(2).init(LoRAInit::olora)),
      "asks for init olora");
  EXPECT_TRUE(table->weight.requires_grad());

  // inject_lora: a refusal on a later layer puts the residuals back.
  torch::nn::Sequential model(
      torch::nn::Linear(4, 4), torch::nn::Embedding(5, 4));
  const auto before = torchlora_test::snapshot(*model);
  EXPECT_TORCHLORA_ERROR(
      torchlora::inject_lora(
          model,
          torchlora::LoRAConfig(2)
              .init(LoRAInit::pissa)
              .target_modules({"0", "1"})),
      "asks for init pissa, which factorizes");
  torchlora_test::expect_unchanged(before, *model);

  // A config whose pissa_niter is not a number.
  torch::nn::Sequential small(torch::nn::Linear(4, 3));
  const auto dir = std::filesystem::temp_directory_path() /
      ("torchlora_pissa_refusal_" + std::to_string(::getpid()));
  torchlora::inject_lora(small, torchlora::LoRAConfig(2).target_modules({"0"}));
  torchlora::save_adapter(*small, dir.string());
  std::ifstream read(dir / "adapter_config.json");
  auto config = nlohmann::json::parse(read);
  read.close();
  config["init_lora_weights"] = "pissa_niter_x";
  std::ofstream(dir / "adapter_config.json") << config.dump();
  torch::nn::Sequential target(torch::nn::Linear(4, 3));
  EXPECT_TORCHLORA_ERROR(
      torchlora::load_adapter(*target, dir.string()),
      "\"init_lora_weights\" is \"pissa_niter_x\"; peft takes "
      "\"pissa_niter_<n>\" with n a number of iterations");
  std::filesystem::remove_all(dir);
}

// reset_parameters draws a new base weight and starts every adapter again
// from it: PiSSA factorizes the new weight, DoRA's magnitude is its norms.
TEST(WeightInits, ResetParametersStartsAgainFromTheNewWeight) {
  torch::manual_seed(16);
  torch::nn::Linear base(7, 6);
  base->to(torch::kDouble);
  torchlora::LoRALinear layer(
      base, LoRAOptions(3).alpha(6).use_dora(true).init(LoRAInit::pissa));
  const auto old = layer->weight.detach().clone();
  layer->reset_parameters();
  const auto params = layer->named_parameters();
  const auto A = params["lora_A.default.weight"].detach();
  const auto B = params["lora_B.default.weight"].detach();
  const auto full = layer->weight.detach() + 2 * B.mm(A);
  EXPECT_FALSE(torch::allclose(layer->weight, old));
  EXPECT_TRUE(is_diagonal(A.mm(A.t()), 1e-10));
  expect_close(
      params["lora_magnitude_vector.default.weight"].detach(),
      full.norm(2, {1}),
      "magnitude after reset");
  const auto x = torch::randn({4, 7}, torch::kDouble);
  expect_close(
      layer(x).detach(), F::linear(x, full, layer->bias.detach()), "fresh");
}

// save_adapter with initial_adapter_dir: the trained PiSSA/OLoRA adapter as
// a plain LoRA adapter of the untouched base (rank and alpha doubled, alpha
// times sqrt(2) with rsLoRA, per-layer ranks too), which loads onto the
// original model with the trained outputs and without running any init.
TEST(WeightInits, ConvertedFilesApplyToTheOriginalBase) {
  const auto root = std::filesystem::temp_directory_path() /
      ("torchlora_convert_" + std::to_string(::getpid()));
  for (const auto& [init, rslora] : std::vector<std::pair<LoRAInit, bool>>{
           {LoRAInit::pissa, false},
           {LoRAInit::olora, false},
           {LoRAInit::pissa, true}}) {
    torch::manual_seed(18);
    std::filesystem::remove_all(root);
    torch::nn::Sequential original(
        torch::nn::Linear(6, 5),
        torch::nn::Functional(torch::relu),
        torch::nn::Linear(5, 4));
    auto model =
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(original->clone());
    torchlora::inject_lora(
        *model,
        torchlora::LoRAConfig(2)
            .alpha(4)
            .use_rslora(rslora)
            .init(init)
            .rank_pattern({{"2", 3}})
            .target_modules({"0", "2"}));
    torchlora::save_adapter(*model, (root / "initial").string());
    const auto x = torch::randn({3, 6});
    torch::optim::SGD sgd(trainable(*model), 0.1);
    for (int step = 0; step < 2; ++step) {
      sgd.zero_grad();
      model->forward(x).pow(2).sum().backward();
      sgd.step();
    }
    const auto trained = model->forward(x).detach();
    torchlora::save_adapter(
        *model,
        (root / "converted").string(),
        torchlora::SaveAdapterOptions().initial_adapter_dir(
            (root / "initial").string()));
    std::ifstream read(root / "converted" / "adapter_config.json");
    const auto config = nlohmann::json::parse(read);
    EXPECT_EQ(config["init_lora_weights"], true);
    EXPECT_EQ(config["r"].get<int64_t>() + config["rank_pattern"].size(), 5u)
        << config.dump();
    const double alpha = 4 * (rslora ? std::sqrt(2.0) : 2.0);
    EXPECT_NEAR(config["lora_alpha"].get<double>(), alpha, 1e-12);
    const auto tensors = torchlora::safetensors::load(
        (root / "converted" / "adapter_model.safetensors").string());
    EXPECT_EQ(
        tensors["base_model.model.2.lora_A.weight"].sizes(),
        (c10::IntArrayRef{6, 5}));
    auto fresh =
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(original->clone());
    torchlora::load_adapter(*fresh, (root / "converted").string());
    // No init ran: the base is the original's.
    EXPECT_TRUE(torch::equal(
        fresh->named_parameters()["0.weight"],
        original->named_parameters()["0.weight"]));
    EXPECT_TRUE(torch::allclose(fresh->forward(x), trained, 1e-5, 1e-5))
        << torchlora::to_string(init) << " rslora " << rslora;
  }
  // Refusals: no initial files, another adapter's, DoRA, and the initial
  // folder itself as the output.
  const auto convert = [&](torch::nn::Module& model,
                           const std::string& out,
                           const std::string& initial) {
    torchlora::save_adapter(
        model,
        (root / out).string(),
        torchlora::SaveAdapterOptions().initial_adapter_dir(
            (root / initial).string()));
  };
  torch::nn::Sequential dora(torch::nn::Linear(4, 3));
  torchlora::inject_lora(
      dora,
      torchlora::LoRAConfig(2)
          .use_dora(true)
          .init(LoRAInit::pissa)
          .target_modules({"0"}));
  EXPECT_TORCHLORA_ERROR(
      convert(*dora, "x", "none"),
      "no adapter_model.safetensors in the initial adapter's folder");
  torchlora::save_adapter(*dora, (root / "dora").string());
  EXPECT_TORCHLORA_ERROR(
      convert(*dora, "x", "dora"),
      "a DoRA adapter ('base_model.model.0.lora_magnitude_vector') cannot be "
      "converted");
  torch::nn::Sequential other(torch::nn::Linear(4, 3));
  torchlora::inject_lora(
      other,
      torchlora::LoRAConfig(3).init(LoRAInit::olora).target_modules({"0"}));
  EXPECT_TORCHLORA_ERROR(
      convert(*other, "x", "initial"),
      "has no tensor \"base_model.model.0.lora_A.weight\" of shape [3, 4] (it "
      "has shape [2, 6])");
  EXPECT_TORCHLORA_ERROR(
      convert(*dora, "dora", "dora"),
      "is the folder to write; writing would replace the adapter as it was "
      "initialized");
  EXPECT_FALSE(std::filesystem::exists(root / "x"));
  std::filesystem::remove_all(root);
}

} // namespace torchlora_dora_test
