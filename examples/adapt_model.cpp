// Adapts a model that was built and loaded elsewhere: the everyday flow.
//
//   build -> torch::load -> inject_lora -> train the adapters -> save
//
//   build/default/examples/adapt_model [checkpoint-folder]
#include <torchlora/torchlora.h>

#include <filesystem>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

namespace {

/// A small classifier in ordinary LibTorch style. Typed layer members are
/// declared as torchlora::LoRALinear (a plain Linear until adapted, with the
/// same checkpoint keys); the MLP lives in a Sequential, the heads in a
/// ModuleDict.
struct ClassifierImpl : torch::nn::Module {
  explicit ClassifierImpl(int64_t width) {
    embed = register_module("embed", torch::nn::Embedding(64, width));
    query = register_module("query", torchlora::LoRALinear(width, width));
    value = register_module("value", torchlora::LoRALinear(width, width));
    mlp = register_module(
        "mlp",
        torch::nn::Sequential(
            torch::nn::Linear(width, 4 * width),
            torch::nn::GELU(),
            torch::nn::Linear(4 * width, width)));
    heads = register_module("heads", torch::nn::ModuleDict());
    heads->update({{"topic", torch::nn::Linear(width, 5).ptr()}});
  }

  torch::Tensor forward(const torch::Tensor& tokens) {
    auto x = embed(tokens); // [batch, len, width]
    auto weights = torch::softmax(query(x).matmul(x.transpose(1, 2)), -1);
    x = x + weights.matmul(value(x));
    x = x + mlp->forward(x);
    // A ModuleDict element may have been swapped by inject_lora.
    return torchlora::linear_forward(*heads["topic"], x.mean(1));
  }

  torch::nn::Embedding embed{nullptr};
  torchlora::LoRALinear query{nullptr}, value{nullptr};
  torch::nn::Sequential mlp{nullptr};
  torch::nn::ModuleDict heads{nullptr};
};
TORCH_MODULE(Classifier);

} // namespace

int main(int argc, char** argv) {
  const std::filesystem::path folder = argc > 1
      ? argv[1]
      : std::filesystem::temp_directory_path() / "torchlora_adapt_model";
  std::filesystem::create_directories(folder);
  const auto checkpoint = (folder / "base.pt").string();
  torch::manual_seed(0);

  // Somebody trained and saved the base model.
  Classifier pretrained(32);
  torch::save(pretrained, checkpoint);

  // 1. Build the model and load the checkpoint, as usual.
  Classifier model(32);
  torch::load(model, checkpoint);

  // 2. Inject adapters: q/v attention projections and the MLP's first layer.
  const auto paths = torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(8).alpha(16).target_modules(
          {"query", "value", "mlp.0"}));
  std::cout << "adapted:";
  for (const auto& path : paths) {
    std::cout << " " << path;
  }
  const auto counts = torchlora::count_parameters(*model);
  std::cout << "\ntrainable: " << counts.trainable << " of " << counts.total
            << " parameters\n";

  // Remember the base tensors, to show that training leaves them alone.
  std::vector<std::pair<std::string, torch::Tensor>> base_before;
  for (const auto& item : model->named_parameters()) {
    if (item.key().find("lora_") == std::string::npos) {
      base_before.emplace_back(item.key(), item.value().detach().clone());
    }
  }

  // 3. Train only what is trainable (the adapters).
  std::vector<torch::Tensor> trainable;
  for (const auto& parameter : model->parameters()) {
    if (parameter.requires_grad()) {
      trainable.push_back(parameter);
    }
  }
  torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(1e-2));
  const auto tokens = torch::randint(64, {16, 12});
  const auto labels = torch::randint(5, {16});
  double first_loss = 0;
  double last_loss = 0;
  for (int step = 1; step <= 30; ++step) {
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model(tokens), labels);
    loss.backward();
    optimizer.step();
    last_loss = loss.item<double>();
    first_loss = step == 1 ? last_loss : first_loss;
    if (step == 1 || step % 10 == 0) {
      std::cout << "step " << step << ": loss " << last_loss << "\n";
    }
  }

  // 4. Save: the base keys are the checkpoint's, the adapters come next to
  // them.
  torch::save(model, (folder / "adapted.pt").string());
  bool unchanged = true;
  const auto parameters = model->named_parameters();
  for (const auto& [name, tensor] : base_before) {
    unchanged = unchanged && torch::equal(parameters[name], tensor);
  }
  std::cout << "base weights unchanged: " << std::boolalpha << unchanged
            << "\n";

  // 5. Later: build the model, inject the same way and load the adapted
  // checkpoint; it computes what the trained model computes.
  Classifier reloaded(32);
  torchlora::inject_lora(
      reloaded,
      torchlora::LoRAConfig(8).alpha(16).target_modules(
          {"query", "value", "mlp.0"}));
  torch::load(reloaded, (folder / "adapted.pt").string());
  model->eval();
  reloaded->eval();
  const bool same_output = torch::equal(reloaded(tokens), model(tokens));
  std::cout << "reloaded model gives the same output: " << same_output << "\n";
  const bool learned = last_loss < 0.5 * first_loss;
  std::cout << "loss at least halved: " << learned << "\n";
  return unchanged && paths.size() == 3 && same_output && learned ? 0 : 1;
}
