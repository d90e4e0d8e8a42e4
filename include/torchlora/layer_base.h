#pragma once

#include <torchlora/blas_threads.h>
#include <torchlora/detail/adapted_weight_function.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/forward_count.h>
#include <torchlora/detail/member_sentinel.h>
#include <torchlora/detail/row_routing.h>
#include <torchlora/detail/tensor_bits.h>
#include <torchlora/detail/text.h>
#include <torchlora/layer.h>
#include <torchlora/layer/adapter_set.h>
#include <torchlora/layer/member_binding.h>
#include <torchlora/layer/merge_state.h>
#include <torchlora/options.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/init.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>
#include <torch/utils.h>
#include <torch/version.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <ostream>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

/// LibTorch before 2.2 derives `torch::nn::Cloneable` from
/// `torch::nn::Module` virtually: there the most-derived class constructs
/// `Module`, so a LoRA kind's constructor names it too. From 2.2 on `Module`
/// is an ordinary base, constructed (and named) by `LoRALayerImpl`, and
/// naming it in the kind would not compile.
#if TORCH_VERSION_MAJOR < 2 || \
    (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 2)
#define TORCHLORA_MODULE_IS_VIRTUAL_BASE 1
#define TORCHLORA_NAME_VIRTUAL_MODULE(name) torch::nn::Module(name),
#else
#define TORCHLORA_MODULE_IS_VIRTUAL_BASE 0
#define TORCHLORA_NAME_VIRTUAL_MODULE(name)
#endif

namespace torchlora {
namespace detail {

/// True when `torch::nn::Module` is a virtual base of `T` (a downcast from a
/// virtual base is ill-formed, so the specialization drops out).
template <typename T, typename = void>
struct module_is_virtual_base : std::true_type {};
template <typename T>
struct module_is_virtual_base<
    T,
    std::void_t<decltype(static_cast<T*>(std::declval<torch::nn::Module*>()))>>
    : std::false_type {};

} // namespace detail

/// Everything LoRA layers share, written once: the base layer and its
/// shared `weight`/`bias`, several adapters with an active set, run-time
/// scales and a switch, exact merging, unloading, `clone`, `to`,
/// `save`/`load` and printing (the `LoRALayer` interface). Each layer kind
/// (`LoRALinear`, `LoRAEmbedding`, `LoRAConv1d/2d/3d`) derives from it and
/// adds only its shapes, its forward and its delta weight, the way
/// LibTorch's `ConvNdImpl` leaves little to `Conv1dImpl`...`Conv3dImpl`.
///
/// A kind `Derived` provides (privately, befriending this class):
/// - `static constexpr const char* kName`: e.g. "LoRALinear";
/// - `std::pair<Tensor, Tensor> create_matrices(name, rank, device, dtype)`:
///   A and B, registered under the kind's names;
/// - `void remove_matrices(name, bool last)`: unregisters them;
/// - `Tensor adapter_product(const Adapter&, const Tensor& input)`: the
///   adapter's unscaled output for the (dropped-out) input, in A's dtype;
/// - `static constexpr const char* kBaseName`: e.g. "torch::nn::Linear";
/// and may replace `add_delta_weight(Tensor& weight, A, B, double s)`
/// (adds `s * delta(A, B)` to a weight of the base's shape, or throws a
/// `torchlora:` error when the delta has no such form; by default
/// `s B A`), `init_matrices`, `check_adapter_options`,
/// `check_delta_fits`, `bias_of`, `adapter_input` (dropout) and
/// `add_adapter_output` (y += s * product, fused where it can be).
template <typename Derived, typename BaseImpl>
class LoRALayerImpl : public torch::nn::Cloneable<Derived>,
                      public LoRALayer,
                      public MemberBindable {
 public:
  using BaseHolder = torch::nn::ModuleHolder<BaseImpl>;
  using BaseOptions = std::decay_t<decltype(std::declval<BaseImpl&>().options)>;

  /// Registers `weight` and `bias` (the base layer's tensors) and takes its
  /// options. Adapters are not created here:
  /// `add_adapter` attaches them and `clone()`, overridden, copies them.
  void reset() override {
    options = base_->options;
    const auto& base_weight = Derived::member_weight(*base_);
    weight = this->register_parameter(
        Derived::kWeightName, base_weight, base_weight.requires_grad());
    const auto base_bias = Derived::bias_of(*base_);
    bias = this->register_parameter(
        Derived::kBiasName,
        base_bias,
        base_bias.defined() && base_bias.requires_grad());
  }

  /// Re-initializes the base layer and every adapter.
  void reset_parameters() {
    check_not_merged("reset_parameters");
    check_no_forward_running("reset_parameters");
    if (member_.bound) {
      // The base initializes its member: the registered weight, for now.
      Derived::member_weight(*base_) = weight;
    }
    base_->reset_parameters();
    refresh_member();
    for (const auto& adapter : adapters_.all()) {
      derived().init_matrices(
          adapter.options.init(), adapter.options.rank(), adapter.A, adapter.B);
    }
  }

  /// Attaches a new adapter and freezes the base layer.
  ///
  /// The adapter is created on the base weight's device, in `lora.dtype()`
  /// or else the base weight's dtype.
  void add_adapter(const std::string& name, const LoRAOptions& lora) override {
    check_not_merged("add_adapter");
    check_no_forward_running("add_adapter");
    adapters_.check_new_name(name);
    TORCHLORA_CHECK(
        lora.rank() > 0,
        "add_adapter(\"",
        name,
        "\") needs a rank > 0, got ",
        lora.rank());
    detail::check_lora_options(lora);
    derived().check_adapter_options(name, lora);
    member_.check_options(name, lora);

    const auto dtype = lora.dtype().value_or(weight.scalar_type());
    auto [A, B] =
        derived().create_matrices(name, lora.rank(), weight.device(), dtype);
    detail::Adapter adapter{name, lora, lora_scaling(lora), A, B};
    derived().init_matrices(lora.init(), lora.rank(), adapter.A, adapter.B);
    adapters_.add(std::move(adapter));
    freeze_base();
    // The new matrices' modules take the layer's training mode.
    this->train(this->is_training());
    detail::check_blas_threads_once();
  }

  /// Removes adapter `name`; its tensors leave `named_parameters()`. Without
  /// adapters the layer has exactly its base layer's parameters again. When
  /// the last active adapter goes, the first remaining one becomes active
  /// (as in peft).
  void delete_adapter(const std::string& name) override {
    check_not_merged("delete_adapter");
    check_no_forward_running("delete_adapter");
    detail::check_not_routed(
        this, "delete_adapter", std::string("this ") + Derived::kName);
    const bool was_active = adapters_.find(name).active;
    derived().remove_matrices(name, /*last=*/adapters_.size() == 1);
    adapters_.erase(name);
    if (was_active && !adapters_.empty() && !adapters_.has_active()) {
      set_active_adapters({adapters_.front().name});
    }
  }

  void set_active_adapters(const std::vector<std::string>& names) override {
    check_not_merged("set_active_adapters");
    check_no_forward_running("set_active_adapters");
    adapters_.set_active(names);
  }

  std::vector<std::string> active_adapters() const override {
    return adapters_.active_names();
  }

  void set_scale(const std::string& name, double scale) override {
    check_not_merged("set_scale");
    check_no_forward_running("set_scale");
    TORCHLORA_CHECK(
        std::isfinite(scale),
        "set_scale(\"",
        name,
        "\") needs a finite scale, got ",
        scale);
    adapters_.find(name).scale = scale;
  }

  double scale(const std::string& name) const override {
    return adapters_.find(name).scale;
  }

  void set_adapters_enabled(bool enabled) override {
    TORCHLORA_CHECK(
        enabled || !merge_.merged,
        "cannot disable the adapters of a merged layer; unmerge() "
        "it first (torchlora::DisableAdapters does both)");
    if (enabled && !enabled_ && member_weight_holds() > 0) {
      // A DisableAdapters that ends before an AdaptedWeights made inside
      // it: the held weights take the adapters again.
      detail::check_no_forward_running(
          running_forwards_.running(),
          "set_adapters_enabled",
          std::string("this ") + Derived::kName);
      enabled_ = true;
      refresh_member(/*recompute_held=*/true);
      return;
    }
    check_no_forward_running("set_adapters_enabled");
    enabled_ = enabled;
  }

  bool adapters_enabled() const override {
    return enabled_;
  }

  /// The factor adapter `name`'s product is multiplied by (`alpha / r`, or
  /// `alpha / sqrt(r)` with rsLoRA), before its run-time `scale`.
  double scaling(const std::string& name) const {
    return adapters_.find(name).scaling;
  }

  const LoRAOptions& adapter_options(const std::string& name) const override {
    return adapters_.find(name).options;
  }

  std::vector<std::string> adapter_names() const override {
    return adapters_.names();
  }

  bool has_adapter(const std::string& name) const override {
    return adapters_.has(name);
  }

  std::vector<torch::Tensor> adapter_parameters() const override {
    return adapters_.matrices(/*active_only=*/false);
  }

  std::vector<torch::Tensor> active_adapter_parameters() const override {
    return adapters_.matrices(/*active_only=*/true);
  }

  torch::Tensor base_bias() const override {
    return bias;
  }

  /// Merges the active adapters into `weight`: the forward becomes the base
  /// layer's. The weight before merging is kept (one more copy of it, same
  /// device and dtype) so that `unmerge` restores it bit for bit. The delta
  /// is computed in fp32 for fp16/bf16 weights. Merging a merged layer, or
  /// one without active adapters, changes nothing.
  void merge(bool safe = false) override {
    merge_keeping_original(safe, /*keep_original=*/true);
  }

  /// Merges the active adapters into `weight` itself: no copy of the weight
  /// is kept (the memory of a plain layer), and `unmerge` subtracts the
  /// deltas again, equal up to rounding (not bit for bit; in fp16/bf16 the
  /// rounding of the merged weight stays). Otherwise as `merge`.
  void merge_in_place(bool safe = false) override {
    merge_keeping_original(safe, /*keep_original=*/false);
  }

  /// Restores the weight from before `merge`, bit for bit. A merged weight
  /// changed in place since (an optimizer step on it) is an error here, as
  /// restoring would silently drop that change. After `merge_in_place`, the
  /// deltas that merge added are subtracted (from copies of the adapters
  /// taken then, so adapters changed since do not matter; a change of the
  /// weight made since stays).
  void unmerge() override {
    if (!merge_.merged) {
      return;
    }
    check_unmergeable();
    check_no_forward_running("unmerge");
    torch::NoGradGuard no_grad;
    if (merge_.keeps_original) {
      weight.set_data(merge_.original_weight);
    } else {
      detail::add_deltas_in_place(weight, merge_.deltas, -1.0, add_delta());
    }
    merge_.forget();
    refresh_member();
  }

  bool merged() const override {
    return merge_.merged;
  }

  bool merged_in_place() const override {
    return merge_.in_place();
  }

  int running_forwards() const override {
    return running_forwards_.running();
  }

  /// Counts as a running forward while it lives (each forward holds one),
  /// so that changing the layer meanwhile is refused. Hold one where a
  /// forward is made of several calls that must see the same adapters.
  detail::ForwardCount::Scope forward_scope() const {
    return detail::ForwardCount::Scope(running_forwards_);
  }

  bool merge_is_finite() const override {
    return torch::isfinite(weight_with_adapters()).all().item().toBool();
  }

  void check_mergeable() const override {
    if (merge_.merged) {
      check_merged_weight_is_current();
      return;
    }
    if (!adapters_.has_active()) {
      return;
    }
    check_enabled_for_merge();
    derived().check_delta_fits();
  }

  void check_unmergeable() const override {
    check_restorable("unmerge()");
  }

  void unload(bool merge_first) override {
    if (merge_first) {
      check_mergeable();
    } else {
      check_restorable("unload()");
    }
    check_no_forward_running("unload");
    detail::check_not_routed(
        this, "unload", std::string("this ") + Derived::kName);
    torch::NoGradGuard no_grad;
    if (merge_first && !merge_.merged) {
      weight.set_data(weight_with_adapters());
    } else if (!merge_first && merge_.merged) {
      weight.set_data(weight_before_merge());
    }
    merge_.forget();
    enabled_ = true;
    while (!adapters_.empty()) {
      delete_adapter(adapters_.back().name);
    }
    if (member_.bound) {
      // The member reads the (merged or restored) base weight again.
      Derived::member_weight(*base_) = weight;
      member_ = detail::MemberBinding();
    }
  }

  torch::Tensor base_weight() const override {
    return weight;
  }

  /// Sets training or evaluation mode here, on the adapters and on the base
  /// module, which is not a registered child (its tensors are registered
  /// here under their own names) but whose forward LibTorch may call
  /// through its own member (a MultiheadAttention's dropout).
  void train(bool on = true) override {
    torch::nn::Module::train(on);
    base_->train(on);
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

  /// Moves or casts everything, the weight kept for `unmerge` included.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false)
      override {
    torch::nn::Module::to(device, dtype, non_blocking);
    merge_.follow(weight, adapters_);
    refresh_member(/*recompute_held=*/true);
  }

  void to(torch::Dtype dtype, bool non_blocking = false) override {
    torch::nn::Module::to(dtype, non_blocking);
    merge_.follow(weight, adapters_);
    refresh_member(/*recompute_held=*/true);
  }

  void to(torch::Device device, bool non_blocking = false) override {
    torch::nn::Module::to(device, non_blocking);
    merge_.follow(weight, adapters_);
    refresh_member(/*recompute_held=*/true);
  }

  /// Saves like any module; a merged layer saves its unmerged weight, so a
  /// checkpoint always holds base weights next to the adapters.
  void save(torch::serialize::OutputArchive& archive) const override {
    if (merge_.merged) {
      // The weight written must be the one from before merge().
      check_restorable("saving it");
    }
    for (const auto& item : this->named_parameters(/*recurse=*/false)) {
      const bool unmerged = merge_.merged && item.key() == Derived::kWeightName;
      archive.write(
          item.key(), unmerged ? weight_before_merge() : item.value());
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
  /// loaded. If loading fails (a missing key), a merged layer is put back as
  /// it was, merged, before the error goes on.
  void load(torch::serialize::InputArchive& archive) override {
    if (!merge_.merged) {
      torch::nn::Module::load(archive);
      return;
    }
    // LibTorch's load gives each tensor new storage (`set_`), so views taken
    // now keep the values to put back.
    std::vector<std::pair<torch::Tensor, torch::Tensor>> kept;
    for (const auto& tensor : this->parameters()) {
      kept.emplace_back(tensor, tensor.detach());
    }
    for (const auto& tensor : this->buffers()) {
      kept.emplace_back(tensor, tensor.detach());
    }
    const auto kept_merge = merge_;
    unmerge();
    try {
      torch::nn::Module::load(archive);
    } catch (...) {
      torch::NoGradGuard no_grad;
      for (auto& [tensor, values] : kept) {
        tensor.set_data(values);
      }
      if (kept_merge.keeps_original) {
        merge_ = kept_merge;
        merge_.weight_version = weight._version();
        merge_.checksum = detail::weight_checksum(weight);
      } else {
        merge_keeping_original(/*safe=*/false, /*keep_original=*/false);
      }
      throw;
    }
    merge_keeping_original(/*safe=*/false, kept_merge.keeps_original);
  }

  // ------------------------------------------------------------ members

  bool member_bound() const override {
    return member_.bound;
  }

  void bind_member(const std::string& where) override {
    check_not_merged("bind_member");
    for (const auto& adapter : adapters_.all()) {
      member_.check_options(adapter.name, adapter.options, where);
    }
    member_.bound = true;
    member_.where = where;
    refresh_member();
  }

  int64_t hold_member_weight() override {
    TORCHLORA_CHECK(
        member_.bound,
        "hold_member_weight on a ",
        Derived::kName,
        " that no LibTorch module reads through a member");
    if (merge_.merged) {
      check_merged_weight_is_current();
    }
    // Computed now, in this scope's grad mode; an inner scope's weight
    // never replaces an outer one's for good.
    const auto token = member_.hold(merge_.merged ? weight : adapted_weight());
    refresh_member();
    return token;
  }

  void release_member_weight(int64_t token) override {
    if (member_.release(token)) {
      refresh_member();
    }
  }

  int member_weight_holds() const override {
    return static_cast<int>(member_.holds.size());
  }

  /// The weight this layer computes with: `weight` plus every active
  /// adapter's `s B A`, differentiable in each A and B (to any order;
  /// computed in fp32 for fp16/bf16 weights); `weight` itself when merged,
  /// disabled or without an active adapter. What a bound member holds inside
  /// `AdaptedWeights`. Without gradients to record it equals the merged
  /// weight bit for bit.
  torch::Tensor adapted_weight() const {
    if (merge_.merged) {
      check_merged_weight_is_current(/*in_forward=*/true);
      return weight;
    }
    if (!enabled_ || !adapters_.has_active()) {
      return weight;
    }
    if (!adapters_.records_gradients()) {
      return weight_with_adapters();
    }
    auto adapted = weight;
    const auto where =
        member_.bound ? member_.where : std::string("this ") + Derived::kName;
    for (const auto& adapter : adapters_.all()) {
      if (adapter.active) {
        adapted = derived().add_recorded_delta(adapted, adapter, where);
      }
    }
    return adapted;
  }

  /// Deep copy: new base tensors and adapters with equal values, the same
  /// trainable flags and training mode; nothing is shared with `*this`.
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device =
          c10::nullopt) const override {
    check_clonable();
    torch::NoGradGuard no_grad;
    auto base_copy = std::dynamic_pointer_cast<BaseImpl>(base_->clone(device));
    TORCHLORA_INTERNAL_ASSERT(base_copy, "base layer clone failed");
    auto copy = std::make_shared<Derived>(BaseHolder(base_copy));
    copy_state_to(*copy, device);
    return copy;
  }

  void copy_state_into(
      LoRALayer& copy,
      const c10::optional<torch::Device>& device) const override {
    auto* same_kind = dynamic_cast<Derived*>(&copy);
    TORCHLORA_INTERNAL_ASSERT(
        same_kind != nullptr && same_kind->adapters_.empty(),
        "copy_state_into needs a ",
        Derived::kName,
        " without adapters");
    check_clonable();
    torch::NoGradGuard no_grad;
    copy_state_to(*same_kind, device);
  }

  /// Prints the kind, its base options and each adapter, e.g.
  /// `torchlora::LoRALinear(in_features=64, out_features=32, bias=true,
  /// rank=8, alpha=16, dropout=0.1)`.
  void pretty_print(std::ostream& stream) const override {
    // The base's own printing, e.g. "torch::nn::Linear(in_features=64,
    // out_features=32, bias=true)", between its parentheses.
    std::ostringstream base_text;
    base_->pretty_print(base_text);
    const auto text = base_text.str();
    const auto open = text.find('(');
    const auto close = text.rfind(')');
    stream << std::boolalpha << "torchlora::" << Derived::kName << "("
           << (open != std::string::npos && close > open
                   ? text.substr(open + 1, close - open - 1)
                   : std::string());
    const bool single_default =
        adapters_.size() == 1 && adapters_.front().name == "default";
    for (const auto& adapter : adapters_.all()) {
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

  /// The options of the base layer.
  BaseOptions options;

  /// The base layer's weight (shared, frozen once an adapter is attached).
  torch::Tensor weight;

  /// The base layer's bias; undefined when the base has none.
  torch::Tensor bias;

 protected:
  /// "torchlora::" and the kind's name: what `name()` returns.
  static std::string module_name() {
    return std::string("torchlora::") + Derived::kName;
  }

  /// `weight += s B A`: the delta of a kind whose adapter is a product of
  /// matrices shaped like its weight (Linear, the packed attention).
  static void add_delta_weight(
      torch::Tensor& weight,
      const torch::Tensor& A,
      const torch::Tensor& B,
      double s) {
    weight.addmm_(B, A, /*beta=*/1, /*alpha=*/s);
  }

  /// Adopts `base` (sharing its tensors and its training mode), with no
  /// adapter and without changing which of its tensors are trainable.
  /// (Before LibTorch 2.2 the kind's constructor names the module, see
  /// TORCHLORA_MODULE_IS_VIRTUAL_BASE.)
  explicit LoRALayerImpl(const BaseHolder& base)
      : torch::nn::Cloneable<Derived>(module_name()),
        options(checked_base(base)->options),
        base_(base.ptr()) {
    static_assert(
        detail::module_is_virtual_base<torch::nn::Cloneable<Derived>>::value ==
            static_cast<bool>(TORCHLORA_MODULE_IS_VIRTUAL_BASE),
        TORCHLORA_PREFIX
        "this LibTorch's torch::nn::Cloneable does not derive from "
        "torch::nn::Module as its version says; "
        "TORCHLORA_MODULE_IS_VIRTUAL_BASE needs updating");
    reset();
    // A layer made for a module in eval mode starts in eval mode.
    torch::nn::Module::train(base_->is_training());
  }

  /// For the wrapping constructor of a kind, once the kind's own members
  /// exist: checks `lora`, then freezes the base and attaches `lora` as
  /// "default" (rank 0: no adapter, the frozen base). A bad `lora` leaves
  /// the base as it was.
  void wrap_with(const LoRAOptions& lora) {
    detail::check_lora_options(lora);
    if (lora.rank() > 0) {
      derived().check_adapter_options("default", lora);
    }
    freeze_base();
    if (lora.rank() > 0) {
      add_adapter("default", lora);
    }
  }

  /// The base's bias (undefined when it has none); kinds whose base has no
  /// `bias` member replace it.
  static torch::Tensor bias_of(const BaseImpl& base) {
    return base.bias;
  }

  /// The base's weight member, which its forward reads; kinds whose base
  /// names it otherwise replace it (and the registration names below).
  static torch::Tensor& member_weight(BaseImpl& base) {
    return base.weight;
  }

  /// The names `weight` and `bias` are registered under: the base's own.
  static constexpr const char* kWeightName = "weight";
  static constexpr const char* kBiasName = "bias";

  /// A-then-B init of Linear and Conv layers; kinds may replace it.
  void init_matrices(
      LoRAInit init,
      int64_t rank,
      const torch::Tensor& A,
      const torch::Tensor& B) const {
    detail::init_lora_matrices(init, rank, A, B);
  }

  /// Extra checks of a new adapter's options; kinds may replace it.
  void check_adapter_options(const std::string&, const LoRAOptions&) const {}

  /// Throws when the active adapters' delta has no form of the base's
  /// weight; kinds whose delta always fits keep this one.
  void check_delta_fits() const {}

  /// `weight + s B A`, differentiable in A and B to any order, refusing a
  /// backward after A or B changed (`where` names the layer then). Kinds
  /// whose delta has another form in the weight's layout replace it.
  torch::Tensor add_recorded_delta(
      const torch::Tensor& weight,
      const detail::Adapter& adapter,
      const std::string& where) const {
    return detail::AdaptedWeightFunction::apply(
        weight, adapter.A, adapter.B, adapter.effective_scaling(), where);
  }

  /// `y += s * product`, in y's dtype; kinds may fuse it.
  void add_adapter_output(
      const detail::Adapter& adapter,
      const torch::Tensor& input,
      torch::Tensor& y) const {
    const auto product = derived().adapter_product(adapter, input);
    if (product.scalar_type() == y.scalar_type()) {
      y.add_(product, adapter.effective_scaling());
    } else {
      y.add_(product.mul(adapter.effective_scaling()).to(y.scalar_type()));
    }
  }

  /// True when the forward must add adapter outputs: not merged (a merged
  /// layer whose adapters changed since is an error), enabled, one active.
  bool adapters_in_use() const {
    if (merge_.merged) {
      check_merged_weight_is_current(/*in_forward=*/true);
      return false;
    }
    return enabled_ && adapters_.has_active();
  }

  /// `y` plus each active adapter's scaled output for `x` (dropout applied
  /// to the adapter's input in training).
  void add_adapter_outputs(const torch::Tensor& x, torch::Tensor& y) const {
    for (const auto& adapter : adapters_.all()) {
      if (adapter.active) {
        derived().add_adapter_output(
            adapter, derived().adapter_input(adapter, x), y);
      }
    }
  }

  /// The routing of rows to adapters in force for this layer on this
  /// thread (`AdapterRouting`), or null.
  const detail::RowGroups* row_routing() const {
    if (detail::current_routing() == nullptr) {
      return nullptr;
    }
    return detail::routing_for(this);
  }

  /// Throws unless `input` has the routing's rows in its first dimension
  /// and at least `min_dim` dimensions (`what` says which).
  void check_routed_input(
      const detail::RowGroups& routing,
      const torch::Tensor& input,
      int64_t min_dim,
      const char* what) const {
    TORCHLORA_CHECK(
        !merge_.merged,
        "AdapterRouting: this ",
        Derived::kName,
        " is merged, so its adapters cannot be applied per row; unmerge() "
        "the model first");
    TORCHLORA_CHECK(
        enabled_,
        "AdapterRouting: the adapters of this ",
        Derived::kName,
        " are disabled (DisableAdapters); route rows outside that scope");
    TORCHLORA_CHECK(
        input.dim() >= min_dim,
        "AdapterRouting: ",
        Derived::kName,
        " needs ",
        what,
        " (rows in the first dimension) to route rows, got an input of "
        "shape ",
        input.sizes());
    TORCHLORA_CHECK(
        input.size(0) == routing.rows(),
        "AdapterRouting was made for ",
        routing.rows(),
        " rows, but this ",
        Derived::kName,
        "'s input has ",
        input.size(0),
        " in its first dimension (shape ",
        input.sizes(),
        ")");
  }

  /// The routed forward: `base` (the base layer's forward) over the rows
  /// regrouped by adapter, each adapter's scaled output added to its own
  /// run of rows (with its own rank; fused into one GEMM where the kind can),
  /// then the rows put back in batch order. `x` holds the rows in its first
  /// dimension, each row `positions_per_row` times in a row (a flattened
  /// `[batch, tokens, ...]`). Two gathers (none when the batch is grouped
  /// already); `"__base__"` rows and rows of adapters this layer lacks cost
  /// nothing beyond the base product.
  template <typename BaseForward>
  torch::Tensor routed_forward(
      const detail::RowGroups& routing,
      const torch::Tensor& x,
      int64_t positions_per_row,
      const BaseForward& base) const {
    const bool grouped = routing.keeps_order();
    const auto rows = grouped
        ? x
        : x.index_select(0, routing.permutation(x.device(), positions_per_row));
    auto y = base(rows);
    for (const auto& group : routing.groups()) {
      const auto* adapter = adapters_.or_null(group.adapter);
      if (adapter == nullptr) {
        continue;
      }
      const auto start = group.offset * positions_per_row;
      const auto length = static_cast<int64_t>(group.count) * positions_per_row;
      auto y_rows = y.narrow(0, start, length);
      derived().add_adapter_output(
          *adapter,
          derived().adapter_input(*adapter, rows.narrow(0, start, length)),
          y_rows);
    }
    return grouped
        ? y
        : y.index_select(0, routing.inverse(y.device(), positions_per_row));
  }

  /// `x` with the adapter's dropout applied when it does something now.
  torch::Tensor adapter_input(
      const detail::Adapter& adapter,
      const torch::Tensor& x) const {
    const double p = adapter.options.dropout();
    if (p > 0 && this->is_training()) {
      return torch::nn::functional::dropout(
          x, torch::nn::functional::DropoutFuncOptions().p(p).training(true));
    }
    return x;
  }

  const std::vector<detail::Adapter>& adapters() const {
    return adapters_.all();
  }

  /// A merged layer whose adapters changed since `merge` cannot be copied:
  /// the copy's merge would look current.
  void check_clonable() const {
    if (merge_.merged) {
      check_merged_weight_is_current();
    }
  }

  /// Gives `copy` (this kind, over a copy of the base layer, no adapters)
  /// this layer's adapters with their values, scales and flags, the enabled
  /// and merged state, the base tensors' trainable flags and the training
  /// mode.
  void copy_state_to(Derived& copy, const c10::optional<torch::Device>& device)
      const {
    for (const auto& adapter : adapters_.all()) {
      copy.add_adapter(adapter.name, adapter.options);
      auto& target = copy.adapters_.back();
      target.scale = adapter.scale;
      target.active = adapter.active;
      copy_tensor(adapter.A, target.A, device);
      copy_tensor(adapter.B, target.B, device);
    }
    copy.enabled_ = enabled_;
    copy.merge_.merged = merge_.merged;
    copy.merge_.keeps_original = merge_.keeps_original;
    if (merge_.merged && merge_.keeps_original) {
      const auto& original = merge_.original_weight;
      copy.merge_.original_weight = device && original.device() != *device
          ? original.to(*device)
          : original.clone();
    }
    if (merge_.merged) {
      copy.merge_.remember(copy.adapters_, copy.weight);
    }
    copy.weight.set_requires_grad(weight.requires_grad());
    if (bias.defined()) {
      copy.bias.set_requires_grad(bias.requires_grad());
    }
    copy.train(this->is_training());
    copy.refresh_member();
  }

  void check_not_merged(const char* operation) const {
    TORCHLORA_CHECK(
        !merge_.merged, operation, " on a merged layer; unmerge() it first");
  }

  /// `weight` plus every active adapter's scaled delta, computed in fp32 for
  /// fp16/bf16 weights (in the weight's dtype otherwise), returned in the
  /// weight's dtype. `weight` itself is not changed.
  torch::Tensor weight_with_adapters(double sign = 1.0) const {
    return detail::weight_plus(
        weight, adapters_.active_deltas(), sign, add_delta());
  }

  /// How this kind adds `s * delta(A, B)` to a weight of its base's shape.
  auto add_delta() const {
    return [this](
               torch::Tensor& target,
               const torch::Tensor& A,
               const torch::Tensor& B,
               double s) { derived().add_delta_weight(target, A, B, s); };
  }

  std::shared_ptr<BaseImpl> base_;

 private:
  Derived& derived() {
    return static_cast<Derived&>(*this);
  }

  const Derived& derived() const {
    return static_cast<const Derived&>(*this);
  }

  static const BaseHolder& checked_base(const BaseHolder& base) {
    TORCHLORA_CHECK(
        !base.is_empty(),
        "cannot wrap an empty (nullptr) ",
        Derived::kBaseName,
        "; got a holder that holds no module");
    return base;
  }

  /// Refuses `operation` while a forward runs through this layer (on
  /// another thread: changing adapters or weights under it would race).
  void check_no_forward_running(const char* operation) const {
    detail::check_no_forward_running(
        running_forwards_.running(),
        operation,
        std::string("this ") + Derived::kName);
    detail::check_no_member_hold(
        member_weight_holds(),
        operation,
        std::string("this ") + Derived::kName);
  }

  /// Throws when `what` cannot give back the weight from before `merge`:
  /// the kept copy would drop a change made to the merged weight since.
  /// (After `merge_in_place` the deltas merge added are subtracted, from
  /// copies taken then: always possible.)
  void check_restorable(const char* what) const {
    if (merge_.merged && merge_.keeps_original) {
      check_weight_unchanged_since_merge(what);
    }
  }

  /// `merge` (`keep_original`) or `merge_in_place`.
  void merge_keeping_original(bool safe, bool keep_original) {
    check_mergeable();
    if (merge_.merged || !adapters_.has_active()) {
      return;
    }
    check_no_forward_running(keep_original ? "merge" : "merge_in_place");
    torch::NoGradGuard no_grad;
    if (keep_original) {
      auto merged_weight = weight_with_adapters();
      check_safe_merge(safe, merged_weight);
      merge_.original_weight = weight.detach();
      weight.set_data(merged_weight);
    } else {
      if (safe) {
        check_safe_merge(safe, weight_with_adapters());
      }
      detail::add_deltas_in_place(
          weight, adapters_.active_deltas(), 1.0, add_delta());
    }
    merge_.keeps_original = keep_original;
    merge_.merged = true;
    merge_.remember(adapters_, weight);
    refresh_member();
  }

  void check_safe_merge(bool safe, const torch::Tensor& merged_weight) const {
    TORCHLORA_CHECK(
        !safe || torch::isfinite(merged_weight).all().item().toBool(),
        "safe merge refused: merging the active adapters (",
        detail::quoted_list(active_adapters()),
        ") gives NaN or Inf weights." TORCHLORA_NOTHING_CHANGED);
  }

  /// The weight as it was before `merge`: the kept copy, or (after
  /// `merge_in_place`) the weight less the deltas, computed anew.
  torch::Tensor weight_before_merge() const {
    if (merge_.keeps_original) {
      return merge_.original_weight;
    }
    return detail::weight_plus(weight, merge_.deltas, -1.0, add_delta());
  }

  void check_enabled_for_merge() const {
    TORCHLORA_CHECK(
        enabled_,
        "cannot merge a layer whose adapters are disabled "
        "(DisableAdapters); merge after the guard's scope");
  }

  /// A merged weight holds the adapters as they were at `merge`: if they
  /// changed since, using it would silently ignore the change. Compared by
  /// value; in the forward of a layer off the CPU by stamps only, which
  /// cost no device synchronization (a step through `.data()` is then seen
  /// at `unmerge`, `save`, `clone` and the next merge check, not by the
  /// forward).
  void check_merged_weight_is_current(bool in_forward = false) const {
    const bool values = !in_forward || weight.device().is_cpu();
    TORCHLORA_CHECK(
        !merge_.adapters_changed(adapters_, values),
        "an adapter of this merged layer (",
        detail::quoted_list(active_adapters()),
        ") was changed after merge(), so the merged weight is stale; "
        "unmerge() before changing adapters and merge() again after");
  }

  /// Refuses `what` on a merged layer whose weight was changed in place
  /// since `merge`: the weight from before `merge` would drop the change.
  void check_weight_unchanged_since_merge(const char* what) const {
    TORCHLORA_CHECK(
        merge_.weight_unchanged(weight),
        "the weight of this merged layer was changed after "
        "merge() (an optimizer step or an in-place op on it), so ",
        what,
        " would restore the weight from before merge() and lose that change; "
        "keep it with merge_and_unload(), or train adapters unmerged");
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

  /// Points the bound member at what it must hold now: the merged weight;
  /// the adapted weight inside `AdaptedWeights`; a sentinel that refuses
  /// every use otherwise.
  void refresh_member(bool recompute_held = false) {
    if (!member_.bound) {
      return;
    }
    if (recompute_held) {
      // After a move, a conversion or re-enabling: the held weights,
      // computed anew, each in its scope's grad mode.
      for (auto& hold : member_.holds) {
        const at::AutoGradMode grad_mode(hold.grad);
        hold.weight = merge_.merged ? weight : adapted_weight();
      }
    }
    auto& member = Derived::member_weight(*base_);
    if (merge_.merged) {
      member = weight;
    } else if (!member_.holds.empty()) {
      member = member_.holds.back().weight;
    } else {
      member = detail::member_sentinel(weight, member_.sentinel_message());
    }
  }

  detail::AdapterSet adapters_;
  bool enabled_ = true;
  detail::MergeState merge_;
  detail::MemberBinding member_;
  /// The forwards running through this layer now.
  detail::ForwardCount running_forwards_;
};

} // namespace torchlora
