#pragma once

/// torchlora's data-parallel training on PyTorch's own c10d: processes
/// started the torchrun way (`init_from_env`), trainable tensors kept in
/// step (`AdapterSync`), batches split over the ranks (`shard_rows`), a
/// whole model copied from rank 0 (`broadcast_state`).
/// Not part of <torchlora/torchlora.h>: it pulls in c10d's and Gloo's
/// headers (Debian: libgloo-dev), which a program without it does not need.
///
/// Example:
/// ```
/// #include <torchlora/distributed.h>
///
/// auto world = torchlora::distributed::init_from_env();
/// torchlora::distributed::AdapterSync sync(*model, world);
/// ```

#include <torchlora/distributed/adapter_sync.h>
#include <torchlora/distributed/broadcast.h>
#include <torchlora/distributed/collective.h>
#include <torchlora/distributed/shard.h>
#include <torchlora/distributed/world.h>
