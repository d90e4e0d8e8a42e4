// Every operation docs/serving.md lists as refused while a forward runs (on
// another thread) or while a torchlora::AdaptedWeights scope lives, each
// checked with that state really in place: a forward held inside a LoRA
// layer on another thread (a deterministic hand-off, no sleep), or a live
// scope. Each refusal names the operation and leaves the model as it was;
// once the state ends, the same operation succeeds.
#include "test_support.h"

#include <torchlora/torchlora.h>

#include <ATen/record_function.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_refusals_test {

namespace {

using namespace torchlora;
using torchlora_test::message_of;
using torchlora_test::module_tree;
using torchlora_test::snapshot;

/// Runs `forward` on a thread of its own and holds it at the first ATen op
/// that thread dispatches once `inside()` is true (a thread-local
/// RecordFunction callback), until `release()`: the constructor returns
/// once the forward is held there, or has ended without being held. With
/// `inside` = "this LoRA layer counts a running forward", the forward waits
/// inside that layer's forward.
class HeldForward {
 public:
  HeldForward(std::function<void()> forward, std::function<bool()> inside)
      : inside_(std::move(inside)) {
    HeldForward* none = nullptr;
    TORCH_CHECK(
        current_.compare_exchange_strong(none, this),
        "one HeldForward at a time");
    thread_ = std::thread([this, forward = std::move(forward)] {
      const auto callback =
          at::addThreadLocalCallback(at::RecordFunctionCallback(&on_op_start)
                                         .scopes({at::RecordScope::FUNCTION}));
      try {
        forward();
      } catch (const std::exception& error) {
        error_ = error.what();
      }
      at::removeCallback(callback);
      std::lock_guard<std::mutex> lock(mutex_);
      finished_ = true;
      changed_.notify_all();
    });
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [this] { return held_ || finished_; });
  }

  HeldForward(const HeldForward&) = delete;
  HeldForward& operator=(const HeldForward&) = delete;

  ~HeldForward() {
    release();
    current_ = nullptr;
  }

  /// True while the forward waits inside.
  bool held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_ && !released_;
  }

  /// Lets the forward finish and waits for it; a failure of the forward is
  /// a test failure.
  void release() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released_ = true;
      changed_.notify_all();
    }
    if (thread_.joinable()) {
      thread_.join();
      EXPECT_EQ(error_, "") << "the held forward failed";
    }
  }

 private:
  static std::unique_ptr<at::ObserverContext> on_op_start(
      const at::RecordFunction& /*op*/) {
    auto* self = current_.load();
    // Only the forward's thread has this callback.
    if (self != nullptr && !self->waited_ && self->inside_()) {
      self->waited_ = true;
      self->wait_for_release();
    }
    return nullptr;
  }

  void wait_for_release() {
    std::unique_lock<std::mutex> lock(mutex_);
    held_ = true;
    changed_.notify_all();
    changed_.wait(lock, [this] { return released_; });
  }

  static inline std::atomic<HeldForward*> current_{nullptr};
  std::function<bool()> inside_;
  bool waited_ = false; // the forward's thread only
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool held_ = false;
  bool released_ = false;
  bool finished_ = false;
  std::string error_;
};

/// The LoRA layers of `model`, in module order.
std::vector<LoRALayer*> lora_layers(torch::nn::Module& model) {
  std::vector<LoRALayer*> layers;
  for (const auto& module : model.modules()) {
    if (auto* layer = dynamic_cast<LoRALayer*>(module.get())) {
      layers.push_back(layer);
    }
  }
  return layers;
}

/// The LoRA layer that a test holds a forward in (or the last one).
LoRALayer& held_layer(torch::nn::Module& model, bool first) {
  const auto layers = lora_layers(model);
  TORCH_CHECK(!layers.empty(), "the model has no LoRA layer");
  return first ? *layers.front() : *layers.back();
}

/// An operation that docs/serving.md says is refused, with what its refusal
/// names, and whether it needs a merged model.
struct Operation {
  const char* name;
  const char* refused_as;
  /// Runs it on the model; `held` is the layer a test holds a forward in.
  std::function<void(torch::nn::Module& model, LoRALayer& held)> run;
  bool needs_merged = false;
};

/// The list in docs/serving.md (see "Serving several adapters", Threads, and
/// "LibTorch's own Transformer modules"). `folder` holds an adapter file
/// saved from the model, for load_adapter; `targets` what inject_lora adapts.
std::vector<Operation> refused_operations(
    const std::string& folder,
    const std::vector<std::string>& targets) {
  return {
      {"set_adapter",
       "set_adapter",
       [](torch::nn::Module& m, LoRALayer&) { set_adapter(m, "other"); }},
      {"set_scale",
       "set_scale",
       [](torch::nn::Module& m, LoRALayer&) { set_scale(m, "default", 0.5); }},
      {"delete_adapter",
       "delete_adapter",
       [](torch::nn::Module& m, LoRALayer&) { delete_adapter(m, "other"); }},
      {"add_adapter",
       "add_adapter",
       [](torch::nn::Module&, LoRALayer& held) {
         held.add_adapter("added", LoRAOptions(2));
       }},
      {"merge", "merge", [](torch::nn::Module& m, LoRALayer&) { merge(m); }},
      {"unmerge",
       "unmerge",
       [](torch::nn::Module& m, LoRALayer&) { unmerge(m); },
       true},
      {"DisableAdapters",
       "DisableAdapters",
       [](torch::nn::Module& m, LoRALayer&) { DisableAdapters off(m); }},
      {"load_adapter",
       "load_adapter",
       [folder](torch::nn::Module& m, LoRALayer&) {
         load_adapter(m, folder, "loaded");
       }},
      {"merge_and_unload",
       "merge_and_unload",
       [](torch::nn::Module& m, LoRALayer&) { merge_and_unload(m); }},
      {"unload", "unload", [](torch::nn::Module& m, LoRALayer&) { unload(m); }},
      {"inject_lora",
       "inject_lora",
       [targets](torch::nn::Module& m, LoRALayer&) {
         inject_lora(
             m, LoRAConfig(2).target_modules(targets).adapter_name("third"));
       }},
  };
}

/// What one LoRA layer's refusal must leave as it was.
struct LayerState {
  std::vector<std::string> active;
  std::map<std::string, double> scales;
  bool enabled;
  bool merged;
  bool merged_in_place;

  explicit LayerState(const LoRALayer& layer)
      : active(layer.active_adapters()),
        enabled(layer.adapters_enabled()),
        merged(layer.merged()),
        merged_in_place(layer.merged_in_place()) {
    for (const auto& name : layer.adapter_names()) {
      scales[name] = layer.scale(name);
    }
  }

  bool operator==(const LayerState& other) const {
    return active == other.active && scales == other.scales &&
        enabled == other.enabled && merged == other.merged &&
        merged_in_place == other.merged_in_place;
  }
};

/// What a refusal must leave as it was: every tensor and flag, the module
/// tree, and each LoRA layer's adapters, scales and switches.
struct ModelState {
  std::map<std::string, torchlora_test::TensorState> tensors;
  std::vector<std::string> tree;
  std::vector<std::string> adapters;
  std::vector<LayerState> layers;

  explicit ModelState(torch::nn::Module& model)
      : tensors(snapshot(model)),
        tree(module_tree(model)),
        adapters(adapter_names(model)) {
    for (const auto* layer : lora_layers(model)) {
      layers.emplace_back(*layer);
    }
  }
};

void expect_same_state(const ModelState& before, torch::nn::Module& model) {
  torchlora_test::expect_unchanged(before.tensors, model);
  EXPECT_EQ(module_tree(model), before.tree);
  EXPECT_EQ(adapter_names(model), before.adapters);
  const ModelState after(model);
  ASSERT_EQ(after.layers.size(), before.layers.size());
  for (size_t i = 0; i < before.layers.size(); ++i) {
    EXPECT_TRUE(after.layers[i] == before.layers[i])
        << "LoRA layer " << i << " changed";
  }
}

/// Runs `operation` while `during` holds its state; expects the refusal
/// with `text`, the model unchanged, and success once the state ended.
/// `first`: the operation's `held` layer is the first LoRA layer, else the
/// last.
template <typename Model, typename During>
void expect_refused_while(
    Model& model,
    const Operation& operation,
    bool first,
    const std::string& text,
    const During& during) {
  SCOPED_TRACE(operation.name);
  if (operation.needs_merged) {
    merge(model);
  }
  auto& held = held_layer(*model, first);
  const ModelState before(*model);
  during([&] {
    try {
      operation.run(*model, held);
      ADD_FAILURE() << operation.name << " was not refused";
    } catch (const c10::Error& error) {
      const auto message = message_of(error);
      EXPECT_EQ(message.rfind("torchlora:", 0), 0u) << message;
      EXPECT_NE(message.find(text), std::string::npos) << message;
      EXPECT_NE(
          message.find(std::string(operation.refused_as) + " while"),
          std::string::npos)
          << message;
    }
    expect_same_state(before, *model);
  });
  expect_same_state(before, *model);
  EXPECT_NO_THROW(operation.run(*model, held));
}

class RefusalsTest : public torchlora_test::Seeded {
 protected:
  void SetUp() override {
    Seeded::SetUp();
    folder = ::testing::TempDir() + "torchlora_refusals_" +
        ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(folder);
  }
  void TearDown() override {
    std::filesystem::remove_all(folder);
  }
  std::string folder;
};

/// `model` with adapters "default" and "other" on its modules "0" and "2".
torch::nn::Sequential with_two_adapters(torch::nn::Sequential model) {
  for (const char* name : {"default", "other"}) {
    inject_lora(
        model,
        LoRAConfig(2)
            .init(LoRAInit::random)
            .target_modules({"0", "2"})
            .adapter_name(name));
  }
  set_adapter(model, "default");
  return model;
}

/// Models whose first module is a LoRA layer of each kind (so that a held
/// forward is inside it), then a plain layer and a LoRA Linear.
std::vector<std::pair<std::string, std::function<torch::nn::Sequential()>>>
model_makers() {
  return {
      {"Linear",
       [] {
         torch::nn::Sequential model(
             torch::nn::Linear(8, 16),
             torch::nn::ReLU(),
             torch::nn::Linear(16, 4));
         return with_two_adapters(model);
       }},
      {"Embedding",
       [] {
         torch::nn::Sequential model(
             torch::nn::Embedding(10, 16),
             torch::nn::ReLU(),
             torch::nn::Linear(16, 4));
         return with_two_adapters(model);
       }},
      {"Conv1d",
       [] {
         torch::nn::Sequential model(
             torch::nn::Conv1d(torch::nn::Conv1dOptions(3, 16, 1)),
             torch::nn::Flatten(),
             torch::nn::Linear(16, 4));
         return with_two_adapters(model);
       }},
  };
}

/// An input of 3 rows for the model of `kind`.
torch::Tensor input_for(const std::string& kind) {
  if (kind == "Embedding") {
    return torch::randint(10, {3}, torch::kLong);
  }
  if (kind == "Conv1d") {
    return torch::randn({3, 3, 1});
  }
  return torch::randn({3, 8});
}

TEST_F(
    RefusalsTest,
    EveryListedOperationIsRefusedWhileAForwardRunsOnAnotherThread) {
  const std::vector<std::string> targets{"0", "2"};
  for (const auto& [kind, make] : model_makers()) {
    std::filesystem::remove_all(folder);
    save_adapter(make(), folder);
    const auto x = input_for(kind);
    // Held in the first LoRA layer (of this kind), then in the last: a
    // model-wide operation must refuse before it changes the layers ahead.
    for (const bool first : {true, false}) {
      SCOPED_TRACE(
          "first layer: " + kind + ", forward held in the " +
          (first ? "first" : "last") + " LoRA layer");
      for (const auto& operation : refused_operations(folder, targets)) {
        auto model = make();
        torch::Tensor output;
        expect_refused_while(
            model,
            operation,
            first,
            "1 forward(s) of",
            [&](const std::function<void()>& body) {
              auto& layer = held_layer(*model, first);
              HeldForward forward(
                  [&] { output = model->forward(x); },
                  [&] { return layer.running_forwards() > 0; });
              ASSERT_TRUE(forward.held()) << "the forward was never held";
              ASSERT_EQ(layer.running_forwards(), 1);
              body();
              forward.release();
              EXPECT_EQ(layer.running_forwards(), 0);
              EXPECT_EQ(output.sizes(), (std::vector<int64_t>{3, 4}));
            });
        if (HasFatalFailure()) {
          return;
        }
      }
    }
  }
}

/// LibTorch's TransformerEncoder, its attention and feed-forward adapted
/// (bound layers: their weights reach LibTorch's members through an
/// AdaptedWeights scope); adapters "default" and "other".
torch::nn::TransformerEncoder encoder_with_two_adapters() {
  torch::nn::TransformerEncoder encoder(torch::nn::TransformerEncoderOptions(
      torch::nn::TransformerEncoderLayerOptions(8, 2)
          .dim_feedforward(12)
          .dropout(0),
      1));
  for (const char* name : {"default", "other"}) {
    inject_lora(
        encoder,
        LoRAConfig(2)
            .init(LoRAInit::random)
            .target_modules({"self_attn", "linear1"})
            .adapter_name(name));
  }
  set_adapter(encoder, "default");
  return encoder;
}

TEST_F(
    RefusalsTest,
    EveryListedOperationIsRefusedWhileAnAdaptedWeightsScopeLives) {
  {
    auto encoder = encoder_with_two_adapters();
    save_adapter(encoder, folder);
  }
  const auto x = torch::randn({4, 2, 8});
  const std::vector<std::string> targets{"self_attn", "linear1"};
  for (const auto& operation : refused_operations(folder, targets)) {
    auto encoder = encoder_with_two_adapters();
    expect_refused_while(
        encoder,
        operation,
        /*first=*/false,
        "while a torchlora::AdaptedWeights holds the weight computed for",
        [&](const std::function<void()>& body) {
          AdaptedWeights scope(*encoder);
          const auto output = encoder(x);
          body();
          // The scope's weights are still the ones it made.
          EXPECT_TRUE(torch::equal(encoder(x), output));
        });
    if (HasFatalFailure()) {
      return;
    }
  }
}

} // namespace

} // namespace torchlora_refusals_test
