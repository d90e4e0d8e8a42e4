// torchlora/distributed.h in one process: the environment torchrun sets and
// its errors, the single-process World, AdapterSync's checks, shard_rows.
// The multi-process behaviour is tested by the scenarios in CMakeLists.txt,
// which run this program's `worker` modes under scripts/launch.sh.

#include "distributed/distributed_worker.h"
#include "test_support.h"

#include <torchlora/distributed.h>
#include <torchlora/torchlora.h>

#include <gtest/gtest.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace dist = torchlora::distributed;
using torchlora_test::message_of;

/// Expects `text` to contain `part`.
#define EXPECT_CONTAINS(text, part)                          \
  EXPECT_NE(std::string(text).find(part), std::string::npos) \
      << "expected to find: " << (part) << "\nin: " << (text)

/// Sets the launcher's variables for one test and puts back what was there.
class Environment {
 public:
  explicit Environment(const std::map<std::string, std::string>& values) {
    for (const auto* name :
         {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) {
      const char* old = std::getenv(name);
      saved_[name] = old ? std::optional<std::string>(old) : std::nullopt;
      ::unsetenv(name);
    }
    for (const auto& [name, value] : values) {
      ::setenv(name.c_str(), value.c_str(), 1);
    }
  }
  ~Environment() {
    for (const auto& [name, value] : saved_) {
      if (value) {
        ::setenv(name.c_str(), value->c_str(), 1);
      } else {
        ::unsetenv(name.c_str());
      }
    }
  }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

/// The message of init_from_env's error under `values`, or "" if none.
std::string init_error(
    const std::map<std::string, std::string>& values,
    const dist::InitOptions& options = dist::InitOptions()) {
  Environment environment(values);
  try {
    dist::init_from_env(options);
  } catch (const c10::Error& error) {
    return message_of(error);
  }
  return "";
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
int unused_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

TEST(InitFromEnv, WithoutTheVariablesIsOneProcess) {
  Environment environment({});
  const auto world = dist::init_from_env();
  EXPECT_EQ(world.rank(), 0);
  EXPECT_EQ(world.world_size(), 1);
  EXPECT_EQ(world.local_rank(), 0);
  EXPECT_TRUE(world.is_main());
  EXPECT_FALSE(world.is_distributed());
  EXPECT_FALSE(world.group());
  EXPECT_FALSE(world.store());
  EXPECT_EQ(world.describe(), "rank 0 of 1");
  world.barrier();
}

TEST(InitFromEnv, WorldSizeOneIsOneProcess) {
  Environment environment(
      {{"WORLD_SIZE", "1"}, {"RANK", "0"}, {"LOCAL_RANK", "0"}});
  const auto world =
      dist::init_from_env(dist::InitOptions().timeout(std::chrono::seconds(3)));
  EXPECT_EQ(world.world_size(), 1);
  EXPECT_FALSE(world.is_distributed());
  EXPECT_EQ(world.timeout(), std::chrono::milliseconds(3000));
}

TEST(InitFromEnv, BadVariablesAreNamedWithWhatCame) {
  const std::map<std::string, std::string> two{{"WORLD_SIZE", "2"}};
  EXPECT_CONTAINS(
      init_error({{"WORLD_SIZE", "two"}}),
      "torchlora: WORLD_SIZE must be an integer from 1 to 1048576, "
      "got 'two'");
  EXPECT_CONTAINS(
      init_error({{"WORLD_SIZE", "0"}}),
      "torchlora: WORLD_SIZE must be an integer from 1 to 1048576, "
      "got '0'");
  EXPECT_CONTAINS(
      init_error(two), "torchlora: RANK is not set but WORLD_SIZE is 2");
  EXPECT_CONTAINS(
      init_error({{"WORLD_SIZE", "2"}, {"RANK", "2"}}),
      "torchlora: RANK must be an integer from 0 to 1 (WORLD_SIZE "
      "is 2), got '2'");
  EXPECT_CONTAINS(
      init_error({{"WORLD_SIZE", "2"}, {"RANK", "1x"}}), "got '1x'");
  EXPECT_CONTAINS(
      init_error({{"WORLD_SIZE", "1"}, {"RANK", "1"}}),
      "torchlora: RANK must be an integer from 0 to 0 (WORLD_SIZE "
      "is 1), got '1'");
  EXPECT_CONTAINS(
      init_error({{"LOCAL_RANK", "-1"}}),
      "torchlora: LOCAL_RANK must be an integer from 0 to 1048576, "
      "got '-1'");
  EXPECT_CONTAINS(
      init_error({{"WORLD_SIZE", "2"}, {"RANK", "0"}}),
      "torchlora: MASTER_ADDR is not set (WORLD_SIZE is 2)");
  EXPECT_CONTAINS(
      init_error(
          {{"WORLD_SIZE", "2"}, {"RANK", "0"}, {"MASTER_ADDR", "127.0.0.1"}}),
      "torchlora: MASTER_PORT is not set (WORLD_SIZE is 2)");
  EXPECT_CONTAINS(
      init_error(
          {{"WORLD_SIZE", "2"},
           {"RANK", "0"},
           {"MASTER_ADDR", "127.0.0.1"},
           {"MASTER_PORT", "70000"}}),
      "torchlora: MASTER_PORT must be an integer from 1 to 65535, "
      "got '70000'");
}

TEST(InitFromEnv, BadOptionsAreNamed) {
  EXPECT_CONTAINS(
      init_error({}, dist::InitOptions().timeout(std::chrono::milliseconds(0))),
      "torchlora: InitOptions timeout must be positive, got 0 ms");
  EXPECT_CONTAINS(
      init_error({}, dist::InitOptions().device(c10::Device(c10::kMeta))),
      "torchlora: init_from_env communicates CPU tensors (Gloo) or "
      "CUDA tensors (NCCL), got device meta");
#if !defined(USE_C10D_NCCL)
  EXPECT_CONTAINS(
      init_error(
          {{"WORLD_SIZE", "2"},
           {"RANK", "0"},
           {"MASTER_ADDR", "127.0.0.1"},
           {"MASTER_PORT", "29500"}},
          dist::InitOptions().device(c10::Device(c10::kCUDA, 0))),
      "torchlora: device cuda:0 needs NCCL, and this LibTorch was "
      "built without it");
#endif
}

/// init_from_env's error for `rank` of 2 processes on a port nobody
/// serves, with a 1.5 s timeout; `port` says which port was used.
std::string alone_on_unused_port(int rank, std::string* port) {
  *port = std::to_string(unused_port());
  return init_error(
      {{"WORLD_SIZE", "2"},
       {"RANK", std::to_string(rank)},
       {"MASTER_ADDR", "127.0.0.1"},
       {"MASTER_PORT", *port}},
      dist::InitOptions().timeout(std::chrono::milliseconds(1500)));
}

TEST(InitFromEnv, AStoreNobodyServesIsAnErrorAfterTheTimeout) {
  std::string port;
  const auto start = std::chrono::steady_clock::now();
  const auto message = alone_on_unused_port(1, &port);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  EXPECT_CONTAINS(
      message,
      "torchlora: rank 1 of 2 could not join the store at 127.0.0.1:" + port +
          ": ");
  EXPECT_CONTAINS(
      message,
      "(rank 0 serves it there and must be able to listen on that port; the "
      "others wait for it up to the InitOptions timeout, 1500 ms)");
  EXPECT_LT(seconds, 30.0);
}

TEST(InitFromEnv, RankZeroAloneIsAnErrorAfterTheTimeout) {
  std::string port;
  const auto message = alone_on_unused_port(0, &port);
  EXPECT_CONTAINS(
      message,
      "torchlora: rank 0 of 2 could not make its process group: rank 1 did "
      "not join within 1500 ms (InitOptions timeout)");
}

TEST(GlooAddress, IsTheLocalAddressThatRoutesToTheMaster) {
  std::string why;
  EXPECT_EQ(dist::detail::route_source("127.0.0.1", 29500, &why), "127.0.0.1");
  const auto local_source =
      dist::detail::route_source("localhost", 29500, &why);
  EXPECT_TRUE(dist::detail::is_loopback_address(local_source)) << local_source;
  EXPECT_EQ(
      dist::detail::route_source("no-such-host.invalid", 29500, &why), "");
  EXPECT_CONTAINS(why, "cannot resolve no-such-host.invalid");
  for (const auto* loopback : {"localhost", "127.0.0.1", "127.0.1.1", "::1"}) {
    EXPECT_TRUE(dist::detail::is_loopback_address(loopback)) << loopback;
  }
  EXPECT_FALSE(dist::detail::is_loopback_address("10.211.0.1"));

  Environment environment({});
  ::unsetenv("GLOO_SOCKET_IFNAME");
  const auto chosen = dist::detail::choose_gloo_address("127.0.0.1", 29500);
  EXPECT_EQ(chosen.host, "127.0.0.1");
  EXPECT_TRUE(chosen.interface.empty());
  EXPECT_CONTAINS(
      chosen.describe(),
      "127.0.0.1 (the local address that routes to MASTER_ADDR 127.0.0.1; "
      "GLOO_SOCKET_IFNAME overrides it)");
  EXPECT_TORCHLORA_ERROR(
      dist::detail::choose_gloo_address("no-such-host.invalid", 29500),
      "torchlora: found no local address that reaches MASTER_ADDR "
      "no-such-host.invalid (cannot resolve no-such-host.invalid");
  // Rank 0 on the loopback keeps it while every other rank is there too.
  auto local = chosen;
  dist::detail::reach_the_others(
      local, {"host 127.0.0.1", "interface lo", "host 127.0.0.1"}, 29500);
  EXPECT_EQ(local.host, "127.0.0.1");
  EXPECT_EQ(
      dist::detail::list_addresses({"host 10.0.0.1", "interface lo"}),
      " rank 0 from host 10.0.0.1, rank 1 from interface lo;");

  ::setenv("GLOO_SOCKET_IFNAME", "eth7", 1);
  const auto named = dist::detail::choose_gloo_address("10.0.0.1", 29500);
  ::unsetenv("GLOO_SOCKET_IFNAME");
  EXPECT_EQ(named.interface, "eth7");
  EXPECT_EQ(named.describe(), "interface eth7 (GLOO_SOCKET_IFNAME)");
}

/// A model with two adapters, "default" trainable.
torch::nn::Sequential adapted_model() {
  torch::manual_seed(0);
  torch::nn::Sequential model(
      torch::nn::Linear(6, 5), torch::nn::ReLU(), torch::nn::Linear(5, 3));
  torchlora::inject_lora(
      model, torchlora::LoRAConfig(2).target_modules({"0", "2"}));
  return model;
}

TEST(AdapterSync, InOneProcessKeepsGradientsAsTheyAre) {
  auto model = adapted_model();
  const dist::World world;
  dist::AdapterSync sync(model, world, dist::SyncOptions().bucket_bytes(40));
  EXPECT_EQ(
      sync.names(),
      (std::vector<std::string>{
          "0.lora_A.default.weight",
          "0.lora_B.default.weight",
          "2.lora_A.default.weight",
          "2.lora_B.default.weight"}));
  EXPECT_EQ(sync.bytes_per_step(), 0);
  EXPECT_EQ(sync.communicated_bytes(), 0);
  // 12 + 10 + 10 + 6 floats, at most 10 floats a bucket: 12 alone, 10, 10, 6.
  EXPECT_EQ(sync.buckets(), 4);
  model->forward(torch::randn({4, 6})).sum().backward();
  std::vector<torch::Tensor> before;
  for (const auto& p : model->parameters()) {
    before.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  }
  sync.all_reduce_gradients();
  std::size_t i = 0;
  for (const auto& p : model->parameters()) {
    ASSERT_EQ(p.grad().defined(), before[i].defined());
    if (before[i].defined()) {
      EXPECT_TRUE(torch::equal(p.grad(), before[i]));
    }
    ++i;
  }
  EXPECT_EQ(sync.world().world_size(), 1);
}

TEST(AdapterSync, RefusesAModelWithNothingTrainable) {
  torch::nn::Linear plain(3, 2);
  for (auto& p : plain->parameters()) {
    p.set_requires_grad(false);
  }
  EXPECT_TORCHLORA_ERROR(
      dist::AdapterSync(plain, dist::World()),
      "torchlora: AdapterSync found no trainable tensor in the "
      "model; make it after inject_lora");
}

TEST(AdapterSync, RefusesABucketSizeThatIsNotPositive) {
  auto model = adapted_model();
  EXPECT_TORCHLORA_ERROR(
      dist::AdapterSync sync(
          model, dist::World(), dist::SyncOptions().bucket_bytes(0)),
      "torchlora: SyncOptions bucket_bytes must be positive, got 0");
}

TEST(AdapterSync, RefusesTrainableTensorsThatChangedSinceItWasMade) {
  auto model = adapted_model();
  dist::AdapterSync sync(model, dist::World());
  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(2).adapter_name("extra").target_modules({"0"}));
  torchlora::set_adapter(model, {"default", "extra"});
  EXPECT_TORCHLORA_ERROR(
      sync.all_reduce_gradients(),
      "torchlora: the model's trainable tensors changed since its "
      "AdapterSync was made ('0.lora_B.default.weight' was "
      "expected, got '0.lora_A.extra.weight'); make a new "
      "AdapterSync after inject_lora or set_adapter");
  auto frozen = adapted_model();
  dist::AdapterSync frozen_sync(frozen, dist::World());
  frozen->parameters().back().set_requires_grad(false);
  for (auto& p : frozen->named_parameters()) {
    if (p.key() == "2.lora_B.default.weight") {
      p.value().set_requires_grad(false);
    }
  }
  EXPECT_TORCHLORA_ERROR(
      frozen_sync.all_reduce_gradients(),
      "torchlora: the model's trainable tensors changed since its "
      "AdapterSync was made (4 were trainable, now 3)");
}

TEST(AdapterSync, RefusesAModelConvertedSinceItWasMade) {
  auto model = adapted_model();
  dist::AdapterSync sync(model, dist::World());
  model->to(torch::kFloat64);
  EXPECT_TORCHLORA_ERROR(
      sync.all_reduce_gradients(),
      "torchlora: '0.lora_A.default.weight' changed from Float on cpu to "
      "Double on cpu since its AdapterSync was made; make a new AdapterSync "
      "after moving or converting the model");
}

TEST(AdapterSync, RefusesSparseGradients) {
  torch::nn::Embedding embedding(
      torch::nn::EmbeddingOptions(10, 4).sparse(true));
  dist::AdapterSync sync(embedding, dist::World());
  embedding->forward(torch::tensor({1, 2}, torch::kLong)).sum().backward();
  EXPECT_TORCHLORA_ERROR(
      sync.all_reduce_gradients(),
      "torchlora: AdapterSync averages dense gradients only; "
      "'weight' has a sparse one");
}

TEST(ShardRows, OneProcessGetsTheWholeBatch) {
  const auto batch = torch::randn({5, 3});
  const auto share = dist::shard_rows(batch, dist::World());
  EXPECT_TRUE(share.is_same(batch) || torch::equal(share, batch));
  EXPECT_EQ(share.data_ptr(), batch.data_ptr());
  EXPECT_TORCHLORA_ERROR(
      dist::shard_rows(torch::tensor(1.0), dist::World()),
      "torchlora: shard_rows needs a tensor with a first "
      "dimension, got 0 dimensions");
}

} // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "worker") {
    return torchlora_test::run_worker(
        std::vector<std::string>(argv + 2, argv + argc));
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
