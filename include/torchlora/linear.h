#pragma once

#include <torchlora/detail/lora_linear_function.h>
#include <torchlora/detail/text.h>
#include <torchlora/layer.h>
#include <torchlora/options.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <ostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace torchlora {
namespace detail {

/// One adapter of a LoRA layer: its options, its scale and its matrices.
struct LinearAdapter {
  std::string name;
  LoRAOptions options;
  double scaling;
  /// Holds A as its `weight`, `[rank, in_features]`, no bias.
  torch::nn::Linear A{nullptr};
  /// Holds B as its `weight`, `[out_features, rank]`, no bias.
  torch::nn::Linear B{nullptr};
  /// Run-time multiplier of the contribution (`set_scale`).
  double scale = 1.0;
  /// Whether the forward uses this adapter (`set_active_adapters`).
  bool active = true;

  /// The factor the product is multiplied by in the forward and in a merge.
  double effective_scaling() const {
    return scaling * scale;
  }
};

/// A bias-free Linear whose weight is a LoRA matrix of `[out, in]`.
inline torch::nn::Linear make_lora_matrix(
    int64_t in,
    int64_t out,
    torch::Device device,
    torch::Dtype dtype) {
  torch::nn::Linear matrix(torch::nn::LinearOptions(in, out).bias(false));
  matrix->to(device, dtype);
  return matrix;
}

/// Fills A and B as `init` asks.
inline void init_lora_matrices(
    LoRAInit init,
    int64_t rank,
    const torch::Tensor& A,
    const torch::Tensor& B) {
  torch::NoGradGuard no_grad;
  switch (init) {
    case LoRAInit::kaiming_uniform:
      torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
      B.zero_();
      break;
    case LoRAInit::gaussian:
      torch::nn::init::normal_(A, 0.0, 1.0 / static_cast<double>(rank));
      B.zero_();
      break;
    case LoRAInit::random:
      torch::nn::init::kaiming_uniform_(A, std::sqrt(5.0));
      torch::nn::init::kaiming_uniform_(B, std::sqrt(5.0));
      break;
  }
}

} // namespace detail

/// A Linear layer with LoRA adapters: `y = x W^T + b + sum over adapters of
/// scaling * (dropout(x) A^T) B^T`, where W and b are the frozen base layer's.
///
/// The base layer's `weight` and `bias` are registered under those exact
/// names (they are the same tensors, never copies), so checkpoint keys are a
/// plain Linear's. Each adapter adds `lora_A.<name>.weight` `[r, in]` and
/// `lora_B.<name>.weight` `[out, r]`.
///
/// Built from `LinearOptions` it is a plain, trainable Linear until
/// `add_adapter` attaches an adapter: declare typed members of a model this
/// way to make them adaptable by `inject_lora`.
///
/// Example:
/// ```
/// torch::nn::Linear base(torch::nn::LinearOptions(64, 32));
/// torchlora::LoRALinear layer(base, torchlora::LoRAOptions(8).alpha(16));
/// torch::Tensor y = layer(torch::randn({4, 10, 64}));  // [4, 10, 32]
/// ```
///
/// `BaseImpl` is the base layer's module type, `torch::nn::LinearImpl` for
/// `LoRALinear`. Any type with LinearImpl's shape works: a constructor from
/// its `options` (which have `in_features()`, `out_features()`, `bias()`),
/// `weight` and `bias` tensors, `reset_parameters()`, and a forward equal to
/// `torch::nn::functional::linear(x, weight, bias)`.
template <typename BaseImpl>
class LoRALinearImplT : public torch::nn::Cloneable<LoRALinearImplT<BaseImpl>>,
                        public LoRALayer {
 public:
  using BaseHolder = torch::nn::ModuleHolder<BaseImpl>;
  using BaseOptions = std::decay_t<decltype(std::declval<BaseImpl&>().options)>;

  /// A plain, trainable Linear of `in_features -> out_features`.
  LoRALinearImplT(int64_t in_features, int64_t out_features)
      : LoRALinearImplT(BaseOptions(in_features, out_features)) {}

  /// A plain, trainable Linear; attach adapters with `add_adapter`.
  explicit LoRALinearImplT(const BaseOptions& options_) : options(options_) {
    reset();
  }

  /// Adopts `base` (sharing its tensors) with no adapter and without changing
  /// which of its tensors are trainable.
  explicit LoRALinearImplT(const BaseHolder& base)
      : options(checked_base(base)->options), base_(base.ptr()) {
    reset();
  }

  /// Wraps `base` (sharing its tensors), freezes it and attaches the adapter
  /// "default". With rank 0 it is the frozen base with no adapter.
  LoRALinearImplT(const BaseHolder& base, const LoRAOptions& lora)
      : options(checked_base(base)->options) {
    detail::check_lora_options(lora);
    base_ = base.ptr();
    reset();
    freeze_base();
    if (lora.rank() > 0) {
      add_adapter("default", lora);
    }
  }

  /// Registers `weight` and `bias` (the base layer's tensors), creating the
  /// base layer first if there is none. Adapters are not created here:
  /// `add_adapter` attaches them and `clone()`, overridden, copies them.
  void reset() override {
    if (!base_) {
      base_ = std::make_shared<BaseImpl>(options);
    }
    weight = this->register_parameter(
        "weight", base_->weight, base_->weight.requires_grad());
    bias = this->register_parameter(
        "bias",
        base_->bias,
        base_->bias.defined() && base_->bias.requires_grad());
  }

  /// Re-initializes the base layer and every adapter.
  void reset_parameters() {
    check_not_merged("reset_parameters");
    base_->reset_parameters();
    for (const auto& adapter : adapters_) {
      detail::init_lora_matrices(
          adapter.options.init(),
          adapter.options.rank(),
          adapter.A->weight,
          adapter.B->weight);
    }
  }

  /// Attaches a new adapter and freezes the base layer.
  ///
  /// The adapter is created on the base weight's device, in `lora.dtype()`
  /// or else the base weight's dtype.
  void add_adapter(const std::string& name, const LoRAOptions& lora) override {
    check_not_merged("add_adapter");
    check_new_adapter_name(name);
    TORCH_CHECK(
        lora.rank() > 0,
        "torchlora: add_adapter(\"",
        name,
        "\") needs a rank > 0, got ",
        lora.rank());
    detail::check_lora_options(lora);

    const auto dtype = lora.dtype().value_or(weight.scalar_type());
    detail::LinearAdapter adapter{
        name,
        lora,
        lora_scaling(lora),
        detail::make_lora_matrix(
            options.in_features(), lora.rank(), weight.device(), dtype),
        detail::make_lora_matrix(
            lora.rank(), options.out_features(), weight.device(), dtype)};
    detail::init_lora_matrices(
        lora.init(), lora.rank(), adapter.A->weight, adapter.B->weight);

    if (lora_A.is_empty()) {
      lora_A = this->register_module("lora_A", torch::nn::ModuleDict());
      lora_B = this->register_module("lora_B", torch::nn::ModuleDict());
    }
    lora_A->update({{name, adapter.A.ptr()}});
    lora_B->update({{name, adapter.B.ptr()}});
    adapters_.push_back(std::move(adapter));
    freeze_base();
  }

  /// Removes adapter `name`; its tensors leave `named_parameters()`. Without
  /// adapters the layer has exactly a plain Linear's parameters again. When
  /// the last active adapter goes, the first remaining one becomes active
  /// (as in peft).
  void delete_adapter(const std::string& name) override {
    check_not_merged("delete_adapter");
    const auto& adapter = find_adapter(name);
    const auto index = static_cast<size_t>(&adapter - adapters_.data());
    // ModuleDict::pop leaves the module registered: unregister it as well.
    for (auto* dict : {&lora_A, &lora_B}) {
      (*dict)->pop(name);
      (*dict)->unregister_module(name);
    }
    const bool was_active = adapter.active;
    adapters_.erase(adapters_.begin() + static_cast<std::ptrdiff_t>(index));
    if (was_active && !adapters_.empty() && !has_active_adapter()) {
      // As peft does: the first remaining adapter becomes the active one.
      set_active_adapters({adapters_.front().name});
    }
    if (adapters_.empty()) {
      this->unregister_module("lora_A");
      this->unregister_module("lora_B");
      lora_A = nullptr;
      lora_B = nullptr;
    }
  }

  void set_active_adapters(const std::vector<std::string>& names) override {
    check_not_merged("set_active_adapters");
    for (auto& adapter : adapters_) {
      adapter.active =
          std::find(names.begin(), names.end(), adapter.name) != names.end();
      adapter.A->weight.set_requires_grad(adapter.active);
      adapter.B->weight.set_requires_grad(adapter.active);
    }
  }

  std::vector<std::string> active_adapters() const override {
    std::vector<std::string> names;
    for (const auto& adapter : adapters_) {
      if (adapter.active) {
        names.push_back(adapter.name);
      }
    }
    return names;
  }

  void set_scale(const std::string& name, double scale) override {
    check_not_merged("set_scale");
    TORCH_CHECK(
        std::isfinite(scale),
        "torchlora: set_scale(\"",
        name,
        "\") needs a finite scale, got ",
        scale);
    find_adapter(name).scale = scale;
  }

  double scale(const std::string& name) const override {
    return find_adapter(name).scale;
  }

  void set_adapters_enabled(bool enabled) override {
    TORCH_CHECK(
        enabled || !merged_,
        "torchlora: cannot disable the adapters of a merged layer; unmerge() "
        "it first (torchlora::DisableAdapters does both)");
    enabled_ = enabled;
  }

  bool adapters_enabled() const override {
    return enabled_;
  }

  /// The factor adapter `name`'s product is multiplied by.
  double scaling(const std::string& name) const {
    return find_adapter(name).scaling;
  }

  /// The options adapter `name` was created with.
  const LoRAOptions& adapter_options(const std::string& name) const {
    return find_adapter(name).options;
  }

  std::vector<std::string> adapter_names() const override {
    std::vector<std::string> names;
    names.reserve(adapters_.size());
    for (const auto& adapter : adapters_) {
      names.push_back(adapter.name);
    }
    return names;
  }

  bool has_adapter(const std::string& name) const override {
    for (const auto& adapter : adapters_) {
      if (adapter.name == name) {
        return true;
      }
    }
    return false;
  }

  std::vector<torch::Tensor> adapter_parameters() const override {
    std::vector<torch::Tensor> tensors;
    for (const auto& adapter : adapters_) {
      tensors.push_back(adapter.A->weight);
      tensors.push_back(adapter.B->weight);
    }
    return tensors;
  }

  std::vector<torch::Tensor> active_adapter_parameters() const override {
    std::vector<torch::Tensor> tensors;
    for (const auto& adapter : adapters_) {
      if (adapter.active) {
        tensors.push_back(adapter.A->weight);
        tensors.push_back(adapter.B->weight);
      }
    }
    return tensors;
  }

  torch::Tensor base_bias() const override {
    return bias;
  }

  /// Merges the active adapters into `weight`: the forward becomes a plain
  /// Linear's. The weight before merging is kept (one more copy of it, same
  /// device and dtype) so that `unmerge` restores it bit for bit. The delta
  /// is computed in fp32 for fp16/bf16 weights. Merging a merged layer, or
  /// one without active adapters, changes nothing.
  void merge(bool safe = false) override {
    if (merged_ || !has_active_adapter()) {
      return;
    }
    TORCH_CHECK(
        enabled_,
        "torchlora: cannot merge a layer whose adapters are disabled "
        "(DisableAdapters); merge after the guard's scope");
    auto merged_weight = weight_with_adapters();
    TORCH_CHECK(
        !safe || torch::isfinite(merged_weight).all().item().toBool(),
        "torchlora: safe merge refused: merging the active adapters (",
        detail::quoted_list(active_adapters()),
        ") gives NaN or Inf weights; nothing was changed");
    torch::NoGradGuard no_grad;
    original_weight_ = weight.detach();
    weight.set_data(merged_weight);
    merged_ = true;
    merged_versions_ = adapter_versions();
  }

  void unmerge() override {
    if (!merged_) {
      return;
    }
    torch::NoGradGuard no_grad;
    weight.set_data(original_weight_);
    original_weight_ = torch::Tensor();
    merged_ = false;
  }

  bool merged() const override {
    return merged_;
  }

  bool merge_is_finite() const override {
    return torch::isfinite(weight_with_adapters()).all().item().toBool();
  }

  void unload(bool merge_first) override {
    TORCH_CHECK(
        !merge_first || enabled_,
        "torchlora: cannot merge a layer whose adapters are disabled "
        "(DisableAdapters); merge after the guard's scope");
    torch::NoGradGuard no_grad;
    if (merge_first && !merged_) {
      weight.set_data(weight_with_adapters());
    } else if (!merge_first && merged_) {
      weight.set_data(original_weight_);
    }
    original_weight_ = torch::Tensor();
    merged_ = false;
    enabled_ = true;
    while (!adapters_.empty()) {
      delete_adapter(adapters_.back().name);
    }
  }

  std::shared_ptr<torch::nn::Module> base_module() const override {
    return base_;
  }

  torch::nn::AnyModule base_any_module() const override {
    return torch::nn::AnyModule(base_);
  }

  /// The wrapped base layer; its tensors are this layer's `weight`/`bias`.
  std::shared_ptr<BaseImpl> base_layer() const {
    return base_;
  }

  /// `x W^T + b` plus each active adapter's scaled low-rank product; just
  /// `x W^T + b` when merged or disabled. `input` has any number of leading
  /// dimensions; its last one must be `in_features`. One active adapter
  /// without dropout work takes a fused path (see LoRALinearFunction).
  torch::Tensor forward(const torch::Tensor& input) {
    TORCH_CHECK(
        input.dim() >= 1 && input.size(-1) == options.in_features(),
        "torchlora: LoRALinear expects the input's last dimension to be "
        "in_features = ",
        options.in_features(),
        ", got an input of shape ",
        input.sizes());
    if (merged_) {
      check_merged_weight_is_current();
    }
    if (merged_ || !enabled_ || !has_active_adapter()) {
      return torch::nn::functional::linear(input, weight, bias);
    }
    const auto x = input.reshape({-1, options.in_features()});
    torch::Tensor y;
    if (const auto* adapter = fast_path_adapter(x)) {
      y = detail::LoRALinearFunction::apply(
          x,
          weight,
          bias.defined() ? bias : x.new_empty({0}),
          adapter->A->weight,
          adapter->B->weight,
          adapter->effective_scaling(),
          detail::fold_adapter_into_weight(
              x.size(0),
              options.in_features(),
              options.out_features(),
              x.scalar_type()));
    } else {
      y = torch::nn::functional::linear(x, weight, bias);
      for (const auto& adapter : adapters_) {
        if (adapter.active) {
          add_adapter_output(adapter, x, y);
        }
      }
    }
    auto sizes = input.sizes().vec();
    sizes.back() = options.out_features();
    return y.view(sizes);
  }

  /// Moves or casts everything, the weight kept for `unmerge` included.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false)
      override {
    torch::nn::Module::to(device, dtype, non_blocking);
    follow_weight();
  }

  void to(torch::Dtype dtype, bool non_blocking = false) override {
    torch::nn::Module::to(dtype, non_blocking);
    follow_weight();
  }

  void to(torch::Device device, bool non_blocking = false) override {
    torch::nn::Module::to(device, non_blocking);
    follow_weight();
  }

  /// Saves like any module; a merged layer saves its unmerged weight, so a
  /// checkpoint always holds base weights next to the adapters.
  void save(torch::serialize::OutputArchive& archive) const override {
    for (const auto& item : this->named_parameters(/*recurse=*/false)) {
      const bool unmerged = merged_ && item.key() == "weight";
      archive.write(item.key(), unmerged ? original_weight_ : item.value());
    }
    for (const auto& item : this->named_buffers(/*recurse=*/false)) {
      archive.write(item.key(), item.value(), /*is_buffer=*/true);
    }
    for (const auto& child : this->named_children()) {
      if (child.value()->is_serializable()) {
        torch::serialize::OutputArchive child_archive(
            archive.compilation_unit());
        child.value()->save(child_archive);
        archive.write(child.key(), child_archive);
      }
    }
  }

  /// Loads like any module; a merged layer is merged again with what was
  /// loaded.
  void load(torch::serialize::InputArchive& archive) override {
    const bool was_merged = merged_;
    unmerge();
    torch::nn::Module::load(archive);
    if (was_merged) {
      merge();
    }
  }

  /// Deep copy: new base tensors and adapters with equal values, the same
  /// trainable flags and training mode; nothing is shared with `*this`.
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device =
          c10::nullopt) const override {
    torch::NoGradGuard no_grad;
    auto base_copy = std::dynamic_pointer_cast<BaseImpl>(base_->clone(device));
    TORCH_INTERNAL_ASSERT(base_copy, "torchlora: base layer clone failed");
    auto copy = std::make_shared<LoRALinearImplT>(BaseHolder(base_copy));
    for (const auto& adapter : adapters_) {
      copy->add_adapter(adapter.name, adapter.options);
      auto& target = copy->adapters_.back();
      target.scale = adapter.scale;
      target.active = adapter.active;
      copy_tensor(adapter.A->weight, target.A->weight, device);
      copy_tensor(adapter.B->weight, target.B->weight, device);
    }
    copy->enabled_ = enabled_;
    copy->merged_ = merged_;
    if (merged_) {
      copy->original_weight_ = device && original_weight_.device() != *device
          ? original_weight_.to(*device)
          : original_weight_.clone();
      copy->merged_versions_ = copy->adapter_versions();
    }
    copy->weight.set_requires_grad(weight.requires_grad());
    if (bias.defined()) {
      copy->bias.set_requires_grad(bias.requires_grad());
    }
    copy->train(this->is_training());
    return copy;
  }

  /// Prints e.g. `torchlora::LoRALinear(in_features=64, out_features=32,
  /// bias=true, rank=8, alpha=16, dropout=0.1)`.
  void pretty_print(std::ostream& stream) const override {
    stream << std::boolalpha
           << "torchlora::LoRALinear(in_features=" << options.in_features()
           << ", out_features=" << options.out_features()
           << ", bias=" << options.bias();
    const bool single_default =
        adapters_.size() == 1 && adapters_.front().name == "default";
    for (const auto& adapter : adapters_) {
      stream << ", ";
      if (!single_default) {
        stream << adapter.name << "=(";
      }
      stream << "rank=" << adapter.options.rank()
             << ", alpha=" << adapter.options.alpha()
             << ", dropout=" << adapter.options.dropout();
      if (adapter.options.use_rslora()) {
        stream << ", use_rslora=true";
      }
      if (!single_default) {
        stream << ")";
      }
    }
    stream << ")";
  }

  /// The options of the base layer (features and bias).
  BaseOptions options;

  /// The base layer's weight `[out_features, in_features]` (shared, frozen
  /// once an adapter is attached).
  torch::Tensor weight;

  /// The base layer's bias `[out_features]`; undefined without bias.
  torch::Tensor bias;

  /// The A matrices by adapter name; empty holder until the first adapter.
  torch::nn::ModuleDict lora_A{nullptr};

  /// The B matrices by adapter name; empty holder until the first adapter.
  torch::nn::ModuleDict lora_B{nullptr};

 private:
  static const BaseHolder& checked_base(const BaseHolder& base) {
    TORCH_CHECK(
        !base.is_empty(),
        "torchlora: cannot wrap an empty (nullptr) Linear; got a holder "
        "that holds no module");
    return base;
  }

  void check_new_adapter_name(const std::string& name) const {
    TORCH_CHECK(
        !name.empty(),
        "torchlora: an adapter name must not be empty, got \"\"");
    TORCH_CHECK(
        name.find('.') == std::string::npos,
        "torchlora: an adapter name must not contain '.', got \"",
        name,
        "\"");
    TORCH_CHECK(
        !has_adapter(name),
        "torchlora: this layer already has an adapter named \"",
        name,
        "\"");
  }

  const detail::LinearAdapter& find_adapter(const std::string& name) const {
    const auto found = std::find_if(
        adapters_.begin(), adapters_.end(), [&](const auto& adapter) {
          return adapter.name == name;
        });
    TORCH_CHECK(
        found != adapters_.end(),
        "torchlora: this layer has no adapter named \"",
        name,
        "\" (it has: ",
        detail::quoted_list(adapter_names()),
        ")");
    return *found;
  }

  detail::LinearAdapter& find_adapter(const std::string& name) {
    const auto& found =
        static_cast<const LoRALinearImplT&>(*this).find_adapter(name);
    return const_cast<detail::LinearAdapter&>(found);
  }

  void check_not_merged(const char* operation) const {
    TORCH_CHECK(
        !merged_,
        "torchlora: ",
        operation,
        " on a merged layer; unmerge() it first");
  }

  /// The version counters of the active adapters' matrices: in-place
  /// changes (an optimizer step, `copy_`, `load_adapter`) bump them.
  std::vector<int64_t> adapter_versions() const {
    std::vector<int64_t> versions;
    for (const auto& adapter : adapters_) {
      if (adapter.active) {
        versions.push_back(adapter.A->weight._version());
        versions.push_back(adapter.B->weight._version());
      }
    }
    return versions;
  }

  /// A merged weight holds the adapters as they were at `merge`: if they
  /// changed since, using it would silently ignore the change.
  void check_merged_weight_is_current() const {
    TORCH_CHECK(
        adapter_versions() == merged_versions_,
        "torchlora: an adapter of this merged layer (",
        detail::quoted_list(active_adapters()),
        ") was changed after merge(), so the merged weight is stale; "
        "unmerge() before changing adapters and merge() again after");
  }

  bool has_active_adapter() const {
    return std::any_of(adapters_.begin(), adapters_.end(), [](const auto& a) {
      return a.active;
    });
  }

  /// `weight` plus every active adapter's scaled `B A`, computed in fp32 for
  /// fp16/bf16 weights (in the weight's dtype otherwise), returned in the
  /// weight's dtype. `weight` itself is not changed.
  torch::Tensor weight_with_adapters() const {
    torch::NoGradGuard no_grad;
    const auto dtype = weight.scalar_type();
    const bool half = dtype == torch::kHalf || dtype == torch::kBFloat16;
    const auto compute = half ? torch::kFloat : dtype;
    auto result =
        weight.detach().to(compute, /*non_blocking=*/false, /*copy=*/true);
    for (const auto& adapter : adapters_) {
      if (adapter.active) {
        result.addmm_(
            adapter.B->weight.detach().to(compute),
            adapter.A->weight.detach().to(compute),
            /*beta=*/1,
            /*alpha=*/adapter.effective_scaling());
      }
    }
    return result.to(dtype);
  }

  /// Keeps the weight saved for `unmerge` on the weight's device and dtype.
  void follow_weight() {
    if (merged_) {
      original_weight_ =
          original_weight_.to(weight.device(), weight.scalar_type());
    }
  }

  void freeze_base() {
    weight.set_requires_grad(false);
    if (bias.defined()) {
      bias.set_requires_grad(false);
    }
  }

  /// Gives `to` a copy of `from`'s values and its trainable flag.
  static void copy_tensor(
      const torch::Tensor& from,
      const torch::Tensor& to,
      const c10::optional<torch::Device>& device) {
    to.set_data(
        device && from.device() != *device ? from.to(*device) : from.clone());
    to.set_requires_grad(from.requires_grad());
  }

  /// The one active adapter when the fused path applies: a single active
  /// adapter in the input's dtype whose dropout does nothing now; else null.
  const detail::LinearAdapter* fast_path_adapter(const torch::Tensor& x) const {
    const detail::LinearAdapter* found = nullptr;
    for (const auto& adapter : adapters_) {
      if (!adapter.active) {
        continue;
      }
      if (found != nullptr) {
        return nullptr;
      }
      found = &adapter;
    }
    if (found == nullptr ||
        (found->options.dropout() > 0 && this->is_training()) ||
        found->A->weight.scalar_type() != x.scalar_type() ||
        weight.scalar_type() != x.scalar_type()) {
      return nullptr;
    }
    return found;
  }

  /// y += scaling * (dropout(x) A^T) B^T, with the scale and the add fused
  /// into one GEMM when the adapter has y's dtype.
  void add_adapter_output(
      const detail::LinearAdapter& adapter,
      const torch::Tensor& x,
      torch::Tensor& y) const {
    auto input = x;
    const double p = adapter.options.dropout();
    if (p > 0 && this->is_training()) {
      input = torch::nn::functional::dropout(
          input,
          torch::nn::functional::DropoutFuncOptions().p(p).training(true));
    }
    const auto& A = adapter.A->weight;
    const auto& B = adapter.B->weight;
    if (A.scalar_type() == y.scalar_type()) {
      y.addmm_(
          input.mm(A.t()),
          B.t(),
          /*beta=*/1,
          /*alpha=*/adapter.effective_scaling());
    } else {
      auto delta = input.to(A.scalar_type()).mm(A.t()).mm(B.t());
      y.add_(delta.mul_(adapter.effective_scaling()).to(y.scalar_type()));
    }
  }

  std::shared_ptr<BaseImpl> base_;
  std::vector<detail::LinearAdapter> adapters_;
  bool enabled_ = true;
  bool merged_ = false;
  /// The weight before `merge`, kept for an exact `unmerge`.
  torch::Tensor original_weight_;
  /// `adapter_versions()` at `merge`.
  std::vector<int64_t> merged_versions_;
};

/// LoRA over `torch::nn::Linear`: the layer `inject_lora` creates.
using LoRALinearImpl = LoRALinearImplT<torch::nn::LinearImpl>;

/// A `ModuleHolder` for `LoRALinearImpl`, used like `torch::nn::Linear`.
///
/// Example:
/// ```
/// torchlora::LoRALinear q(torch::nn::Linear(512, 512),
///                         torchlora::LoRAOptions(8).alpha(16));
/// torchlora::LoRALinear ready(torch::nn::LinearOptions(64, 32));
/// ready->add_adapter("default", torchlora::LoRAOptions(4));
/// ```
TORCH_MODULE(LoRALinear);

} // namespace torchlora
