#pragma once

// Splitting each batch over the processes of a data-parallel run.

#include <torchlora/detail/check.h>
#include <torchlora/distributed/world.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>

namespace torchlora {
namespace distributed {

/// This rank's share of `batch`: rows [rank * n / size, (rank + 1) * n /
/// size) of its first dimension, a view. The rows must split evenly, so
/// that the mean of the ranks' mean losses is the whole batch's mean loss
/// (and the averaged gradients are those of the whole batch); an uneven
/// batch is an error that states both numbers. For a single process it is
/// `batch` itself. (For LibTorch's data loaders,
/// `torch::data::samplers::DistributedRandomSampler(size, world_size, rank)`
/// gives each rank its share of the examples instead.)
inline at::Tensor shard_rows(const at::Tensor& batch, const World& world) {
  TORCHLORA_CHECK(
      batch.defined() && batch.dim() >= 1,
      "shard_rows needs a tensor with a first dimension, got ",
      batch.defined() ? std::to_string(batch.dim()) + " dimensions"
                      : std::string("an undefined tensor"));
  const int64_t rows = batch.size(0);
  const int64_t size = world.world_size();
  TORCHLORA_CHECK(
      rows % size == 0,
      "shard_rows cannot split a batch of ",
      rows,
      " rows evenly over ",
      size,
      " processes; make the batch size a multiple of ",
      size);
  const int64_t share = rows / size;
  return batch.narrow(0, world.rank() * share, share);
}

} // namespace distributed
} // namespace torchlora
