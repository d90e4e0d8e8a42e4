// One process of torchlora's multi-process tests: `torchlora_distributed_tests
// worker MODE ...`, started by scripts/launch.sh (see CMakeLists.txt here and
// run_scenario.sh). Each mode checks its claims and exits non-zero, with a
// message, where one does not hold:
//
//   train OUT     5 steps on halves of fixed batches equal one process on the
//                 whole batches (1e-5), both ranks bit-identical, only the
//                 trainable tensors communicated, rank 0 writes the adapter.
//   die RANK OUT  rank RANK exits abruptly at step 3; the others must fail
//                 with a torchlora: error that names it, files intact.
//   stall RANK OUT  the same with rank RANK hanging instead: the others fail
//                 within the 5 s timeout.
//   mismatch WHAT rank 1's adapters have another rank (rank), its
//                 SyncOptions differ (buckets), it has nothing trainable
//                 (setup), or its base model has another shape (state):
//                 every rank fails with the error naming the difference.
//   vanish RANK   3 ranks, of which only 0 and 1 start: rank RANK is killed
//                 2 s after it joined, while the group waits for rank 2;
//                 the others must fail soon, not at the 5-minute timeout.
//   bad-interface RANK  rank RANK names a network interface that does not
//                 exist: the others must fail at once with its reason.
//   misfit WHAT   of 3 processes, the one with RANK=2 says RANK=1 (rank) or
//                 WORLD_SIZE=4 (size): every process must fail at once.

#include "distributed/distributed_worker.h"

#include <torchlora/distributed.h>
#include <torchlora/torchlora.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace dist = torchlora::distributed;

constexpr int64_t kIn = 12;
constexpr int64_t kOut = 4;
constexpr int64_t kBatch = 8;

/// A small MLP with an extra trainable offset that a forward may leave out
/// (so that some ranks have no gradient for it in some steps).
struct NetImpl : torch::nn::Module {
  NetImpl() {
    body = register_module(
        "body",
        torch::nn::Sequential(
            torch::nn::Linear(kIn, 16),
            torch::nn::ReLU(),
            torch::nn::Linear(16, kOut)));
    offset = register_parameter("offset", torch::zeros({kOut}));
  }
  /// Rows [0, offset_rows) get `offset` added; none when it is 0.
  torch::Tensor forward(const torch::Tensor& x, int64_t offset_rows) {
    auto y = body->forward(x);
    if (offset_rows > 0) {
      auto head = y.narrow(0, 0, offset_rows) + offset;
      y = torch::cat({head, y.narrow(0, offset_rows, y.size(0) - offset_rows)});
    }
    return y;
  }
  torch::nn::Sequential body{nullptr};
  torch::Tensor offset;
};
TORCH_MODULE(Net);

/// The same base on every rank; the adapters' random start depends on
/// `adapter_seed` (different per rank, so that the sync has work to do).
Net make_model(int64_t adapter_seed, int64_t rank = 4) {
  torch::manual_seed(7);
  Net net;
  torch::manual_seed(adapter_seed);
  torchlora::inject_lora(
      *net,
      torchlora::LoRAConfig(rank).alpha(8).target_modules(
          {"body.0", "body.2"}));
  net->offset.set_requires_grad(true);
  return net;
}

struct Batch {
  torch::Tensor x, target;
};

std::vector<Batch> fixed_batches(int steps) {
  torch::manual_seed(5);
  std::vector<Batch> batches;
  for (int i = 0; i < steps; ++i) {
    batches.push_back(
        {torch::randn({kBatch, kIn}), torch::randn({kBatch, kOut})});
  }
  return batches;
}

/// In step 1 only the first quarter of the whole batch gets the offset: on
/// 2 ranks, rank 0 uses it and rank 1 has no gradient for it.
int64_t offset_rows(int step, int64_t first_row, int64_t rows) {
  if (step != 1) {
    return rows;
  }
  const int64_t end = kBatch / 4;
  return std::max<int64_t>(0, std::min<int64_t>(end - first_row, rows));
}

std::vector<torch::Tensor> trainable(Net& net) {
  std::vector<torch::Tensor> out;
  for (auto& p : net->parameters()) {
    if (p.requires_grad()) {
      out.push_back(p);
    }
  }
  return out;
}

void check(bool ok, const std::string& what) {
  if (!ok) {
    throw std::runtime_error("check failed: " + what);
  }
}

void train_step(
    Net& net,
    torch::optim::Optimizer& optimizer,
    const Batch& batch,
    int step,
    const dist::World& world,
    dist::AdapterSync* sync) {
  const auto x = dist::shard_rows(batch.x, world);
  const auto target = dist::shard_rows(batch.target, world);
  const int64_t first = world.rank() * x.size(0);
  optimizer.zero_grad();
  const auto loss = torch::mse_loss(
      net->forward(x, offset_rows(step, first, x.size(0))), target);
  loss.backward();
  if (sync != nullptr) {
    sync->all_reduce_gradients();
  }
  optimizer.step();
}

int64_t numel_of(const std::vector<torch::Tensor>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) {
    n += t.numel();
  }
  return n;
}

/// The bytes of `tensors`, one after the other (to compare ranks bit for bit).
std::vector<uint8_t> raw_bytes(const std::vector<torch::Tensor>& tensors) {
  std::vector<uint8_t> bytes;
  for (const auto& t : tensors) {
    const auto c = t.detach().contiguous().cpu();
    const auto* data = static_cast<const uint8_t*>(c.data_ptr());
    bytes.insert(bytes.end(), data, data + c.numel() * c.element_size());
  }
  return bytes;
}

int train(const std::string& out) {
  auto world = dist::init_from_env(
      dist::InitOptions().timeout(std::chrono::seconds(30)));
  check(world.is_distributed(), "train runs with several processes");
  // Only rank 0 writes: where a rank's OUT is a folder of its own (its own
  // machine's), that folder must not appear.
  if (world.is_main()) {
    world.store()->set(
        "worker/out", std::vector<uint8_t>(out.begin(), out.end()));
  }
  const auto main_out = world.store()->get("worker/out");
  const bool own_folder = std::string(main_out.begin(), main_out.end()) != out;
  if (own_folder) {
    std::filesystem::remove_all(out);
  }
  constexpr int kSteps = 5;
  const auto batches = fixed_batches(kSteps);

  // Base tensors are never sent: a base weight that differs on rank 1 stays
  // as it is through the start's broadcast and an all-reduce.
  {
    auto probe = make_model(200 + world.rank());
    const auto named = probe->named_parameters();
    const auto* found = named.find("body.0.weight");
    check(found != nullptr, "the first layer's base weight is body.0.weight");
    auto base = found->detach();
    base.add_(static_cast<double>(world.rank()));
    const auto before = base.clone();
    dist::AdapterSync probe_sync(*probe, world);
    for (const auto& name : probe_sync.names()) {
      check(
          name.find("lora_") != std::string::npos || name == "offset",
          "only adapters and the offset are synced, got " + name);
    }
    probe->forward(batches[0].x, 0).sum().backward();
    probe_sync.all_reduce_gradients();
    check(
        torch::equal(base, before),
        "rank " + std::to_string(world.rank()) +
            "'s base weight unchanged by the sync");
  }

  // bf16 adapters travel as fp32 (LibTorch 1.x's Gloo has no bf16): the
  // start's broadcast and an all-reduce work and agree on every rank.
  {
    torch::manual_seed(7);
    torch::nn::Sequential half(torch::nn::Linear(6, 4));
    torch::manual_seed(300 + world.rank());
    torchlora::inject_lora(
        half,
        torchlora::LoRAConfig(2).dtype(torch::kBFloat16).target_modules({"0"}));
    dist::AdapterSync half_sync(half, world);
    half->forward(torch::randn({2, 6})).sum().backward();
    half_sync.all_reduce_gradients();
    std::vector<torch::Tensor> grads;
    for (const auto& p : half->parameters()) {
      if (p.requires_grad()) {
        check(p.scalar_type() == torch::kBFloat16, "bf16 adapters stay bf16");
        grads.push_back(p.grad());
      }
    }
    const auto mine = raw_bytes(grads);
    world.store()->set("worker/bf16/" + std::to_string(world.rank()), mine);
    const auto other =
        world.store()->get("worker/bf16/" + std::to_string(1 - world.rank()));
    check(other == mine, "bf16 gradients averaged alike on both ranks");
  }

  // A rank that had no gradient gets the mean in the parameter's dtype, and
  // its optimizer steps like the other's (an fp32 gradient on a bf16
  // parameter made LibTorch's step fail on that rank alone).
  {
    torch::manual_seed(7);
    torch::nn::Sequential half(torch::nn::Linear(6, 4));
    torchlora::inject_lora(
        half,
        torchlora::LoRAConfig(2).dtype(torch::kBFloat16).target_modules({"0"}));
    {
      torch::NoGradGuard no_grad;
      half->named_parameters()["0.lora_B.default.weight"].normal_();
    }
    dist::AdapterSync half_sync(half, world);
    if (world.rank() == 0) {
      half->forward(torch::randn({2, 6})).sum().backward();
    }
    half_sync.all_reduce_gradients();
    std::vector<torch::Tensor> trainables;
    for (const auto& p : half->parameters()) {
      if (p.requires_grad()) {
        check(
            p.grad().defined() && p.grad().scalar_type() == torch::kBFloat16,
            "a rank without a gradient gets a bf16 mean");
        trainables.push_back(p);
      }
    }
    torch::optim::SGD(trainables, torch::optim::SGDOptions(0.1)).step();
    torch::optim::Adam(trainables, torch::optim::AdamOptions(0.1)).step();
    const auto mine = raw_bytes(trainables);
    world.store()->set(
        "worker/bf16_none/" + std::to_string(world.rank()), mine);
    const auto other = world.store()->get(
        "worker/bf16_none/" + std::to_string(1 - world.rank()));
    check(other == mine, "both ranks step alike after a rank had no gradient");
  }

  // broadcast_state gives every rank rank 0's parameters and buffers, bit
  // for bit, bf16 included; the other ranks' own values are gone.
  {
    torch::manual_seed(400 + world.rank());
    torch::nn::Sequential whole(
        torch::nn::Linear(6, 4), torch::nn::BatchNorm1d(4));
    whole->to(torch::kFloat64);
    whole->forward(torch::randn({5, 6}, torch::kFloat64)); // running stats
    torch::nn::Linear bf16(3, 2);
    bf16->to(torch::kBFloat16);
    whole->push_back(bf16);
    const auto state_of = [](const torch::nn::Module& module) {
      std::vector<torch::Tensor> state;
      for (const auto& p : module.parameters()) {
        state.push_back(p);
      }
      for (const auto& b : module.buffers()) {
        state.push_back(b);
      }
      return state;
    };
    const auto before = raw_bytes(state_of(*whole));
    dist::broadcast_state(whole, world);
    const auto mine = raw_bytes(state_of(*whole));
    world.store()->set("worker/state/" + std::to_string(world.rank()), mine);
    check(
        world.store()->get("worker/state/0") == mine,
        "broadcast_state gives rank 0's bits");
    check(
        world.is_main() == (before == mine),
        "broadcast_state keeps rank 0's values and replaces the others'");

    // Tensors Gloo has no dtype for travel converted and arrive exact.
    auto odd = std::make_shared<torch::nn::Module>();
    odd->register_buffer("mask", torch::rand({6}) > 0.5);
    odd->register_buffer(
        "small", torch::randint(-300, 300, {5}, torch::kShort));
    odd->register_buffer(
        "complex", torch::randn({3, 2}, torch::kComplexDouble));
    odd->register_parameter("half", torch::randn({4}).to(torch::kHalf));
    dist::broadcast_state(odd, world);
    const auto odd_bits = raw_bytes(state_of(*odd));
    world.store()->set("worker/odd/" + std::to_string(world.rank()), odd_bits);
    check(
        world.store()->get("worker/odd/0") == odd_bits,
        "bool, int16, complex and fp16 tensors arrive as rank 0's bits");

    // A tensor that cannot be written element by element is refused on
    // every rank before anything is sent.
    auto expanded = std::make_shared<torch::nn::Module>();
    expanded->register_buffer("e", torch::randn({1}).expand({4}));
    try {
      dist::broadcast_state(expanded, world);
      check(false, "an expanded buffer is refused");
    } catch (const c10::Error& error) {
      const std::string message = error.what_without_backtrace();
      check(
          message.find("torchlora: broadcast_state cannot write into 'e' [4] "
                       "Float: its elements share memory") == 0,
          "expanded buffer message, got: " + message);
    }
  }

  try {
    dist::shard_rows(torch::zeros({7, 2}), world);
    check(false, "7 rows over 2 processes are refused");
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    check(
        message.find("torchlora: shard_rows cannot split a batch of 7 rows "
                     "evenly over 2 processes") == 0,
        "uneven split message, got: " + message);
  }

  auto net = make_model(100 + world.rank());
  dist::AdapterSync sync(*net, world);
  const auto params = trainable(net);
  const int64_t trainable_bytes = numel_of(params) * 4;
  int64_t base_bytes = 0;
  for (const auto& p : net->parameters()) {
    if (!p.requires_grad()) {
      base_bytes += p.numel() * 4;
    }
  }
  torch::optim::AdamW optimizer(params, torch::optim::AdamWOptions(1e-2));
  for (int step = 1; step <= kSteps; ++step) {
    train_step(net, optimizer, batches[step - 1], step, world, &sync);
  }
  const int64_t flags = static_cast<int64_t>(params.size()) * 4;
  check(
      sync.bytes_per_step() == trainable_bytes + flags,
      "bytes per step " + std::to_string(sync.bytes_per_step()) +
          " = trainable bytes + one flag per tensor " +
          std::to_string(trainable_bytes + flags));
  check(
      sync.communicated_bytes() ==
          trainable_bytes + kSteps * sync.bytes_per_step(),
      "communicated bytes are the start's broadcast and the steps' all-reduces only");
  check(sync.buckets() == 1, "one bucket for a small model");

  // One process, whole batches, rank 0's starting adapters.
  auto reference = make_model(100);
  const auto reference_params = trainable(reference);
  torch::optim::AdamW reference_optimizer(
      reference_params, torch::optim::AdamWOptions(1e-2));
  const dist::World single;
  for (int step = 1; step <= kSteps; ++step) {
    train_step(
        reference,
        reference_optimizer,
        batches[step - 1],
        step,
        single,
        nullptr);
  }
  double worst = 0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    worst = std::max(
        worst, (params[i] - reference_params[i]).abs().max().item<double>());
  }
  check(
      worst < 1e-5,
      "data-parallel adapters equal the single process's (max abs diff " +
          std::to_string(worst) + ")");
  // Equal adapters prove nothing if neither moved: both trained.
  auto start = make_model(100);
  const auto start_params = trainable(start);
  double moved = 0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    moved = std::max(
        moved, (params[i] - start_params[i]).abs().max().item<double>());
  }
  check(
      numel_of(params) > 0 && moved > 1e-3,
      "training moved the adapters from rank 0's start (max abs change " +
          std::to_string(moved) + ")");
  // Many small buckets instead of one: the same bits.
  auto bucketed = make_model(100 + world.rank());
  dist::AdapterSync bucketed_sync(
      *bucketed, world, dist::SyncOptions().bucket_bytes(64));
  check(
      bucketed_sync.buckets() > 3,
      "64-byte buckets split the adapters into several");
  const auto bucketed_params = trainable(bucketed);
  torch::optim::AdamW bucketed_optimizer(
      bucketed_params, torch::optim::AdamWOptions(1e-2));
  for (int step = 1; step <= kSteps; ++step) {
    train_step(
        bucketed,
        bucketed_optimizer,
        batches[step - 1],
        step,
        world,
        &bucketed_sync);
  }
  check(
      raw_bytes(bucketed_params) == raw_bytes(params),
      "training with " + std::to_string(bucketed_sync.buckets()) +
          " buckets gives the same bits as with one");

  const auto named = net->named_parameters();
  const auto* first_b = named.find("body.0.lora_B.default.weight");
  check(
      first_b != nullptr && first_b->abs().max().item<double>() > 0,
      "training moved the adapters");

  // Both ranks hold the same bits: compare through the store.
  const auto mine = raw_bytes(params);
  world.store()->set("worker/final/" + std::to_string(world.rank()), mine);
  for (int r = 0; r < world.world_size(); ++r) {
    const auto theirs = world.store()->get("worker/final/" + std::to_string(r));
    check(
        theirs == mine,
        "rank " + std::to_string(r) + "'s adapters are bit-identical to rank " +
            std::to_string(world.rank()) + "'s");
  }

  if (world.is_main()) {
    torchlora::save_adapter(*net, out + "/adapter");
    auto fresh = make_model(999);
    torchlora::load_adapter(*fresh, out + "/adapter");
    torch::NoGradGuard no_grad;
    const auto x = batches[0].x;
    // The offset is not an adapter tensor: compare without it.
    check(
        torch::allclose(fresh->forward(x, 0), net->forward(x, 0), 0, 1e-6),
        "the saved adapter reloads with equal outputs");
  }
  world.barrier();
  check(
      !own_folder || !std::filesystem::exists(out),
      "rank " + std::to_string(world.rank()) + " wrote nothing in " + out);
  std::cout << "train: OK on " << world.describe() << ": adapters within "
            << worst << " of one process, bit-identical across ranks, "
            << sync.bytes_per_step() << " bytes per step (base " << base_bytes
            << " bytes never sent)" << std::endl;
  return 0;
}

int die(int dying_rank, const std::string& out, bool stall) {
  const auto timeout = std::chrono::seconds(5);
  auto world = dist::init_from_env(dist::InitOptions().timeout(timeout));
  auto net = make_model(100 + world.rank());
  dist::AdapterSync sync(*net, world);
  torch::optim::AdamW optimizer(
      trainable(net), torch::optim::AdamWOptions(1e-2));
  const auto batches = fixed_batches(10);
  auto last_good = std::chrono::steady_clock::now();
  try {
    for (int step = 1; step <= 10; ++step) {
      if (world.rank() == dying_rank && step == 3) {
        if (stall) {
          std::cout << "die: rank " << world.rank()
                    << " stops answering at step 3" << std::endl;
          std::this_thread::sleep_for(std::chrono::hours(1));
        }
        std::cout << "die: rank " << world.rank() << " exits abruptly at step 3"
                  << std::endl;
        std::_Exit(3);
      }
      train_step(net, optimizer, batches[step - 1], step, world, &sync);
      last_good = std::chrono::steady_clock::now();
      if (world.is_main()) {
        torchlora::save_adapter(*net, out + "/adapter");
      }
    }
  } catch (const c10::Error& error) {
    const double waited = std::chrono::duration<double>(
                              std::chrono::steady_clock::now() - last_good)
                              .count();
    std::cout << "die: " << world.describe() << " stopped after " << waited
              << " s: " << error.what_without_backtrace() << std::endl;
    // What rank 0 wrote is whole: no temporary file, and it loads.
    namespace fs = std::filesystem;
    if (fs::exists(out + "/adapter")) {
      for (const auto& entry : fs::directory_iterator(out + "/adapter")) {
        const auto file = entry.path().filename().string();
        check(
            file == "adapter_model.safetensors" ||
                file == "adapter_config.json",
            "only the adapter's files in the folder, found " + file);
      }
      auto fresh = make_model(999);
      torchlora::load_adapter(*fresh, out + "/adapter");
      std::cout << "die: files intact" << std::endl;
    }
    return 1;
  }
  std::cout << "die: " << world.describe()
            << " finished without noticing the failure" << std::endl;
  return 0;
}

/// What differs on rank 1: "rank" (its adapters' rank), "buckets" (its
/// SyncOptions) or "setup" (it has nothing trainable, so its own
/// AdapterSync fails and the others must hear of it at once).
int mismatch(const std::string& what) {
  auto world = dist::init_from_env(
      dist::InitOptions().timeout(std::chrono::seconds(20)));
  const bool odd = world.rank() == 1;
  auto net = make_model(100, odd && what == "rank" ? 8 : 4);
  if (odd && what == "setup") {
    for (auto& p : net->parameters()) {
      p.set_requires_grad(false);
    }
  }
  const auto options = dist::SyncOptions().bucket_bytes(
      odd && what == "buckets" ? 64 : int64_t{1} << 20);
  const auto start = std::chrono::steady_clock::now();
  try {
    if (what == "state") {
      torch::nn::Sequential whole(
          torch::nn::Linear(6, odd ? 5 : 4), torch::nn::ReLU());
      dist::broadcast_state(whole, world);
    } else {
      dist::AdapterSync sync(*net, world, options);
    }
  } catch (const c10::Error& error) {
    std::cout << "mismatch: " << world.describe() << " after "
              << std::chrono::duration<double>(
                     std::chrono::steady_clock::now() - start)
                     .count()
              << " s: " << error.what_without_backtrace() << std::endl;
    return 1;
  }
  std::cout << "mismatch: " << world.describe() << " accepted different models"
            << std::endl;
  return 0;
}

/// Seconds since `start`.
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

/// Joins a world of 3 with the default options (a 5-minute timeout), of
/// which rank 2 never starts; rank `killed` is killed 2 s in, after it
/// joined. The others must give up on it within 30 s.
int vanish(int killed) {
  const auto start = std::chrono::steady_clock::now();
  const char* rank_text = std::getenv("RANK");
  if (rank_text != nullptr && std::atoi(rank_text) == killed) {
    std::thread([] {
      std::this_thread::sleep_for(std::chrono::seconds(2));
      std::cout << "vanish: killing myself" << std::endl;
      std::raise(SIGKILL);
    }).detach();
  }
  try {
    dist::init_from_env();
  } catch (const c10::Error& error) {
    std::cout << "vanish: failed after " << seconds_since(start)
              << " s: " << error.what_without_backtrace() << std::endl;
    return 1;
  }
  std::cout << "vanish: joined a world whose rank 2 never started" << std::endl;
  return 0;
}

/// Rank `bad` names a network interface that does not exist.
int bad_interface(int bad) {
  const auto start = std::chrono::steady_clock::now();
  const char* rank_text = std::getenv("RANK");
  if (rank_text != nullptr && std::atoi(rank_text) == bad) {
    ::setenv("GLOO_SOCKET_IFNAME", "torchlora-none", 1);
  }
  try {
    dist::init_from_env(dist::InitOptions().timeout(std::chrono::seconds(60)));
  } catch (const c10::Error& error) {
    std::cout << "bad-interface: failed after " << seconds_since(start)
              << " s: " << error.what_without_backtrace() << std::endl;
    return 1;
  }
  std::cout << "bad-interface: made a group with a bad interface" << std::endl;
  return 0;
}

/// The process started as rank 2 claims rank 1 ("rank") or a world of 4
/// ("size"); every process must fail at once, long before the timeout.
int misfit(const std::string& what) {
  const auto start = std::chrono::steady_clock::now();
  const char* rank_text = std::getenv("RANK");
  if (rank_text != nullptr && std::string(rank_text) == "2") {
    ::setenv(
        what == "rank" ? "RANK" : "WORLD_SIZE", what == "rank" ? "1" : "4", 1);
  }
  try {
    dist::init_from_env(dist::InitOptions().timeout(std::chrono::seconds(60)));
  } catch (const c10::Error& error) {
    std::cout << "misfit: failed after " << seconds_since(start)
              << " s: " << error.what_without_backtrace() << std::endl;
    return 1;
  }
  std::cout << "misfit: made a group" << std::endl;
  return 0;
}

/// Compares two adapter folders' tensors: the same names and shapes, values
/// within `tolerance`. Prints the largest difference; 0 when they agree.
int compare_adapters(
    const std::string& first,
    const std::string& second,
    double tolerance) {
  const auto a =
      torchlora::safetensors::load(first + "/adapter_model.safetensors");
  const auto b =
      torchlora::safetensors::load(second + "/adapter_model.safetensors");
  if (a.size() != b.size() || a.is_empty()) {
    std::cout << "compare-adapters: " << a.size() << " tensors against "
              << b.size() << std::endl;
    return 1;
  }
  double worst = 0;
  for (const auto& item : a) {
    const auto* other = b.find(item.key());
    if (other == nullptr || other->sizes() != item.value().sizes()) {
      std::cout << "compare-adapters: " << item.key()
                << " differs in name or shape" << std::endl;
      return 1;
    }
    const double difference =
        (item.value().to(torch::kFloat64) - other->to(torch::kFloat64))
            .abs()
            .max()
            .item<double>();
    // NaN anywhere is a difference too (std::max would drop it).
    worst = std::isnan(difference) ? difference : std::max(worst, difference);
    if (std::isnan(worst)) {
      break;
    }
  }
  std::cout << "compare-adapters: " << a.size()
            << " tensors, largest difference " << worst << " (at most "
            << tolerance << ")" << std::endl;
  return worst <= tolerance ? 0 : 1;
}

} // namespace

int torchlora_test::run_worker(const std::vector<std::string>& args) {
  try {
    if (args.size() == 2 && args[0] == "train") {
      return train(args[1]);
    }
    if (args.size() == 3 && (args[0] == "die" || args[0] == "stall")) {
      return die(std::stoi(args[1]), args[2], args[0] == "stall");
    }
    if (args.size() == 2 && args[0] == "mismatch") {
      return mismatch(args[1]);
    }
    if (args.size() == 2 && args[0] == "vanish") {
      return vanish(std::stoi(args[1]));
    }
    if (args.size() == 2 && args[0] == "misfit") {
      return misfit(args[1]);
    }
    if (args.size() == 2 && args[0] == "bad-interface") {
      return bad_interface(std::stoi(args[1]));
    }
    if (args.size() == 4 && args[0] == "compare-adapters") {
      return compare_adapters(args[1], args[2], std::stod(args[3]));
    }
  } catch (const std::exception& error) {
    std::cerr << "distributed_worker: " << error.what() << std::endl;
    return 2;
  }
  std::cerr
      << "usage: distributed_worker train OUT | die|stall RANK OUT | mismatch "
         "rank|buckets|setup|state | vanish RANK | bad-interface RANK | "
         "misfit rank|size | "
         "compare-adapters DIR DIR TOLERANCE"
      << std::endl;
  return 2;
}
