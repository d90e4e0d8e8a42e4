#pragma once

#include <torchlora/detail/adapted_weight_function.h>
#include <torchlora/detail/check.h>
#include <torchlora/layer_base.h>
#include <torchlora/options.h>

#include <torch/nn/functional/embedding.h>
#include <torch/nn/init.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/parameterdict.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace torchlora {

/// An Embedding with LoRA adapters: `y = W[x] + sum over adapters of
/// scaling * A^T[x] B^T`, W the frozen base table `[num_embeddings,
/// embedding_dim]`, A `[r, num_embeddings]`, B `[embedding_dim, r]`.
///
/// As in peft: the tensors are registered directly, as
/// `lora_embedding_A.<name>` and `lora_embedding_B.<name>` (no `.weight`);
/// A starts at zero and B normal, so a fresh adapter changes nothing; there
/// is no dropout (dropping an index would drop the whole row: an adapter's
/// dropout option is ignored here, with a warning); the base's
/// `padding_idx` holds for the adapter too (that column of A gets no
/// gradient), and so does `scale_grad_by_freq` (to every order of
/// gradient: see `lookup`). Bases with `max_norm`
/// (which renormalises the table in place in every forward) or `sparse`
/// gradients are refused.
///
/// Built from `EmbeddingOptions` it is a plain, trainable Embedding until
/// `add_adapter` attaches an adapter: declare typed members this way to make
/// them adaptable by `inject_lora`.
///
/// Example:
/// ```
/// torchlora::LoRAEmbedding emb(torch::nn::Embedding(32000, 512),
///                              torchlora::LoRAOptions(8).alpha(16));
/// torch::Tensor y = emb(torch::tensor({{1, 2, 3}}));  // [1, 3, 512]
/// ```
class LoRAEmbeddingImpl final
    : public LoRALayerImpl<LoRAEmbeddingImpl, torch::nn::EmbeddingImpl> {
  using Base = LoRALayerImpl<LoRAEmbeddingImpl, torch::nn::EmbeddingImpl>;
  friend Base;

 public:
  static constexpr const char* kName = "LoRAEmbedding";
  static constexpr const char* kBaseName = "Embedding";

  /// A plain, trainable Embedding of `num_embeddings` rows of
  /// `embedding_dim`.
  LoRAEmbeddingImpl(int64_t num_embeddings, int64_t embedding_dim)
      : LoRAEmbeddingImpl(
            torch::nn::EmbeddingOptions(num_embeddings, embedding_dim)) {}

  /// A plain, trainable Embedding; attach adapters with `add_adapter`.
  explicit LoRAEmbeddingImpl(const torch::nn::EmbeddingOptions& options_)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(
            BaseHolder(std::make_shared<torch::nn::EmbeddingImpl>(options_))) {}

  /// Adopts `base` (sharing its table) with no adapter and without changing
  /// whether it is trainable.
  explicit LoRAEmbeddingImpl(const BaseHolder& base)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(base) {}

  /// Wraps `base` (sharing its table), freezes it and attaches the adapter
  /// "default". With rank 0 it is the frozen base with no adapter.
  LoRAEmbeddingImpl(const BaseHolder& base, const LoRAOptions& lora)
      : TORCHLORA_NAME_VIRTUAL_MODULE(Base::module_name()) Base(base) {
    this->wrap_with(lora);
  }

  /// The rows of `indices` (integers in `[0, num_embeddings)`, any shape)
  /// plus each active adapter's scaled `A^T[indices] B^T`:
  /// `[*indices.shape, embedding_dim]`.
  torch::Tensor forward(const torch::Tensor& indices) {
    const auto running = this->forward_scope();
    check_indices(indices);
    if (const auto* routing = this->row_routing()) {
      this->check_routed_input(*routing, indices, 1, "indices");
      return this->routed_forward(
          *routing, indices, 1, [this](const torch::Tensor& grouped) {
            return lookup(weight, grouped);
          });
    }
    auto y = lookup(weight, indices);
    if (this->adapters_in_use()) {
      if (this->dora_in_use()) {
        return this->forward_with_dora(indices, y);
      }
      this->add_adapter_outputs(indices, y);
    }
    return y;
  }

  /// The A tables by adapter name; empty holder until the first adapter.
  torch::nn::ParameterDict lora_embedding_A{nullptr};

  /// The B tables by adapter name; empty holder until the first adapter.
  torch::nn::ParameterDict lora_embedding_B{nullptr};

 private:
  /// DoRA's magnitude runs along the table's columns (embedding_dim), as
  /// in peft.
  static constexpr int64_t kMagnitudeAxis = 1;

  /// The rows of `indices`: the base's output (it has no bias).
  torch::Tensor base_output(const torch::Tensor& indices) const {
    return lookup(weight, indices);
  }

  static torch::Tensor bias_of(const torch::nn::EmbeddingImpl&) {
    return torch::Tensor();
  }

  void check_adapter_options(const std::string& name, const LoRAOptions& lora)
      const {
    TORCHLORA_CHECK(
        !options.max_norm(),
        "cannot add adapter \"",
        name,
        "\" to an Embedding with max_norm = ",
        options.max_norm().value_or(0),
        ": its forward renormalises the frozen table in place; use an "
        "Embedding without max_norm");
    TORCHLORA_CHECK(
        !options.sparse(),
        "cannot add adapter \"",
        name,
        "\" to an Embedding with sparse = true: the adapter's gradients are "
        "dense; use an Embedding with sparse = false");
    if (lora.dropout() > 0) {
      TORCHLORA_WARN_ONCE(
          "an Embedding adapter applies no dropout (as in peft: "
          "dropping an index drops its whole row); dropout = ",
          lora.dropout(),
          " is ignored there");
    }
  }

  /// Indices, not dropped out.
  static const torch::Tensor& adapter_input(
      const detail::Adapter&,
      const torch::Tensor& indices) {
    return indices;
  }

  void check_indices(const torch::Tensor& indices) const {
    const auto dtype = indices.scalar_type();
    TORCHLORA_CHECK(
        dtype == torch::kLong || dtype == torch::kInt,
        "LoRAEmbedding expects integer indices (int64 or int32), "
        "got ",
        dtype);
    if (indices.numel() == 0) {
      return;
    }
    // One pass and one copy to the host, also for CUDA indices.
    const auto [min, max] = torch::aminmax(indices);
    const auto bounds = torch::stack({min, max}).to(torch::kCPU, torch::kLong);
    const auto low = bounds[0].item<int64_t>();
    const auto high = bounds[1].item<int64_t>();
    TORCHLORA_CHECK(
        low >= 0 && high < options.num_embeddings(),
        "LoRAEmbedding expects indices in [0, ",
        options.num_embeddings(),
        "), got indices from ",
        low,
        " to ",
        high,
        " (input of shape ",
        indices.sizes(),
        ")");
  }

  std::pair<torch::Tensor, torch::Tensor> create_matrices(
      const std::string& name,
      int64_t rank,
      torch::Device device,
      torch::Dtype dtype) {
    const auto make = [&](int64_t rows, int64_t columns) {
      return torch::empty(
                 {rows, columns},
                 torch::TensorOptions().device(device).dtype(dtype))
          .set_requires_grad(true);
    };
    if (lora_embedding_A.is_empty()) {
      lora_embedding_A =
          this->register_module("lora_embedding_A", torch::nn::ParameterDict());
      lora_embedding_B =
          this->register_module("lora_embedding_B", torch::nn::ParameterDict());
    }
    const auto A =
        lora_embedding_A->insert(name, make(rank, options.num_embeddings()));
    const auto B =
        lora_embedding_B->insert(name, make(options.embedding_dim(), rank));
    return {A, B};
  }

  void remove_matrices(const std::string& name, bool last) {
    lora_embedding_A->pop(name);
    lora_embedding_B->pop(name);
    if (last) {
      this->unregister_module("lora_embedding_A");
      this->unregister_module("lora_embedding_B");
      lora_embedding_A = nullptr;
      lora_embedding_B = nullptr;
    }
  }

  /// peft's init for embeddings: A zeros and B standard normal, so a fresh
  /// adapter changes nothing; `random` makes both normal.
  static void init_matrices(
      LoRAInit init,
      int64_t /*rank*/,
      const torch::Tensor& A,
      const torch::Tensor& B) {
    torch::NoGradGuard no_grad;
    if (init == LoRAInit::random) {
      torch::nn::init::normal_(A);
    } else {
      A.zero_();
    }
    torch::nn::init::normal_(B);
  }

  /// `weight += s (B A)^T = s A^T B^T`.
  /// `weight + s A^T B^T`, differentiable in A and B (see `LoRALayerImpl`).
  torch::Tensor add_recorded_delta(
      const torch::Tensor& weight,
      const detail::Adapter& adapter,
      const std::string& where) const {
    return detail::AdaptedWeightFunction::apply(
        weight,
        adapter.B.t(),
        adapter.A.t(),
        adapter.effective_scaling(),
        where);
  }

  static void add_delta_weight(
      torch::Tensor& weight,
      const torch::Tensor& A,
      const torch::Tensor& B,
      double s) {
    weight.addmm_(A.t(), B.t(), /*beta=*/1, /*alpha=*/s);
  }

  /// `A^T[indices] B^T`, the lookup with the base's padding_idx and
  /// scale_grad_by_freq.
  torch::Tensor adapter_product(
      const detail::Adapter& adapter,
      const torch::Tensor& indices) const {
    return lookup(adapter.A.t(), indices).matmul(adapter.B.t());
  }

  /// `table[indices]` with the base's padding_idx and scale_grad_by_freq.
  /// LibTorch's embedding backward is not differentiable in its
  /// scale_grad_by_freq factor (its double backward leaves it out), so when
  /// a gradient may be taken of `table`'s gradient the factor is applied with
  /// plain differentiable ops on the gathered rows instead: same values, same
  /// first-order gradient, exact higher orders.
  torch::Tensor lookup(const torch::Tensor& table, const torch::Tensor& indices)
      const {
    namespace F = torch::nn::functional;
    // A sparse (so plain) layer keeps LibTorch's path and its refusal of
    // scale_grad_by_freq with sparse gradients.
    if (options.scale_grad_by_freq() && !options.sparse() &&
        table.requires_grad() && torch::GradMode::is_enabled()) {
      if (options.max_norm()) { // a plain layer (adapters refuse max_norm)
        torch::NoGradGuard no_grad;
        auto renormed = table; // 1.x takes a non-const reference
        torch::embedding_renorm_(
            renormed,
            indices.contiguous(),
            *options.max_norm(),
            options.norm_type());
      }
      const auto flat = indices.reshape({-1}).to(torch::kLong);
      const auto counts = torch::bincount(flat, /*weights=*/{}, table.size(0));
      auto factor = counts.index_select(0, flat).to(table.scalar_type());
      factor = factor.reciprocal();
      if (options.padding_idx()) {
        factor.masked_fill_(flat == *options.padding_idx(), 0);
      }
      const auto rows = table.index_select(0, flat);
      const auto values = rows.detach();
      auto shape = indices.sizes().vec();
      shape.push_back(table.size(1));
      return (values + (rows - values) * factor.unsqueeze(1)).view(shape);
    }
    auto lookup_options = F::EmbeddingFuncOptions()
                              .max_norm(options.max_norm())
                              .norm_type(options.norm_type())
                              .scale_grad_by_freq(options.scale_grad_by_freq())
                              .sparse(options.sparse());
    if (options.padding_idx()) {
      lookup_options.padding_idx(*options.padding_idx());
    }
    return F::embedding(indices, table, lookup_options);
  }
};

/// A `ModuleHolder` for `LoRAEmbeddingImpl`, used like
/// `torch::nn::Embedding`.
TORCH_MODULE(LoRAEmbedding);

} // namespace torchlora
