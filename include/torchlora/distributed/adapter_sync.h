#pragma once

// Data-parallel training of a model's trainable tensors (the adapters, and
// whatever else requires a gradient): equal starting values on every rank,
// and gradients averaged over the ranks in a few flat buckets.

#include <torchlora/detail/check.h>
#include <torchlora/distributed/agreement.h>
#include <torchlora/distributed/world.h>
#include <torchlora/module_ref.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace distributed {

/// How `AdapterSync` groups the tensors it communicates.
struct SyncOptions {
  /// The most bytes one all-reduce carries; tensors are packed into flat
  /// buckets up to this size (a larger tensor gets a bucket of its own).
  TORCH_ARG(int64_t, bucket_bytes) = int64_t{25} << 20;
};

/// Keeps the trainable tensors of `model` equal on every rank of `world`:
/// at construction it checks that every rank has the same trainable tensors
/// (names, dtypes, shapes; a difference is an error naming it, on every
/// rank), then copies rank 0's values to all. `all_reduce_gradients()`,
/// called after `backward()` and before the optimizer's step, replaces
/// each trainable tensor's gradient by its mean over the ranks. Frozen
/// tensors (the base model) are never communicated.
///
/// Make it after `inject_lora` and `set_adapter` (which decide what is
/// trainable); the model must outlive it. A change to the set of trainable
/// tensors afterwards is an error at the next `all_reduce_gradients()`.
/// For a single-process World both are no-ops.
///
/// Example:
/// ```
/// auto world = torchlora::distributed::init_from_env();
/// torchlora::distributed::AdapterSync sync(*model, world);
/// loss.backward();
/// sync.all_reduce_gradients();
/// optimizer.step();
/// ```
class AdapterSync {
 public:
  AdapterSync(ModuleRef model, World world, SyncOptions options = {})
      : model_(&model.get()), world_(std::move(world)) {
    // Taken on every rank of a distributed World, failing or not, so that
    // the store keys match (a single-process AdapterSync takes none).
    const auto generation =
        world_.is_distributed() ? detail::next_agreement() : -1;
    // A problem of this rank's own is told to the others through the store
    // before it is thrown, so that they fail at once with it, not later.
    std::string problem;
    try {
      TORCHLORA_CHECK(
          options.bucket_bytes() > 0,
          "SyncOptions bucket_bytes must be positive, got ",
          options.bucket_bytes());
      for (auto& item : model_->named_parameters(/*recurse=*/true)) {
        if (item.value().requires_grad()) {
          names_.push_back(item.key());
          tensors_.push_back(item.value());
          dtypes_.push_back(item.value().scalar_type());
          devices_.push_back(item.value().device());
        }
      }
      TORCHLORA_CHECK(
          !tensors_.empty(),
          "AdapterSync found no trainable tensor in the model; "
          "make it after inject_lora (and set_adapter)");
      make_buckets(options.bucket_bytes());
    } catch (const c10::Error& error) {
      problem = error.what_without_backtrace();
    }
    if (world_.is_distributed()) {
      check_same_tensors_on_every_rank(
          generation, problem, options.bucket_bytes());
    }
    TORCH_CHECK(problem.empty(), problem);
    if (world_.is_distributed()) {
      broadcast_from_rank_0();
    }
  }

  /// Averages the gradients of the trainable tensors over the ranks. A
  /// tensor without a gradient counts as zeros; it gets the mean as its
  /// gradient if any rank had one, and stays without one otherwise (the
  /// same on every rank).
  void all_reduce_gradients() {
    check_trainable_tensors_unchanged();
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const auto& gradient = tensors_[i].grad();
      TORCHLORA_CHECK(
          !gradient.defined() || !gradient.is_sparse(),
          "AdapterSync averages dense gradients only; '",
          names_[i],
          "' has a sparse one (make its Embedding with sparse(false))");
    }
    if (!world_.is_distributed()) {
      return;
    }
    at::NoGradGuard no_grad;
    for (const auto& bucket : buckets_) {
      const auto count = static_cast<int64_t>(bucket.members.size());
      auto flat = at::empty(
          {bucket.numel + count},
          at::TensorOptions().dtype(bucket.transport).device(bucket.device));
      std::vector<double> had_gradient;
      had_gradient.reserve(bucket.members.size());
      int64_t offset = 0;
      for (const auto index : bucket.members) {
        const auto& tensor = tensors_[index];
        const auto& gradient = tensor.grad();
        auto slot = flat.narrow(0, offset, tensor.numel());
        if (gradient.defined()) {
          slot.copy_(gradient.reshape(-1));
        } else {
          slot.zero_();
        }
        had_gradient.push_back(gradient.defined() ? 1.0 : 0.0);
        offset += tensor.numel();
      }
      flat.narrow(0, bucket.numel, count)
          .copy_(at::tensor(had_gradient, at::kDouble));
      std::vector<at::Tensor> buffers{flat};
      detail::run_collective(
          world_.group(),
          world_.describe(),
          world_.timeout(),
          "all_reduce_gradients",
          [&] { return world_.group()->allreduce(buffers); });
      communicated_bytes_ += flat.numel() * flat.element_size();
      flat.narrow(0, 0, bucket.numel).div_(world_.world_size());
      const auto ranks_with_gradient =
          flat.narrow(0, bucket.numel, count).to(at::kDouble).cpu();
      offset = 0;
      for (std::size_t i = 0; i < bucket.members.size(); ++i) {
        auto& tensor = tensors_[bucket.members[i]];
        const auto mean =
            flat.narrow(0, offset, tensor.numel()).view(tensor.sizes());
        offset += tensor.numel();
        if (ranks_with_gradient[static_cast<int64_t>(i)].item<double>() < 0.5) {
          continue;
        }
        if (tensor.grad().defined()) {
          tensor.mutable_grad().copy_(mean);
        } else {
          // In the tensor's own dtype: fp16/bf16 travel as fp32.
          tensor.mutable_grad() = mean.to(
              tensor.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
        }
      }
    }
  }

  /// The names of the tensors kept in step, in the model's order.
  const std::vector<std::string>& names() const {
    return names_;
  }
  /// How many all-reduces one `all_reduce_gradients()` makes.
  int64_t buckets() const {
    return static_cast<int64_t>(buckets_.size());
  }
  /// The bytes one `all_reduce_gradients()` hands to the all-reduce: every
  /// trainable tensor once, plus one flag per tensor (0 for one process).
  int64_t bytes_per_step() const {
    if (!world_.is_distributed()) {
      return 0;
    }
    int64_t bytes = 0;
    for (const auto& bucket : buckets_) {
      bytes += (bucket.numel + static_cast<int64_t>(bucket.members.size())) *
          static_cast<int64_t>(c10::elementSize(bucket.transport));
    }
    return bytes;
  }
  /// The bytes handed to collectives so far: the start's broadcast and
  /// every all-reduce since.
  int64_t communicated_bytes() const {
    return communicated_bytes_;
  }
  /// The processes this keeps in step.
  const World& world() const {
    return world_;
  }

 private:
  struct Bucket {
    c10::ScalarType dtype;
    c10::Device device;
    /// What travels: fp16/bf16 go as fp32 (1.x's Gloo has no bf16; the
    /// mean is exact in fp32 and rounded once).
    c10::ScalarType transport;
    std::vector<std::size_t> members;
    int64_t numel = 0;
  };

  void make_buckets(int64_t bucket_bytes) {
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const auto& tensor = tensors_[i];
      const auto bytes = tensor.numel() * tensor.element_size();
      auto fits = [&](const Bucket& bucket) {
        return bucket.dtype == tensor.scalar_type() &&
            bucket.device == tensor.device() &&
            (bucket.numel * tensor.element_size() + bytes <= bucket_bytes);
      };
      auto open = std::find_if(buckets_.begin(), buckets_.end(), fits);
      if (open == buckets_.end()) {
        const bool half = tensor.scalar_type() == at::kHalf ||
            tensor.scalar_type() == at::kBFloat16;
        buckets_.push_back(Bucket{
            tensor.scalar_type(),
            tensor.device(),
            half ? at::kFloat : tensor.scalar_type(),
            {},
            0});
        open = buckets_.end() - 1;
      }
      open->members.push_back(i);
      open->numel += tensor.numel();
    }
  }

  /// One line per trainable tensor: what every rank must agree on.
  std::vector<std::string> description() const {
    std::vector<std::string> lines;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      lines.push_back(detail::describe_tensor(names_[i], tensors_[i]));
    }
    return lines;
  }

  /// Every rank publishes how it buckets (the buckets must pair up) and
  /// its trainable tensors, or its own problem, and checks the others'.
  void check_same_tensors_on_every_rank(
      int64_t generation,
      const std::string& problem,
      int64_t bucket_bytes) {
    auto lines = description();
    lines.insert(lines.begin(), "bucket_bytes " + std::to_string(bucket_bytes));
    const auto all = detail::exchange_lines(
        world_, "AdapterSync", generation, lines, problem);
    if (!problem.empty()) {
      return; // the constructor throws it
    }
    for (std::size_t rank = 1; rank < all.size(); ++rank) {
      TORCHLORA_CHECK(
          all[0][0] == all[rank][0],
          "the processes' AdapterSyncs differ: SyncOptions ",
          all[0][0],
          " on rank 0 and ",
          all[rank][0],
          " on rank ",
          rank,
          " (their buckets must pair up: use the same options everywhere)");
    }
    detail::check_same_tensors(
        all, 1, "AdapterSync cannot keep them in step", "trainable tensor");
  }

  void broadcast_from_rank_0() {
    at::NoGradGuard no_grad;
    for (const auto& bucket : buckets_) {
      std::vector<at::Tensor> pieces;
      for (const auto index : bucket.members) {
        pieces.push_back(
            tensors_[index].detach().reshape(-1).to(bucket.transport));
      }
      std::vector<at::Tensor> buffers{at::cat(pieces)};
      detail::run_collective(
          world_.group(),
          world_.describe(),
          world_.timeout(),
          "AdapterSync's broadcast from rank 0",
          [&] { return world_.group()->broadcast(buffers); });
      communicated_bytes_ += buffers[0].numel() * buffers[0].element_size();
      int64_t offset = 0;
      for (const auto index : bucket.members) {
        auto& tensor = tensors_[index];
        tensor.detach().copy_(
            buffers[0].narrow(0, offset, tensor.numel()).view(tensor.sizes()));
        offset += tensor.numel();
      }
    }
  }

  void check_trainable_tensors_unchanged() const {
    std::size_t index = 0;
    for (auto& item : model_->named_parameters(/*recurse=*/true)) {
      if (!item.value().requires_grad()) {
        continue;
      }
      const bool same = index < tensors_.size() &&
          item.value().unsafeGetTensorImpl() ==
              tensors_[index].unsafeGetTensorImpl();
      TORCHLORA_CHECK(
          same,
          "the model's trainable tensors changed since its "
          "AdapterSync was made (",
          index < names_.size() ? "'" + names_[index] + "' was expected, "
                                : std::string("no more were expected, "),
          "got '",
          item.key(),
          "'); make a new AdapterSync after inject_lora or set_adapter");
      TORCHLORA_CHECK(
          item.value().scalar_type() == dtypes_[index] &&
              item.value().device() == devices_[index],
          "'",
          item.key(),
          "' changed from ",
          c10::toString(dtypes_[index]),
          " on ",
          devices_[index].str(),
          " to ",
          c10::toString(item.value().scalar_type()),
          " on ",
          item.value().device().str(),
          " since its AdapterSync was made; make a new AdapterSync after "
          "moving or converting the model");
      ++index;
    }
    TORCHLORA_CHECK(
        index == tensors_.size(),
        "the model's trainable tensors changed since its "
        "AdapterSync was made (",
        tensors_.size(),
        " were trainable, now ",
        index,
        "); make a new AdapterSync after inject_lora or set_adapter");
  }

  torch::nn::Module* model_;
  World world_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> tensors_;
  std::vector<c10::ScalarType> dtypes_;
  std::vector<c10::Device> devices_;
  std::vector<Bucket> buckets_;
  int64_t communicated_bytes_ = 0;
};

} // namespace distributed
} // namespace torchlora
