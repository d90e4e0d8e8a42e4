#pragma once
// Shared helpers for torchlora's tests: a seeded fixture, error-text checks,
// snapshots of a module's state, and the CUDA skip.

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchlora/quantized_linear.h>

#include <map>
#include <random>
#include <string>
#include <vector>

namespace torchlora_test {

/// An integer drawn uniformly from [low, high].
inline int64_t uniform(std::mt19937& rng, int64_t low, int64_t high) {
  return std::uniform_int_distribution<int64_t>(low, high)(rng);
}

/// True with probability `p`.
inline bool coin(std::mt19937& rng, double p = 0.5) {
  return std::bernoulli_distribution(p)(rng);
}

/// A real number drawn uniformly from [low, high).
inline double uniform_real(std::mt19937& rng, double low, double high) {
  return std::uniform_real_distribution<double>(low, high)(rng);
}

/// Every test starts from the same random state.
class Seeded : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
  }
};

/// The message of a c10::Error without LibTorch's backtrace.
inline std::string message_of(const c10::Error& error) {
  return error.what_without_backtrace();
}

/// A parameter's values and trainable flag, to compare before and after.
struct TensorState {
  torch::Tensor values;
  bool requires_grad;
};

/// Every parameter and buffer of `module`, by name, copied.
inline std::map<std::string, TensorState> snapshot(
    const torch::nn::Module& module) {
  std::map<std::string, TensorState> state;
  for (const auto& item : module.named_parameters()) {
    state[item.key()] = {
        item.value().detach().clone(), item.value().requires_grad()};
  }
  for (const auto& item : module.named_buffers()) {
    state["buffer:" + item.key()] = {item.value().detach().clone(), false};
  }
  return state;
}

/// True if `a` and `b` have the same shape, dtype and values (NaN equal to
/// NaN, so that a tensor holding NaN equals itself).
inline bool same_values(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
    return false;
  }
  return ((a == b) | (torch::isnan(a) & torch::isnan(b))).all().item<bool>();
}

/// Expects `module` to hold exactly the names, values and flags of `before`.
inline void expect_unchanged(
    const std::map<std::string, TensorState>& before,
    const torch::nn::Module& module) {
  const auto after = snapshot(module);
  ASSERT_EQ(before.size(), after.size());
  for (const auto& [name, state] : before) {
    const auto found = after.find(name);
    ASSERT_NE(found, after.end()) << name;
    EXPECT_TRUE(same_values(state.values, found->second.values)) << name;
    EXPECT_EQ(state.requires_grad, found->second.requires_grad) << name;
  }
}

/// The base model's parameters (names without "lora_"), by name, cloned.
inline std::map<std::string, torch::Tensor> base_tensors(
    const torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& item : model.named_parameters()) {
    if (item.key().find("lora_") == std::string::npos) {
      tensors[item.key()] = item.value().detach().clone();
    }
  }
  return tensors;
}

/// The float64 block scales of an NF4 QuantizedLinear as its stored
/// tensors define them: `weight_absmax` itself, or double-quantized,
/// 2^(low + (code + 127) step) of the scale's group of 256 (0 for code
/// -128).
inline torch::Tensor reference_block_scales(
    const torchlora::QuantizedLinearImpl& layer) {
  const auto state = layer.named_state();
  auto absmax = state[1].second.detach().to(torch::kFloat64);
  if (state.size() == 4) {
    const auto group = torch::arange(absmax.numel()).floor_divide(256);
    const auto low =
        state[2].second.detach().to(torch::kFloat64).index_select(0, group);
    const auto step =
        state[3].second.detach().to(torch::kFloat64).index_select(0, group);
    const auto scale = torch::exp2(low + (absmax + 127) * step);
    absmax = torch::where(absmax == -128, torch::zeros_like(scale), scale);
  }
  return absmax;
}

/// The float64 weight a QuantizedLinear's stored tensors stand for, from
/// their definition: int8 codes times their row's scale; NF4 codes unpacked
/// byte by byte (high nibble first), each QLoRA's table value times its
/// block's scale.
inline torch::Tensor reference_dequantized(
    const torchlora::QuantizedLinearImpl& layer) {
  const auto state = layer.named_state();
  const auto out = layer.options.out_features();
  const auto in = layer.options.in_features();
  if (layer.quantization.format() == torchlora::QuantizedFormat::int8) {
    return state[0].second.detach().to(torch::kFloat64) *
        state[1].second.detach().to(torch::kFloat64).unsqueeze(1);
  }
  const auto bytes = state[0].second.to(torch::kLong);
  const auto codes =
      torch::stack({bytes.floor_divide(16), bytes.remainder(16)}, 1).view(-1);
  const auto absmax = reference_block_scales(layer);
  const auto& values = torchlora::detail::nf4_values();
  const auto table =
      torch::tensor(std::vector<double>(values.begin(), values.end()));
  const auto block = torch::arange(codes.numel())
                         .floor_divide(layer.quantization.block_size());
  return (table.index_select(0, codes) * absmax.index_select(0, block))
      .narrow(0, 0, out * in)
      .view({out, in});
}

/// "path:type" of every module of `model`, to compare module trees.
inline std::vector<std::string> module_tree(const torch::nn::Module& model) {
  std::vector<std::string> tree;
  model.apply([&](const std::string& name, const torch::nn::Module& module) {
    tree.push_back(name + ":" + module.name());
  });
  return tree;
}

} // namespace torchlora_test

/// Expects `statement` to throw a c10::Error whose message starts with
/// "torchlora:" and contains `text`.
#define EXPECT_TORCHLORA_ERROR(statement, text)                    \
  do {                                                             \
    try {                                                          \
      statement;                                                   \
      ADD_FAILURE() << "expected an error containing: " << (text); \
    } catch (const c10::Error& error) {                            \
      const auto message = torchlora_test::message_of(error);      \
      EXPECT_EQ(message.rfind("torchlora:", 0), 0u) << message;    \
      EXPECT_NE(message.find(text), std::string::npos) << message; \
    }                                                              \
  } while (false)

/// Expects `statement` to throw a c10::Error of LibTorch's own (not one of
/// torchlora's) whose message contains `text`.
#define EXPECT_LIBTORCH_ERROR(statement, text)                     \
  do {                                                             \
    try {                                                          \
      statement;                                                   \
      ADD_FAILURE() << "expected an error containing: " << (text); \
    } catch (const c10::Error& error) {                            \
      const auto message = torchlora_test::message_of(error);      \
      EXPECT_NE(message.rfind("torchlora:", 0), 0u) << message;    \
      EXPECT_NE(message.find(text), std::string::npos) << message; \
    }                                                              \
  } while (false)

/// Skips a `*_CUDA` test cleanly on a machine without a CUDA device.
#define SKIP_WITHOUT_CUDA()                                    \
  do {                                                         \
    if (!torch::cuda::is_available()) {                        \
      GTEST_SKIP() << "no CUDA device: skipping " << __func__; \
    }                                                          \
  } while (false)
