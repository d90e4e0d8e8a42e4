// Adapts a small Fashion-MNIST CNN to five new classes with LoRA on its
// convolutions.
//
//   build/default/examples/finetune_fashion [--rank 4] [--alpha 8]
//       [--epochs 3] [--per-class 1000] [--device cpu|cuda]
//       [--data-dir /usr/share/datasets/fashion-mnist]
//       [--out runs/finetune_fashion] [--seed 0] [--quick]
//
// 1. A CNN (two convolutions in a Sequential, a hidden Linear, a five-way
//    head) learns the first five classes: T-shirt/top, Trouser, Pullover,
//    Dress, Coat.
// 2. The same five outputs are then trained for the other five classes
//    (Sandal, Shirt, Sneaker, Bag, Ankle boot) from --per-class training
//    images each, three ways: the head alone; LoRA on both convolutions and
//    the hidden Linear through torchlora::inject_lora, with the head in
//    modules_to_save; and full fine-tuning. Each is measured on every test
//    image of the new classes.
// 3. It writes metrics.csv, accuracy.svg, the adapter in peft's format,
//    base_model.pt and full_model.pt under --out, and checks that the saved
//    adapter loads back into the base model with the same outputs and that
//    merging keeps the accuracy.
#include "finetune_fashion/fashion_mnist.h"
#include "finetune_words/report.h"

#include <torchlora/torchlora.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

/// The CNN, written as any LibTorch model. `fc` is a LoRALinear built from
/// LinearOptions: a plain Linear until inject_lora attaches an adapter, so
/// the typed member can be adapted (a typed torch::nn::Linear member could
/// not: its forward would keep calling the old layer).
struct FashionNetImpl : torch::nn::Module {
  explicit FashionNetImpl(int64_t classes) {
    features = register_module(
        "features",
        torch::nn::Sequential(
            torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 3).padding(1)),
            torch::nn::ReLU(),
            torch::nn::MaxPool2d(2),
            torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 3).padding(1)),
            torch::nn::ReLU(),
            torch::nn::MaxPool2d(2)));
    fc = register_module(
        "fc", torchlora::LoRALinear(torch::nn::LinearOptions(32 * 7 * 7, 64)));
    head = register_module("head", torch::nn::Linear(64, classes));
  }

  torch::Tensor forward(const torch::Tensor& images) {
    return head(torch::relu(fc(features->forward(images).flatten(1))));
  }

  torch::nn::Sequential features{nullptr};
  torchlora::LoRALinear fc{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(FashionNet);

constexpr int64_t kClasses = 5; // per task: the first five, then the others

struct Settings {
  int64_t rank = 4;
  double alpha = 8;
  int64_t epochs = 3;
  int64_t per_class = 1000;
  std::string device = "cpu";
  std::string data_dir = fashion::kDefaultDir;
  std::string out = "runs/finetune_fashion";
  int64_t seed = 0;
  bool quick = false;
  int64_t batch = 64;
  int64_t pretrain_epochs = 2;
  int64_t pretrain_per_class = 0; // 0: all 6000
  int64_t test_per_class = 0; // 0: all 1000
  double lora_lr = 3e-3;
  double head_lr = 3e-3;
  double full_lr = 1e-3;
};

/// One way of training and what it measured.
struct Run {
  std::string name;
  std::vector<std::pair<double, double>> accuracy; // (step, test accuracy)
  std::vector<std::pair<double, double>> loss; // (step, mean train loss)
  double seconds = 0; // training with data loading, evaluations left out
  int64_t trainable = 0;
  int64_t saved_bytes = 0;

  double final_accuracy() const {
    return accuracy.back().second;
  }
};

/// The share of `test` images that `model` labels right.
double accuracy_of(
    FashionNet& model,
    const fashion::Split& test,
    torch::Device device) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  int64_t correct = 0;
  const int64_t count = test.images.size(0);
  // Chunks of 256: larger ones run slower on the CPU (memory traffic).
  for (int64_t start = 0; start < count; start += 256) {
    const int64_t size = std::min<int64_t>(256, count - start);
    const auto images = test.images.narrow(0, start, size).to(device);
    const auto labels = test.labels.narrow(0, start, size).to(device);
    correct += (model(images).argmax(1) == labels).sum().item<int64_t>();
  }
  model->train(was_training);
  return static_cast<double>(correct) / static_cast<double>(count);
}

/// Trains the parameters of `model` that require grad with Adam, measuring
/// test accuracy `evaluations` times along the way.
Run train(
    const std::string& name,
    FashionNet& model,
    const fashion::Split& train_split,
    const fashion::Split& test,
    int64_t epochs,
    double learning_rate,
    int64_t batch,
    int64_t evaluations,
    torch::Device device) {
  Run run;
  run.name = name;
  run.trainable = torchlora::count_parameters(model).trainable;
  std::vector<torch::Tensor> trainable;
  for (const auto& parameter : model->parameters()) {
    if (parameter.requires_grad()) {
      trainable.push_back(parameter);
    }
  }
  torch::optim::Adam optimizer(
      trainable, torch::optim::AdamOptions(learning_rate));
  auto loader = torch::data::make_data_loader(
      fashion::Dataset(train_split).map(torch::data::transforms::Stack<>()),
      torch::data::DataLoaderOptions().batch_size(static_cast<size_t>(batch)));
  const int64_t examples = train_split.images.size(0);
  const int64_t total = epochs * ((examples + batch - 1) / batch);
  const int64_t every = std::max<int64_t>(1, total / evaluations);
  words::Progress progress(
      name, total, std::max<int64_t>(1, total / 5), "images");
  model->train();
  run.accuracy.emplace_back(0, accuracy_of(model, test, device));
  const auto started = std::chrono::steady_clock::now();
  double evaluating = 0;
  const auto evaluate = [&](int64_t step) {
    const auto start = std::chrono::steady_clock::now();
    run.accuracy.emplace_back(step, accuracy_of(model, test, device));
    evaluating +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
  };
  double loss_sum = 0;
  int64_t loss_count = 0;
  int64_t step = 0;
  for (int64_t epoch = 0; epoch < epochs; ++epoch) {
    for (auto& examples_batch : *loader) {
      const auto images = examples_batch.data.to(device);
      const auto labels = examples_batch.target.to(device);
      const auto loss =
          torch::nn::functional::cross_entropy(model(images), labels);
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      const double value = loss.item<double>();
      ++step;
      loss_sum += value;
      ++loss_count;
      progress.update(step, value, images.size(0));
      if (step % every == 0 || step == total) {
        run.loss.emplace_back(step, loss_sum / static_cast<double>(loss_count));
        evaluate(step);
        loss_sum = 0;
        loss_count = 0;
      }
    }
  }
  run.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
          .count() -
      evaluating;
  return run;
}

/// A model holding the base model's weights, saved at `checkpoint`.
FashionNet load_base(const std::string& checkpoint, torch::Device device) {
  FashionNet model(kClasses);
  torch::load(model, checkpoint, device);
  model->to(device);
  return model;
}

std::string human_bytes(int64_t bytes) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(1);
  if (bytes >= 1 << 20) {
    text << static_cast<double>(bytes) / (1 << 20) << " MiB";
  } else {
    text << static_cast<double>(bytes) / 1024 << " KiB";
  }
  return text.str();
}

/// Largest difference between the outputs of two models on `images`.
double largest_difference(
    FashionNet& a,
    FashionNet& b,
    const torch::Tensor& images) {
  torch::NoGradGuard no_grad;
  a->eval();
  b->eval();
  return (a(images) - b(images)).abs().max().item<double>();
}

int run_example(const Settings& settings) {
  const torch::Device device(settings.device);
  torch::manual_seed(static_cast<uint64_t>(settings.seed));
  const fs::path out(settings.out);
  fs::create_directories(out);

  const auto train_all = fashion::read_split(settings.data_dir, "train");
  const auto test_all = fashion::read_split(settings.data_dir, "t10k");
  const auto old_train = fashion::select_classes(
      train_all, 0, kClasses, settings.pretrain_per_class);
  const auto old_test =
      fashion::select_classes(test_all, 0, kClasses, settings.test_per_class);
  const auto new_train = fashion::select_classes(
      train_all, kClasses, kClasses, settings.per_class);
  const auto new_test = fashion::select_classes(
      test_all, kClasses, kClasses, settings.test_per_class);
  std::cout << "Fashion-MNIST from " << settings.data_dir << ": base task "
            << old_train.images.size(0) << " training images of classes 0-4, "
            << "new task " << new_train.images.size(0)
            << " training images of classes 5-9, " << new_test.images.size(0)
            << " test images of classes 5-9\n";
  const int64_t evaluations = settings.quick ? 4 : 8;

  // 1. The base model learns the first five classes.
  FashionNet base(kClasses);
  base->to(device);
  auto pretrain = train(
      "base",
      base,
      old_train,
      old_test,
      settings.pretrain_epochs,
      1e-3,
      settings.batch,
      evaluations,
      device);
  const auto checkpoint = (out / "base_model.pt").string();
  torch::save(base, checkpoint);
  const double base_old = pretrain.final_accuracy();
  const double base_new = accuracy_of(base, new_test, device);
  std::cout << std::fixed << std::setprecision(3) << "base model: accuracy "
            << base_old << " on classes 0-4, " << base_new
            << " on classes 5-9 (before adapting), " << std::setprecision(1)
            << pretrain.seconds << " s\n";

  // 2a. The head alone, everything else frozen.
  torch::manual_seed(static_cast<uint64_t>(settings.seed) + 1);
  auto head_model = load_base(checkpoint, device);
  for (auto& parameter : head_model->parameters()) {
    parameter.set_requires_grad(false);
  }
  for (auto& parameter : head_model->head->parameters()) {
    parameter.set_requires_grad(true);
  }
  auto head_only = train(
      "head only",
      head_model,
      new_train,
      new_test,
      settings.epochs,
      settings.head_lr,
      settings.batch,
      evaluations,
      device);

  // 2b. LoRA on the convolutions and the hidden Linear, the head trained
  // in full.
  torch::manual_seed(static_cast<uint64_t>(settings.seed) + 1);
  auto lora_model = load_base(checkpoint, device);
  const auto config = torchlora::LoRAConfig(settings.rank)
                          .alpha(settings.alpha)
                          .target_modules({"features.0", "features.3", "fc"})
                          .modules_to_save({"head"});
  const auto paths = torchlora::inject_lora(lora_model, config);
  std::cout << "LoRA: r = " << settings.rank
            << ", alpha = " << std::defaultfloat << settings.alpha << " on "
            << paths.size()
            << " layers (features.0, features.3: Conv2d; fc: Linear), head "
            << "trained in full\n";
  auto lora = train(
      "LoRA",
      lora_model,
      new_train,
      new_test,
      settings.epochs,
      settings.lora_lr,
      settings.batch,
      evaluations,
      device);
  const auto adapter_dir = out / "adapter";
  torchlora::save_adapter(*lora_model, adapter_dir.string(), config);
  lora.saved_bytes = static_cast<int64_t>(
      fs::file_size(adapter_dir / "adapter_model.safetensors"));

  // 2c. Full fine-tuning.
  torch::manual_seed(static_cast<uint64_t>(settings.seed) + 1);
  auto full_model = load_base(checkpoint, device);
  auto full = train(
      "full",
      full_model,
      new_train,
      new_test,
      settings.epochs,
      settings.full_lr,
      settings.batch,
      evaluations,
      device);
  torch::save(full_model, (out / "full_model.pt").string());
  full.saved_bytes = static_cast<int64_t>(fs::file_size(out / "full_model.pt"));

  // 3. The saved adapter reloads into the base model, and merging it in
  // keeps the accuracy.
  auto reloaded = load_base(checkpoint, device);
  torchlora::load_adapter(reloaded, adapter_dir.string());
  const auto probe = new_test.images.narrow(0, 0, 256).to(device);
  const double reload_difference =
      largest_difference(reloaded, lora_model, probe);
  torchlora::merge_and_unload(lora_model);
  const double merged_accuracy = accuracy_of(lora_model, new_test, device);

  // Files: metrics.csv and accuracy.svg.
  {
    std::ofstream csv(out / "metrics.csv");
    csv << "run,step,train_loss,test_accuracy\n";
    for (const Run* run : {&pretrain, &head_only, &lora, &full}) {
      for (const auto& [step, accuracy] : run->accuracy) {
        std::string loss;
        for (const auto& [loss_step, value] : run->loss) {
          if (loss_step == step) {
            loss = std::to_string(value);
          }
        }
        csv << run->name << "," << step << "," << loss << "," << accuracy
            << "\n";
      }
    }
  }
  std::vector<words::Curve> curves;
  curves.push_back({"head only", "#888888", true, head_only.accuracy});
  curves.push_back({"LoRA (torchlora)", "#d62728", false, lora.accuracy});
  curves.push_back({"full fine-tuning", "#1f77b4", true, full.accuracy});
  words::write_svg(
      (out / "accuracy.svg").string(),
      "Fashion-MNIST, five new classes: test accuracy",
      curves,
      "test accuracy (classes 5-9)");

  // The table.
  const auto base_counts = torchlora::count_parameters(base);
  std::cout << "\nTest accuracy on the " << new_test.images.size(0)
            << " test images of the new classes (5-9):\n"
            << std::left << std::setw(20) << "" << std::right << std::setw(9)
            << "accuracy" << std::setw(12) << "trainable" << std::setw(10)
            << "time" << std::setw(12) << "saved"
            << "\n";
  std::cout << std::left << std::setw(20) << "base (no training)" << std::right
            << std::fixed << std::setprecision(3) << std::setw(9) << base_new
            << std::setw(12) << 0 << std::setw(10) << "" << std::setw(12) << ""
            << "\n";
  for (const Run* run : {&head_only, &lora, &full}) {
    std::ostringstream seconds;
    seconds << std::fixed << std::setprecision(1) << run->seconds << " s";
    std::cout << std::left << std::setw(20) << run->name << std::right
              << std::fixed << std::setprecision(3) << std::setw(9)
              << run->final_accuracy() << std::setw(12) << run->trainable
              << std::setw(10) << seconds.str() << std::setw(12)
              << (run->saved_bytes > 0 ? human_bytes(run->saved_bytes) : "")
              << "\n";
  }
  std::cout << "The base model has " << base_counts.total
            << " parameters; LoRA trains " << std::setprecision(1)
            << 100.0 * static_cast<double>(lora.trainable) /
          static_cast<double>(base_counts.total)
            << "% as many (the head's " << (64 * kClasses + kClasses)
            << " included).\n"
            << "LoRA merged into the base: accuracy " << std::setprecision(3)
            << merged_accuracy << "; the saved adapter reloaded into the base "
            << "differs from the trained model by " << std::scientific
            << std::setprecision(1) << reload_difference << "\n"
            << "Written to " << out.string()
            << ": metrics.csv accuracy.svg adapter/ base_model.pt "
               "full_model.pt\n";

  // What this example claims, checked.
  bool ok = true;
  if (!(lora.final_accuracy() > base_new + 0.2)) {
    std::cerr << "finetune_fashion: LoRA's accuracy " << lora.final_accuracy()
              << " is not clearly above the base's " << base_new << "\n";
    ok = false;
  }
  // Bit for bit on CPU (the same tensors, the same ops); CUDA may pick
  // other kernels for the two models.
  const double reload_tolerance = device.is_cuda() ? 1e-5 : 0.0;
  if (!(reload_difference <= reload_tolerance)) {
    std::cerr << "finetune_fashion: the reloaded adapter differs by "
              << reload_difference << "\n";
    ok = false;
  }
  if (std::abs(merged_accuracy - lora.final_accuracy()) > 0.002) {
    std::cerr << "finetune_fashion: merging changed the accuracy from "
              << lora.final_accuracy() << " to " << merged_accuracy << "\n";
    ok = false;
  }
  return ok ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  Settings settings;
  CLI::App app{"Adapts a Fashion-MNIST CNN to five new classes with LoRA"};
  app.add_option("--rank", settings.rank, "LoRA rank")
      ->check(CLI::PositiveNumber);
  app.add_option("--alpha", settings.alpha, "LoRA alpha");
  app.add_option("--epochs", settings.epochs, "epochs on the new classes")
      ->check(CLI::PositiveNumber);
  app.add_option(
         "--per-class",
         settings.per_class,
         "training images of each new class (at most 6000)")
      ->check(CLI::Range(1, 6000));
  app.add_option("--device", settings.device, "cpu or cuda");
  app.add_option("--data-dir", settings.data_dir, "the gzipped idx files");
  app.add_option("--out", settings.out, "folder for the outputs");
  app.add_option("--seed", settings.seed, "random seed");
  app.add_flag("--quick", settings.quick, "a few seconds, for tests");
  CLI11_PARSE(app, argc, argv);
  if (settings.quick) {
    settings.per_class = std::min<int64_t>(settings.per_class, 200);
    settings.epochs = std::min<int64_t>(settings.epochs, 2);
    settings.pretrain_epochs = 1;
    settings.pretrain_per_class = 300;
    settings.test_per_class = 200;
  }
  try {
    return run_example(settings);
  } catch (const std::exception& error) {
    std::cerr << "finetune_fashion: " << error.what() << "\n";
    return 1;
  }
}
