// Fine-tunes in C++ a model that was defined, trained and scripted in
// Python (examples/torchscript_finetune/train.py), with LoRA through
// torchlora::jit, and compares it with full fine-tuning of the same loaded
// model.
//
//   python3 examples/torchscript_finetune/train.py --out runs/ts
//   build/default/examples/torchscript_finetune --model runs/ts/base.pt
//       --out runs/ts [--rank 8] [--steps 600] [--quick]
//   python3 examples/torchscript_finetune/train.py
//       --evaluate runs/ts/merged.pt
//
// The Python model classifies Fashion-MNIST images; here it learns inverted
// images (255 - pixel), which it never saw. The program writes the adapter
// in peft's format (--out/adapter) and the merged TorchScript model
// (--out/merged.pt), which the Python script then evaluates without
// torchlora: its accuracy there equals the one printed here.
#include "finetune_fashion/fashion_mnist.h"

#include <torchlora/jit.h>

#include <torch/csrc/jit/passes/tensorexpr_fuser.h>

#include <CLI/CLI.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

struct Settings {
  std::string model = "torchscript_finetune/base.pt";
  std::string data_dir = fashion::kDefaultDir;
  std::string out = "torchscript_finetune";
  int64_t rank = 8;
  int steps = 600;
  bool quick = false;
};

/// Inverted images (255 - pixel), normalized as train.py does, and labels.
fashion::Split inverted_split(
    const std::string& dir,
    const std::string& prefix) {
  const auto raw =
      fashion::read_idx(dir + "/" + prefix + "-images-idx3-ubyte.gz", 3);
  const auto labels =
      fashion::read_idx(dir + "/" + prefix + "-labels-idx1-ubyte.gz", 1);
  return {
      ((255 - raw).to(torch::kFloat32) / 255.0 - 0.2860) / 0.3530,
      labels.to(torch::kInt64)};
}

/// How many of `split`'s images `logits_of` classifies correctly, in
/// batches of 1000 (as train.py counts them).
int64_t correct(
    const fashion::Split& split,
    const std::function<torch::Tensor(const torch::Tensor&)>& logits_of) {
  const torch::NoGradGuard no_grad;
  int64_t count = 0;
  for (int64_t i = 0; i < split.images.size(0); i += 1000) {
    const auto images = split.images.slice(0, i, i + 1000).unsqueeze(1);
    const auto labels = split.labels.slice(0, i, i + 1000);
    count += logits_of(images).argmax(1).eq(labels).sum().item<int64_t>();
  }
  return count;
}

struct Run {
  double seconds = 0;
  int64_t correct = 0;
};

/// `steps` Adam steps of batch 128 on `train`, calling `logits_of` inside
/// `step_scope` (which makes what a step needs and returns the logits).
Run fine_tune(
    const fashion::Split& train,
    std::vector<torch::Tensor> parameters,
    double learning_rate,
    int steps,
    const std::function<torch::Tensor(const torch::Tensor&)>& logits_of) {
  torch::manual_seed(1);
  torch::optim::Adam optimizer(std::move(parameters), learning_rate);
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < steps; ++step) {
    const auto batch =
        torch::randint(train.images.size(0), {128}, torch::kInt64);
    const auto images = train.images.index_select(0, batch).unsqueeze(1);
    const auto loss = torch::nn::functional::cross_entropy(
        logits_of(images), train.labels.index_select(0, batch));
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
  }
  Run run;
  run.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  return run;
}

std::string percent(int64_t count, int64_t total) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(4)
       << static_cast<double>(count) / static_cast<double>(total) << " ("
       << count << " of " << total << ")";
  return text.str();
}

int run(const Settings& settings) {
  const auto train = inverted_split(settings.data_dir, "train");
  const auto test = inverted_split(settings.data_dir, "t10k");
  const int steps = settings.quick ? 60 : settings.steps;
  const auto total = test.labels.size(0);

  // The model as Python saved it.
  auto module = torch::jit::load(settings.model);
  module.eval();
  const auto plain = [&](torch::jit::Module& m) {
    return [&m](const torch::Tensor& x) { return m.forward({x}).toTensor(); };
  };
  const auto before = correct(test, plain(module));

  // LoRA on its three Linear layers.
  const auto config = torchlora::LoRAConfig(settings.rank)
                          .alpha(2.0 * static_cast<double>(settings.rank))
                          .target_modules({"fc1", "fc2", "head"});
  auto lora = torchlora::jit::inject_lora(module, config);
  auto lora_run = fine_tune(
      train, lora.parameters(), 5e-3, steps, [&](const torch::Tensor& x) {
        return lora.forward({x}).toTensor();
      });
  lora_run.correct = correct(test, [&](const torch::Tensor& x) {
    return lora.forward({x}).toTensor();
  });
  int64_t trainable = 0;
  for (const auto& parameter : lora.parameters()) {
    trainable += parameter.numel();
  }

  // Full fine-tuning of the same loaded model.
  auto full = torch::jit::load(settings.model);
  full.eval();
  std::vector<torch::Tensor> weights;
  int64_t all = 0;
  for (const auto& parameter : full.parameters()) {
    parameter.set_requires_grad(true);
    weights.push_back(parameter);
    all += parameter.numel();
  }
  auto full_run = fine_tune(train, weights, 1e-3, steps, plain(full));
  full_run.correct = correct(test, plain(full));

  // The adapter in peft's format, and the merged model for Python.
  fs::create_directories(settings.out);
  lora.save_adapter((fs::path(settings.out) / "adapter").string(), config);
  auto merged = lora.merge_and_unload();
  const auto merged_path = (fs::path(settings.out) / "merged.pt").string();
  merged.save(merged_path);
  const auto after_merge = correct(test, plain(merged));

  std::cout << "inverted Fashion-MNIST test images, " << steps
            << " steps of 128 images\n"
            << std::left << std::setw(26) << "model" << std::setw(24)
            << "accuracy" << std::setw(12) << "trained"
            << "seconds\n"
            << std::setw(26) << "as trained in Python" << std::setw(24)
            << percent(before, total) << std::setw(12) << "-"
            << "-\n"
            << std::setw(26) << "LoRA (torchlora::jit)" << std::setw(24)
            << percent(lora_run.correct, total) << std::setw(12) << trainable
            << std::fixed << std::setprecision(1) << lora_run.seconds << "\n"
            << std::setw(26) << "full fine-tuning" << std::setw(24)
            << percent(full_run.correct, total) << std::setw(12) << all
            << full_run.seconds << "\n"
            << "merged model " << merged_path << ": "
            << percent(after_merge, total) << "\n";
  std::ofstream(fs::path(settings.out) / "metrics.txt")
      << "before=" << before << "\nlora=" << lora_run.correct
      << "\nfull=" << full_run.correct << "\nmerged=" << after_merge << "\n";
  // What the example claims.
  if (lora_run.correct <= before + total / 10) {
    std::cerr << "LoRA did not improve the accuracy by 10 points\n";
    return 1;
  }
  if (after_merge != lora_run.correct) {
    std::cerr << "the merged model's accuracy differs from LoRA's\n";
    return 1;
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  // TorchScript's CPU fuser compiles the fused backward of a trained module
  // with LLVM; Debian 13's LibTorch 2.6 hangs there at the third step (any
  // TorchScript module, with or without LoRA). Training runs as fast without.
  torch::jit::setTensorExprFuserEnabled(false);
  Settings settings;
  CLI::App app{"Fine-tunes a TorchScript model from Python with LoRA"};
  app.add_option("--model", settings.model, "the scripted model (train.py)");
  app.add_option("--data-dir", settings.data_dir, "the gzipped idx files");
  app.add_option("--out", settings.out, "folder for the adapter and model");
  app.add_option("--rank", settings.rank, "LoRA rank")
      ->check(CLI::PositiveNumber);
  app.add_option("--steps", settings.steps, "fine-tuning steps")
      ->check(CLI::PositiveNumber);
  app.add_flag("--quick", settings.quick, "a few seconds, for tests");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(settings);
  } catch (const std::exception& error) {
    std::cerr << "torchscript_finetune: " << error.what() << "\n";
    return 1;
  }
}
