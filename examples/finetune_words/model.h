#pragma once
// A small character-level transformer in ordinary LibTorch style, with one
// of two bodies:
// - its own blocks: the attention projections are typed
//   `torchlora::LoRALinear` members (plain, trainable Linear layers until an
//   adapter is attached), the MLP lives in a Sequential and the blocks in a
//   ModuleList;
// - LibTorch's own `torch::nn::TransformerEncoder` (a causal mask, GELU, no
//   dropout), whose layers torchlora binds rather than swaps: its forward
//   then runs inside a `torchlora::AdaptedWeights` scope.

#include <torchlora/torchlora.h>

#include <cmath>
#include <limits>

namespace words {

/// Which transformer blocks the model is made of.
enum class Body {
  kOwnBlocks, ///< `Block`s below, declared in this file
  kTorchEncoder, ///< `torch::nn::TransformerEncoder`
};

struct ModelOptions {
  Body body = Body::kOwnBlocks;
  int64_t vocabulary = 0;
  int64_t width = 128;
  int64_t heads = 4;
  int64_t layers = 2;
  int64_t max_length = 26;
};

struct AttentionImpl : torch::nn::Module {
  AttentionImpl(int64_t width, int64_t heads) : heads(heads) {
    q_proj = register_module("q_proj", torchlora::LoRALinear(width, width));
    k_proj = register_module("k_proj", torchlora::LoRALinear(width, width));
    v_proj = register_module("v_proj", torchlora::LoRALinear(width, width));
    o_proj = register_module("o_proj", torchlora::LoRALinear(width, width));
  }

  /// Causal self-attention over x [B, T, width].
  torch::Tensor forward(const torch::Tensor& x) {
    const auto B = x.size(0);
    const auto T = x.size(1);
    const auto split = [&](const torch::Tensor& t) {
      return t.view({B, T, heads, -1}).transpose(1, 2); // [B, H, T, D]
    };
    const auto q = split(q_proj(x));
    const auto k = split(k_proj(x));
    const auto v = split(v_proj(x));
    auto scores = q.matmul(k.transpose(-2, -1)) /
        std::sqrt(static_cast<double>(q.size(-1)));
    const auto future =
        torch::ones(
            {T, T},
            torch::TensorOptions().dtype(torch::kBool).device(x.device()))
            .triu(1);
    scores = scores.masked_fill(future, -1e9);
    const auto mixed = torch::softmax(scores, -1)
                           .matmul(v)
                           .transpose(1, 2)
                           .reshape({B, T, -1});
    return o_proj(mixed);
  }

  int64_t heads;
  torchlora::LoRALinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr},
      o_proj{nullptr};
};
TORCH_MODULE(Attention);

struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t width, int64_t heads) {
    norm1 = register_module(
        "norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    attn = register_module("attn", Attention(width, heads));
    norm2 = register_module(
        "norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
    mlp = register_module(
        "mlp",
        torch::nn::Sequential(
            torch::nn::Linear(width, 4 * width),
            torch::nn::GELU(),
            torch::nn::Linear(4 * width, width)));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    const auto h = x + attn(norm1(x));
    return h + mlp->forward(norm2(h));
  }

  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  Attention attn{nullptr};
  torch::nn::Sequential mlp{nullptr};
};
TORCH_MODULE(Block);

/// Predicts the next character of a word from the characters before it.
struct CharTransformerImpl : torch::nn::Module {
  explicit CharTransformerImpl(const ModelOptions& options) {
    embed = register_module(
        "embed", torch::nn::Embedding(options.vocabulary, options.width));
    position = register_module(
        "position", torch::nn::Embedding(options.max_length, options.width));
    if (options.body == Body::kTorchEncoder) {
      namespace nn = torch::nn;
      encoder = register_module(
          "encoder",
          nn::TransformerEncoder(nn::TransformerEncoderOptions(
              nn::TransformerEncoderLayerOptions(options.width, options.heads)
                  .dim_feedforward(4 * options.width)
                  .dropout(0)
                  .activation(torch::kGELU),
              options.layers)));
    } else {
      blocks = register_module("blocks", torch::nn::ModuleList());
      for (int64_t i = 0; i < options.layers; ++i) {
        blocks->push_back(Block(options.width, options.heads));
      }
    }
    norm = register_module(
        "norm",
        torch::nn::LayerNorm(torch::nn::LayerNormOptions({options.width})));
    head = register_module(
        "head", torch::nn::Linear(options.width, options.vocabulary));
  }

  /// Logits [B, T, vocabulary] for ids [B, T].
  torch::Tensor forward(const torch::Tensor& ids) {
    const auto positions = torch::arange(ids.size(1), ids.options());
    auto x = embed(ids) + position(positions);
    if (encoder) {
      // LibTorch's encoder takes [T, B, width] and an additive mask: -inf
      // where a character would see the ones after it.
      const auto T = ids.size(1);
      const auto future =
          torch::full(
              {T, T}, -std::numeric_limits<double>::infinity(), x.options())
              .triu(1);
      return head(norm(encoder(x.transpose(0, 1), future).transpose(0, 1)));
    }
    for (const auto& block : *blocks) {
      x = block->as<BlockImpl>()->forward(x);
    }
    return head(norm(x));
  }

  torch::nn::Embedding embed{nullptr}, position{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::TransformerEncoder encoder{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(CharTransformer);

} // namespace words
