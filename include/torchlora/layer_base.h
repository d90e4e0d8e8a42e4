#pragma once

#include <torchlora/blas_threads.h>
#include <torchlora/detail/adapted_weight_function.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/forward_count.h>
#include <torchlora/detail/member_sentinel.h>
#include <torchlora/detail/module_virtual_base.h>
#include <torchlora/detail/move_tensors.h>
#include <torchlora/detail/row_routing.h>
#include <torchlora/detail/tensor_bits.h>
#include <torchlora/detail/text.h>
#include <torchlora/layer.h>
#include <torchlora/layer/adapter_set.h>
#include <torchlora/layer/member_binding.h>
#include <torchlora/layer/merge_state.h>
#include <torchlora/options.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/init.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>
#include <torch/utils.h>
#include <torch/version.h>

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstddef>
#include <memory>
#include <ostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace torchlora {

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
///
/// Its member functions are defined by concern in `layer/layer_impl_*.h`.
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
  void reset() override;

  /// Re-initializes the base layer and every adapter.
  void reset_parameters();

  /// Attaches a new adapter and freezes the base layer.
  ///
  /// The adapter is created on the base weight's device, in `lora.dtype()`
  /// or else the base weight's dtype.
  void add_adapter(const std::string& name, const LoRAOptions& lora) override;

  /// Removes adapter `name`; its tensors leave `named_parameters()`. Without
  /// adapters the layer has exactly its base layer's parameters again. When
  /// the last active adapter goes, the first remaining one becomes active
  /// (as in peft).
  void delete_adapter(const std::string& name) override;

  void set_active_adapters(const std::vector<std::string>& names) override;

  std::vector<std::string> active_adapters() const override {
    return adapters_.active_names();
  }

  void set_scale(const std::string& name, double scale) override;

  double scale(const std::string& name) const override {
    return adapters_.find(name).scale;
  }

  void set_adapters_enabled(bool enabled) override;

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
  void unmerge() override;

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

  bool merge_is_finite() const override;

  void check_mergeable() const override;

  /// Refuses `merge_in_place` with an active DoRA adapter: its rescaling
  /// cannot be subtracted again; `merge` keeps the weight instead.
  void check_in_place_mergeable() const override;

  void check_unmergeable() const override;

  void unload(bool merge_first) override;

  torch::Tensor base_weight() const override {
    return weight;
  }

  /// Sets training or evaluation mode here, on the adapters and on the base
  /// module, which is not a registered child (its tensors are registered
  /// here under their own names) but whose forward LibTorch may call
  /// through its own member (a MultiheadAttention's dropout).
  void train(bool on = true) override;

  std::shared_ptr<torch::nn::Module> base_module() const override {
    return base_;
  }

  torch::nn::AnyModule base_any_module() const override;

  /// The wrapped base layer; its tensors are this layer's `weight`/`bias`.
  std::shared_ptr<BaseImpl> base_layer() const {
    return base_;
  }

  /// Moves or casts everything, the weight kept for `unmerge` included.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false)
      override;

  void to(torch::Dtype dtype, bool non_blocking = false) override;

  void to(torch::Device device, bool non_blocking = false) override;

  /// Saves like any module; a merged layer saves its unmerged weight, so a
  /// checkpoint always holds base weights next to the adapters.
  void save(torch::serialize::OutputArchive& archive) const override;

  /// Loads like any module; a merged layer is merged again with what was
  /// loaded. If loading fails (a missing key), a merged layer is put back as
  /// it was, merged, before the error goes on.
  void load(torch::serialize::InputArchive& archive) override;

  bool member_bound() const override {
    return member_.bound;
  }

  void bind_member(const std::string& where) override;

  int64_t hold_member_weight() override;

  void release_member_weight(int64_t token) override;

  int member_weight_holds() const override {
    return static_cast<int>(member_.holds.size());
  }

  /// The weight this layer computes with: `weight` plus every active
  /// adapter's `s B A`, differentiable in each A and B (to any order;
  /// computed in fp32 for fp16/bf16 weights); `weight` itself when merged,
  /// disabled or without an active adapter. What a bound member holds inside
  /// `AdaptedWeights`. Without gradients to record it equals the merged
  /// weight bit for bit.
  torch::Tensor adapted_weight() const;

  /// Deep copy: new base tensors and adapters with equal values, the same
  /// trainable flags and training mode; nothing is shared with `*this`.
  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device = c10::nullopt) const override;

  void copy_state_into(
      LoRALayer& copy,
      const c10::optional<torch::Device>& device) const override;

  /// Prints the kind, its base options and each adapter, e.g.
  /// `torchlora::LoRALinear(in_features=64, out_features=32, bias=true,
  /// rank=8, alpha=16, dropout=0.1)`.
  void pretty_print(std::ostream& stream) const override;

  /// The options of the base layer.
  BaseOptions options;

  /// The base layer's weight (shared, frozen once an adapter is attached).
  torch::Tensor weight;

  /// The base layer's bias; undefined when the base has none.
  torch::Tensor bias;

  /// DoRA magnitudes by adapter name (`lora_magnitude_vector.<name>.weight`,
  /// peft's names); empty holder while no adapter uses DoRA.
  torch::nn::ModuleDict lora_magnitude_vector{nullptr};

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
      double s);

  /// Adopts `base` (sharing its tensors and its training mode), with no
  /// adapter and without changing which of its tensors are trainable.
  /// (Before LibTorch 2.2 the kind's constructor names the module, see
  /// TORCHLORA_MODULE_IS_VIRTUAL_BASE.)
  explicit LoRALayerImpl(const BaseHolder& base);

  /// For the wrapping constructor of a kind, once the kind's own members
  /// exist: checks `lora`, then freezes the base and attaches `lora` as
  /// "default" (rank 0: no adapter, the frozen base). A bad `lora` leaves
  /// the base as it was.
  void wrap_with(const LoRAOptions& lora);

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
      const torch::Tensor& B) const;

  /// Extra checks of a new adapter's options; kinds may replace it.
  void check_adapter_options(const std::string&, const LoRAOptions&) const {}

  /// Registers the base's tensors beyond `weight` and `bias` (a quantized
  /// base's scales); none by default.
  void register_base_state() {}

  /// The dtype new adapters take unless their options name one: the base
  /// weight's by default.
  torch::Dtype compute_dtype() const {
    return weight.scalar_type();
  }

  /// The base weight as floating-point values of its shape, what merging
  /// adds deltas to: `weight` itself by default.
  torch::Tensor float_weight() const {
    return weight;
  }

  /// Whether the kind takes DoRA and PiSSA/OLoRA; kinds may refuse them.
  static constexpr bool kTakesDora = true;
  static constexpr bool kTakesWeightInit = false;

  /// Throws when the active adapters' delta has no form of the base's
  /// weight; kinds whose delta always fits keep this one.
  void check_delta_fits() const {}

  /// `weight + s B A`, differentiable in A and B to any order, refusing a
  /// backward after A or B changed (`where` names the layer then). Kinds
  /// whose delta has another form in the weight's layout replace it.
  torch::Tensor add_recorded_delta(
      const torch::Tensor& weight,
      const detail::Adapter& adapter,
      const std::string& where) const;

  /// The weight dimension a DoRA magnitude runs along (output channels;
  /// Embedding: 1, its columns).
  static constexpr int64_t kMagnitudeAxis = 0;

  /// The dimension of an output `y` that holds the channels DoRA rescales;
  /// kinds whose output has them elsewhere than last replace it.
  static int64_t output_channel_axis(const torch::Tensor& y) {
    return y.dim() - 1;
  }

  /// The forward with a DoRA adapter active: `base_out` is the base layer's
  /// output for `x` without its bias; the kind's `base_output(input)`
  /// (also without bias) serves an adapter whose dropout changes `x`.
  torch::Tensor forward_with_dora(
      const torch::Tensor& x,
      const torch::Tensor& base_out) const;

  /// True when the forward must take `forward_with_dora`.
  bool dora_in_use() const {
    return adapters_.has_active_dora();
  }

  /// `y += s * product`, in y's dtype; kinds may fuse it.
  void add_adapter_output(
      const detail::Adapter& adapter,
      const torch::Tensor& input,
      torch::Tensor& y) const;

  /// True when the forward must add adapter outputs: not merged (a merged
  /// layer whose adapters changed since is an error), enabled, one active.
  bool adapters_in_use() const;

  /// `y` plus each active adapter's scaled output for `x` (dropout applied
  /// to the adapter's input in training).
  void add_adapter_outputs(const torch::Tensor& x, torch::Tensor& y) const;

  /// The routing of rows to adapters in force for this layer on this
  /// thread (`AdapterRouting`), or null.
  const detail::RowGroups* row_routing() const;

  /// Throws unless `input` has the routing's rows in its first dimension
  /// and at least `min_dim` dimensions (`what` says which).
  void check_routed_input(
      const detail::RowGroups& routing,
      const torch::Tensor& input,
      int64_t min_dim,
      const char* what) const;

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
      const BaseForward& base) const;

  /// `x` with the adapter's dropout applied when it does something now.
  torch::Tensor adapter_input(
      const detail::Adapter& adapter,
      const torch::Tensor& x) const;

  const std::vector<detail::Adapter>& adapters() const {
    return adapters_.all();
  }

  /// A merged layer whose adapters changed since `merge` cannot be copied:
  /// the copy's merge would look current.
  void check_clonable() const;

  /// Gives `copy` (this kind, over a copy of the base layer, no adapters)
  /// this layer's adapters with their values, scales and flags, the enabled
  /// and merged state, the base tensors' trainable flags and the training
  /// mode.
  void copy_state_to(Derived& copy, const c10::optional<torch::Device>& device)
      const;

  void check_not_merged(const char* operation) const;

  /// `weight` plus every active adapter's scaled delta, computed in fp32 for
  /// fp16/bf16 weights (in the weight's dtype otherwise), returned in the
  /// weight's dtype. `weight` itself is not changed.
  torch::Tensor weight_with_adapters(double sign = 1.0) const;

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
  void check_no_forward_running(const char* operation) const;

  /// Throws when `what` cannot give back the weight from before `merge`:
  /// the kept copy would drop a change made to the merged weight since.
  /// (After `merge_in_place` the deltas merge added are subtracted, from
  /// copies taken then: always possible.)
  void check_restorable(const char* what) const;

  /// `merge` (`keep_original`) or `merge_in_place`.
  void merge_keeping_original(bool safe, bool keep_original);

  void check_safe_merge(bool safe, const torch::Tensor& merged_weight) const;

  /// The weight as it was before `merge`: the kept copy, or (after
  /// `merge_in_place`) the weight less the deltas, computed anew.
  torch::Tensor weight_before_merge() const;

  void check_enabled_for_merge() const;

  /// A merged weight holds the adapters as they were at `merge`: if they
  /// changed since, using it would silently ignore the change. Compared by
  /// value; in the forward of a layer off the CPU by stamps only, which
  /// cost no device synchronization (a step through `.data()` is then seen
  /// at `unmerge`, `save`, `clone` and the next merge check, not by the
  /// forward).
  void check_merged_weight_is_current(bool in_forward = false) const;

  /// Refuses `what` on a merged layer whose weight was changed in place
  /// since `merge`: the weight from before `merge` would drop the change.
  void check_weight_unchanged_since_merge(const char* what) const;

  void freeze_base();

  /// Refuses DoRA or PiSSA/OLoRA where the kind or the base cannot have them.
  void check_variant_options(const std::string& name, const LoRAOptions& lora)
      const;

  /// `add_adapter`, initializing the new matrices (and the base weight, for
  /// PiSSA/OLoRA) only when `initialize`: a copy takes its values after.
  void attach_adapter(
      const std::string& name,
      const LoRAOptions& lora,
      bool initialize);

  /// Gives a DoRA adapter its magnitude, registered under peft's name:
  /// the channel norms of the adapted weight when `initialize`.
  void create_magnitude(detail::Adapter& adapter, bool initialize);

  void remove_magnitude(const std::string& name);

  /// The channel norms of `weight + s B A` for DoRA adapter `adapter`, no
  /// gradient recorded, in float32 (float64 for a float64 weight).
  torch::Tensor dora_norms(const detail::Adapter& adapter) const;

  /// `magnitude / norms` as a vector, differentiable in the magnitude.
  torch::Tensor dora_factor(const detail::Adapter& adapter) const;

  /// PiSSA/OLoRA: A and B from the weight, which becomes `W - s B A`.
  void init_from_weight(const detail::Adapter& adapter);

  /// Gives `to` a copy of `from`'s values and its trainable flag.
  static void copy_tensor(
      const torch::Tensor& from,
      const torch::Tensor& to,
      const c10::optional<torch::Device>& device);

  /// Points the bound member at what it must hold now: the merged weight;
  /// the adapted weight inside `AdaptedWeights`; a sentinel that refuses
  /// every use otherwise.
  void refresh_member(bool recompute_held = false);

  detail::AdapterSet adapters_;
  bool enabled_ = true;
  detail::MergeState merge_;
  detail::MemberBinding member_;
  /// The forwards running through this layer now.
  detail::ForwardCount running_forwards_;
};

} // namespace torchlora

#include <torchlora/layer/layer_impl_adapters.h>
#include <torchlora/layer/layer_impl_copying.h>
#include <torchlora/layer/layer_impl_dora.h>
#include <torchlora/layer/layer_impl_forward.h>
#include <torchlora/layer/layer_impl_members.h>
#include <torchlora/layer/layer_impl_merging.h>
#include <torchlora/layer/layer_impl_routing.h>
