// Adapts a character-level English word model to French with LoRA, and
// shows where the adapters should go.
//
//   scripts/run-example.sh            (builds and runs this, as in the README)
//   build/default/examples/finetune_words [--rank 8] [--alpha 16]
//       [--all-linear-rank 4] [--targets q_proj,v_proj|all-linear|...]
//       [--modules-to-save head] [--epochs 3] [--device cpu|cuda]
//       [--data-dir /usr/share/dict] [--out runs/finetune_words] [--seed 0]
//       [--width 128] [--layers 2] [--model own|torch-encoder] [--quick]
//       [--distributed]
//   scripts/launch.sh 2 build/default/examples/finetune_words --distributed
//
// 1. A small transformer learns English words (Debian's wamerican list) and
//    is saved with torch::save; later runs load that checkpoint.
// 2. French words (Debian's wfrench list) are split into training and
//    held-out sets. On the held-out words, in bits per character, it compares
//    the base model, LoRA through torchlora::inject_lora on q and v (r = 8)
//    and on every Linear but the output layer ("all-linear", r = 4), and full
//    fine-tuning of a copy. --targets trains one placement of your own.
// 3. It writes metrics.csv, loss.svg, the adapters in peft's format, the
//    merged all-linear model and words sampled before and after, under --out.
// With --model torch-encoder the blocks are LibTorch's own
// torch::nn::TransformerEncoder, and the placements are its q/k/v and
// out_proj ("self_attn") and then those plus the feed-forward layers
// ("linear1", "linear2"). torchlora binds those layers instead of swapping
// them, so every forward runs inside a torchlora::AdaptedWeights scope (one
// per training step); for the other model the scope does nothing.
// With --distributed, started by scripts/launch.sh or torchrun, rank 0
// trains (or loads) the base model and sends it to the others
// (torchlora::distributed::broadcast_state), then every process trains on
// its share of each batch (torchlora::distributed::AdapterSync averages
// the gradients). Rank 0 alone reads --out, reports and writes the files:
// on several machines, each needs the program and the word lists only.
#include "finetune_words/model.h"
#include "finetune_words/report.h"
#include "finetune_words/words.h"

#include <torchlora/distributed.h>
#include <torchlora/torchlora.h>

#include <CLI/CLI.hpp>

#include <sched.h>

#include <array>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
namespace dist = torchlora::distributed;
using words::Batch;
using words::CharTransformer;
using words::Dataset;

namespace {

struct Settings {
  int64_t rank = 8;
  double alpha = 16;
  std::string targets; // empty: the default comparison of two placements
  int64_t all_linear_rank = 4; // measured: r = 4 is the smallest rank with 90%
                               // of full fine-tuning's gain
  std::string modules_to_save; // comma-separated, trained in full with LoRA
  double epochs = 3;
  std::string device = "cpu";
  std::string data_dir = "/usr/share/dict";
  std::string out;
  int64_t seed = 0;
  bool quick = false;
  double lora_lr = 1e-2;
  double full_lr = 1e-3;
  int64_t pretrain_steps = 0; // 0: the plan's
  int64_t width = 0; // 0: the plan's
  int64_t layers = 0; // 0: the plan's
  bool distributed = false; // data-parallel over the launcher's processes
  std::string model = "own"; // or "torch-encoder"
};

/// Sizes of one run; --quick shrinks everything to a few seconds.
struct Plan {
  words::ModelOptions model;
  size_t english_train;
  size_t french_train;
  size_t heldout;
  int64_t pretrain_steps;
  size_t batch;
  int64_t evaluations;
};

Plan plan_for(const Settings& settings, int64_t vocabulary) {
  Plan plan;
  plan.model.vocabulary = vocabulary;
  plan.model.body = settings.model == "torch-encoder"
      ? words::Body::kTorchEncoder
      : words::Body::kOwnBlocks;
  if (settings.quick) {
    plan.model.width = 64;
    plan.model.layers = 1;
    plan.english_train = 6000;
    plan.french_train = 1500;
    plan.heldout = 300;
    plan.pretrain_steps = 120;
    plan.batch = 64;
    plan.evaluations = 4;
  } else {
    plan.english_train = 100000;
    plan.french_train = 12000;
    plan.heldout = 2000;
    plan.pretrain_steps = 1500;
    plan.batch = 96;
    plan.evaluations = 10;
  }
  if (settings.pretrain_steps > 0) {
    plan.pretrain_steps = settings.pretrain_steps;
  }
  if (settings.width > 0) {
    plan.model.width = settings.width;
  }
  if (settings.layers > 0) {
    plan.model.layers = settings.layers;
  }
  return plan;
}

constexpr double kLn2 = 0.6931471805599453;

/// The loss of this rank's share of `batch` such that the mean over the
/// ranks is the whole batch's cross-entropy per character (each share is
/// weighted by the whole batch's character count, not its own), so that
/// averaged gradients are exactly the whole batch's. Also this share's
/// own mean, in nats, for the progress line.
std::pair<torch::Tensor, double> shard_loss(
    CharTransformer& model,
    const Batch& batch,
    const dist::World& world) {
  const int64_t whole_characters =
      (batch.targets != -100).sum().item<int64_t>();
  const auto inputs = dist::shard_rows(batch.inputs, world);
  const auto targets = dist::shard_rows(batch.targets, world);
  const auto logits = model(inputs);
  const auto sum = torch::nn::functional::cross_entropy(
      logits.view({-1, logits.size(-1)}),
      targets.view({-1}),
      torch::nn::functional::CrossEntropyFuncOptions()
          .ignore_index(-100)
          .reduction(torch::kSum));
  const int64_t own =
      std::max<int64_t>(1, (targets != -100).sum().item<int64_t>());
  const auto loss = sum *
      (static_cast<double>(world.world_size()) /
       static_cast<double>(std::max<int64_t>(1, whole_characters)));
  return {loss, sum.item<double>() / static_cast<double>(own)};
}

/// What a held-out character is: the end of the word, a letter outside
/// ASCII (é, ç, ...), or any other character.
enum Kind : int64_t { kEndOfWord = 0, kAccented = 1, kOther = 2, kKinds = 3 };

/// The kind of each character id, as a tensor to index with targets.
torch::Tensor kinds_of(const words::Vocabulary& vocabulary) {
  auto kinds = torch::full({vocabulary.size()}, int64_t{kOther}, torch::kLong);
  kinds[0] = int64_t{kEndOfWord};
  for (int64_t id = 1; id < vocabulary.size(); ++id) {
    if (vocabulary.character(id).size() > 1) {
      kinds[id] = int64_t{kAccented};
    }
  }
  return kinds;
}

/// Held-out words in batches, with the kind of each character id.
struct HeldOut {
  std::vector<Batch> batches;
  torch::Tensor kinds; // from kinds_of
};

/// Bits per character split by the kind of character predicted: the parts
/// add up to the total; `share` is each kind's part of the characters.
struct BitsByKind {
  double total = 0;
  std::array<double, kKinds> part{};
  std::array<double, kKinds> share{};
};

/// Bits per character of `model` over the held-out words, by kind.
BitsByKind bits_by_kind(CharTransformer& model, const HeldOut& heldout) {
  torch::NoGradGuard no_grad;
  model->eval();
  // The adapted weights, computed once for all the batches (no graph under
  // NoGradGuard: the merged weights, bit for bit).
  torchlora::AdaptedWeights adapted(*model);
  auto bits = torch::zeros({kKinds}, torch::kDouble);
  auto counts = torch::zeros({kKinds}, torch::kDouble);
  for (const auto& batch : heldout.batches) {
    const auto logits = model(batch.inputs);
    const auto targets = batch.targets.view({-1});
    const auto predicted = targets != -100;
    const auto nats = torch::nn::functional::cross_entropy(
        logits.view({-1, logits.size(-1)}),
        targets,
        torch::nn::functional::CrossEntropyFuncOptions()
            .ignore_index(-100)
            .reduction(torch::kNone));
    const auto kind =
        heldout.kinds.index_select(0, targets.masked_select(predicted).cpu());
    bits.index_add_(
        0, kind, nats.masked_select(predicted).cpu().to(torch::kDouble));
    counts.index_add_(0, kind, torch::ones_like(kind, torch::kDouble));
  }
  model->train();
  const auto characters = counts.sum().item<double>();
  BitsByKind result;
  for (int64_t k = 0; k < kKinds; ++k) {
    const auto i = static_cast<size_t>(k);
    result.part[i] = bits[k].item<double>() / characters / kLn2;
    result.share[i] = counts[k].item<double>() / characters;
    result.total += result.part[i];
  }
  return result;
}

/// Bits per character of `model` over the held-out words.
double bits_per_character(CharTransformer& model, const HeldOut& heldout) {
  return bits_by_kind(model, heldout).total;
}

std::vector<torch::Tensor> trainable(const CharTransformer& model) {
  std::vector<torch::Tensor> parameters;
  for (const auto& parameter : model->parameters()) {
    if (parameter.requires_grad()) {
      parameters.push_back(parameter);
    }
  }
  return parameters;
}

/// Bytes of what training keeps besides activations: parameters, and for
/// the trainable ones their gradients and Adam's two moments.
int64_t training_state_bytes(const CharTransformer& model) {
  int64_t bytes = 0;
  for (const auto& parameter : model->parameters()) {
    const auto size =
        parameter.numel() * static_cast<int64_t>(parameter.element_size());
    bytes += parameter.requires_grad() ? 4 * size : size;
  }
  return bytes;
}

struct RunResult {
  std::string name;
  std::string key; // in metrics.csv
  std::string label; // in the table and the plot
  std::string short_label; // as a column heading
  double heldout_bpc = 0;
  int64_t trainable = 0;
  int64_t total = 0;
  int64_t state_bytes = 0;
  double seconds = 0;
  int64_t saved_bytes = 0;
  int64_t steps = 0;
  int64_t communicated_bytes_per_step = 0;
  words::Curve train_curve;
  words::Curve heldout_curve;
};

/// Trains the trainable parameters of `model` on `train` for `steps`
/// steps, measuring held-out bits per character along the way.
RunResult fine_tune(
    const std::string& name,
    CharTransformer& model,
    const Dataset& train,
    const HeldOut& heldout,
    int64_t steps,
    double learning_rate,
    const Plan& plan,
    std::mt19937& random,
    torch::Device device,
    const dist::World& world = dist::World()) {
  RunResult result;
  result.name = name;
  result.label = name;
  result.short_label = name;
  result.steps = steps;
  const auto counts = torchlora::count_parameters(model);
  result.trainable = counts.trainable;
  result.total = counts.total;
  result.state_bytes = training_state_bytes(model);
  // Every rank starts from rank 0's values; gradients are averaged.
  dist::AdapterSync sync(model, world);
  result.communicated_bytes_per_step = sync.bytes_per_step();
  torch::optim::AdamW optimizer(
      trainable(model),
      torch::optim::AdamWOptions(learning_rate).weight_decay(0));
  const int64_t every = std::max<int64_t>(1, steps / plan.evaluations);
  // Rank 0 measures the held-out loss (the others wait at the next step).
  const auto measure = [&] {
    return world.is_main() ? bits_per_character(model, heldout) : 0.0;
  };
  result.heldout_curve.points.emplace_back(0, measure());
  words::Progress progress(name, steps, every);
  double window = 0;
  int64_t window_count = 0;
  std::vector<Batch> batches;
  size_t next = 0;
  for (int64_t step = 1; step <= steps; ++step) {
    if (next == batches.size()) {
      batches = train.batches(plan.batch, random, device);
      next = 0;
    }
    auto batch = batches[next++];
    // The ranks share every batch: a short last batch loses the rows that
    // do not split evenly (the same on every rank).
    const int64_t rows =
        batch.inputs.size(0) - batch.inputs.size(0) % world.world_size();
    if (rows < batch.inputs.size(0)) {
      batch.inputs = batch.inputs.narrow(0, 0, rows);
      batch.targets = batch.targets.narrow(0, 0, rows);
      batch.words = rows;
    }
    // Warm up over the first 5% of the steps, then decay (cosine) to 10%.
    const double progress_share =
        static_cast<double>(step) / static_cast<double>(steps);
    const double factor = progress_share < 0.05
        ? progress_share / 0.05
        : 0.1 + 0.45 * (1 + std::cos(M_PI * (progress_share - 0.05) / 0.95));
    for (auto& group : optimizer.param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options())
          .lr(learning_rate * factor);
    }
    double own_nats = 0;
    {
      // A fresh scope for every step: its weights hold this step's adapters.
      torchlora::AdaptedWeights adapted(*model);
      optimizer.zero_grad();
      auto [loss, nats] = shard_loss(model, batch, world);
      own_nats = nats;
      loss.backward();
      sync.all_reduce_gradients();
      optimizer.step();
    }
    const double bits = own_nats / kLn2;
    window += bits;
    ++window_count;
    progress.update(step, bits, batch.words);
    // `evaluations` evenly spaced measurements, the last at the last step.
    if (step * plan.evaluations / steps !=
        (step - 1) * plan.evaluations / steps) {
      result.train_curve.points.emplace_back(
          step, window / static_cast<double>(window_count));
      result.heldout_curve.points.emplace_back(step, measure());
      window = 0;
      window_count = 0;
    }
  }
  result.seconds = progress.elapsed();
  result.heldout_bpc = result.heldout_curve.points.back().second;
  return result;
}

/// Samples `count` words from `model`, one character at a time.
std::vector<std::string> sample_words(
    CharTransformer& model,
    const words::Vocabulary& vocabulary,
    int64_t count,
    int64_t max_length,
    torch::Device device) {
  torch::NoGradGuard no_grad;
  model->eval();
  torchlora::AdaptedWeights adapted(*model);
  std::vector<std::string> result;
  for (int64_t i = 0; i < count; ++i) {
    auto ids = torch::zeros(
        {1, 1}, torch::TensorOptions().dtype(torch::kLong).device(device));
    std::string word;
    for (int64_t t = 0; t + 1 < max_length; ++t) {
      const auto logits = model(ids).select(1, -1) / 0.8;
      const auto next = torch::multinomial(torch::softmax(logits, -1), 1);
      const auto id = next.item<int64_t>();
      if (id == 0) {
        break;
      }
      word += vocabulary.character(id);
      ids = torch::cat({ids, next}, 1);
    }
    result.push_back(word);
  }
  model->train();
  return result;
}

std::vector<std::string> split_targets(const std::string& text) {
  std::vector<std::string> targets;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    if (!item.empty()) {
      targets.push_back(item);
    }
  }
  return targets;
}

std::string megabytes(int64_t bytes) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(bytes < 100000 ? 3 : 2)
       << static_cast<double>(bytes) / 1e6 << " MB";
  return text.str();
}

/// Where the held-out bits go: the table's bits per character split by
/// the kind of character predicted, one column per model.
void print_bits_by_kind(
    const std::vector<std::pair<std::string, BitsByKind>>& models) {
  const std::array<const char*, kKinds> names = {
      "end of word", "accented letter", "other character"};
  std::cout << "bits/char by what is predicted:\n"
            << std::left << std::setw(18) << "  predicted" << std::right
            << std::setw(8) << "share";
  for (const auto& [label, bits] : models) {
    std::cout << std::setw(10) << label;
  }
  std::cout << "\n";
  for (size_t k = 0; k < names.size(); ++k) {
    std::cout << "  " << std::left << std::setw(16) << names[k] << std::right
              << std::fixed << std::setprecision(1) << std::setw(7)
              << 100 * models.front().second.share[k] << "%"
              << std::setprecision(3);
    for (const auto& [label, bits] : models) {
      std::cout << std::setw(10) << bits.part[k];
    }
    std::cout << "\n";
  }
}

/// The bytes of the weights (codes and scales for quantized ones) of the
/// model's Linear layers but the output head: what NF4 shrinks.
int64_t linear_weight_bytes(torch::nn::Module& model) {
  int64_t bytes = 0;
  for (const auto& item : model.named_parameters()) {
    const auto& key = item.key();
    if (key.rfind("head.", 0) == 0 || key.find("lora_") != std::string::npos ||
        key.find("embed") != std::string::npos ||
        key.find("position") != std::string::npos ||
        key.find("norm") != std::string::npos ||
        key.find("bias") != std::string::npos) {
      continue;
    }
    bytes += item.value().numel() *
        static_cast<int64_t>(item.value().element_size());
  }
  return bytes;
}

/// A LoRA run of the comparison: where the adapters go and their size.
struct Placement {
  std::string key; // in metrics.csv
  std::string label; // in the table and the plot
  std::string short_label; // as a column heading
  std::string targets; // comma-separated, or all-linear
  int64_t rank;
  double alpha;
  std::string folder; // of the saved adapter, under --out
  bool dora = false; // DoRA's magnitudes on top
  torchlora::LoRAInit init = torchlora::LoRAInit::kaiming_uniform;
  bool nf4 = false; // the base's Linear layers quantized to NF4 first
};

/// The default comparison: the original LoRA paper's q and v, every Linear
/// but the output layer (QLoRA's and peft's advice) with DoRA and with PiSSA
/// at the same rank, then with plain LoRA (last: the one merged); for
/// LibTorch's
/// encoder, its attention (q/k/v and out_proj), then that and its
/// feed-forward layers. Or the one placement that --targets names.
std::vector<Placement> placements_for(const Settings& settings) {
  if (!settings.targets.empty()) {
    return {
        {"lora",
         "LoRA",
         "LoRA",
         settings.targets,
         settings.rank,
         settings.alpha,
         "adapter"}};
  }
  if (settings.model == "torch-encoder") {
    return {
        {"lora_attn",
         "LoRA self_attn",
         "attn",
         "self_attn",
         settings.rank,
         settings.alpha,
         "adapter_attn"},
        {"lora_attn_ffn",
         "LoRA attn+ffn",
         "attn+ffn",
         "self_attn,linear1,linear2",
         settings.all_linear_rank,
         2.0 * static_cast<double>(settings.all_linear_rank),
         "adapter_attn_ffn"}};
  }
  const double all_linear_alpha =
      2.0 * static_cast<double>(settings.all_linear_rank);
  return {
      {"lora_q_v",
       "LoRA q,v",
       "q,v",
       "q_proj,v_proj",
       settings.rank,
       settings.alpha,
       "adapter_q_v"},
      {"dora_all_linear",
       "DoRA all-linear",
       "dora",
       "all-linear",
       settings.all_linear_rank,
       all_linear_alpha,
       "adapter_dora_all_linear",
       /*dora=*/true},
      {"pissa_all_linear",
       "PiSSA all-linear",
       "pissa",
       "all-linear",
       settings.all_linear_rank,
       all_linear_alpha,
       "adapter_pissa_all_linear",
       /*dora=*/false,
       torchlora::LoRAInit::pissa},
      {"nf4_all_linear",
       "NF4 base + LoRA all-linear",
       "nf4",
       "all-linear",
       settings.all_linear_rank,
       all_linear_alpha,
       "adapter_nf4_all_linear",
       /*dora=*/false,
       torchlora::LoRAInit::kaiming_uniform,
       /*nf4=*/true},
      {"lora_all_linear",
       "LoRA all-linear",
       "all-lin",
       "all-linear",
       settings.all_linear_rank,
       2.0 * static_cast<double>(settings.all_linear_rank),
       "adapter_all_linear"}};
}

int run(const Settings& settings) {
  const torch::Device device(settings.device);
  dist::World world;
  if (settings.distributed) {
    // Long enough for rank 0 to train the base model while the others wait.
    world = dist::init_from_env(
        dist::InitOptions().timeout(std::chrono::minutes(15)));
    // One process per core share: torchrun's OMP_NUM_THREADS=1 in spirit.
    // The cores are those this process may run on (taskset, cgroups).
    const char* local = std::getenv("LOCAL_WORLD_SIZE");
    const int local_processes = local ? std::max(1, std::atoi(local)) : 1;
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    const int cores = sched_getaffinity(0, sizeof(allowed), &allowed) == 0
        ? CPU_COUNT(&allowed)
        : static_cast<int>(std::thread::hardware_concurrency());
    torch::set_num_threads(std::max(1, cores / local_processes));
    if (!world.is_main()) {
      // Rank 0 reports; the others print nothing (errors go to stderr).
      std::cout.setstate(std::ios::badbit);
    }
    std::cout << "distributed: " << world.world_size()
              << " processes, each on its share of every batch, "
              << torch::get_num_threads() << " thread(s) each\n";
  }
  torch::manual_seed(static_cast<uint64_t>(settings.seed));
  std::mt19937 random(static_cast<unsigned>(settings.seed));
  const auto out = fs::path(settings.out);
  if (world.is_main()) {
    fs::create_directories(out);
  }

  // Data: every character of both lists is in the vocabulary, so that the
  // base model and the adapted one share it.
  auto english = words::read_list(
      settings.data_dir + "/american-english", "wamerican", 24);
  auto french = words::read_list(settings.data_dir + "/french", "wfrench", 24);
  const words::Vocabulary vocabulary({&english, &french});
  const auto plan = plan_for(settings, vocabulary.size());
  std::shuffle(english.begin(), english.end(), random);
  std::shuffle(french.begin(), french.end(), random);
  const auto take =
      [](const std::vector<std::string>& list, size_t from, size_t count) {
        const auto end = std::min(list.size(), from + count);
        return std::vector<std::string>(
            list.begin() + static_cast<std::ptrdiff_t>(from),
            list.begin() + static_cast<std::ptrdiff_t>(end));
      };
  const Dataset english_train(
      take(english, plan.heldout, plan.english_train), vocabulary);
  const Dataset french_train(
      take(french, plan.heldout, plan.french_train), vocabulary);
  const auto kinds = kinds_of(vocabulary);
  const HeldOut french_heldout{
      Dataset(take(french, 0, plan.heldout), vocabulary)
          .batches(512, random, device),
      kinds};
  std::cout << "data: " << english_train.size()
            << " English words for the base model, " << french_train.size()
            << " French words to adapt, " << plan.heldout
            << " held-out French words; " << vocabulary.size()
            << " characters\n";

  // 1. The base model: trained once, then loaded from its checkpoint. Only
  // rank 0 reads or writes files: the others get its base model through
  // the process group, so that no machine needs another's folder.
  const auto checkpoint = (out / "base_model.pt").string();
  CharTransformer base(plan.model);
  base->to(device);
  bool loaded = !world.is_main();
  if (world.is_main() && fs::exists(checkpoint)) {
    try {
      torch::load(base, checkpoint, device);
      loaded = true;
      std::cout << "base model: loaded " << checkpoint << "\n";
    } catch (const c10::Error&) {
      std::cout << "base model: " << checkpoint
                << " does not fit these settings; training again\n";
      // The failed load may have filled some tensors: start afresh, from
      // the same initial values as a run without a checkpoint.
      torch::manual_seed(static_cast<uint64_t>(settings.seed));
      base = CharTransformer(plan.model);
      base->to(device);
    }
  }
  if (!loaded) {
    std::cout << "base model: training on English words (saved to "
              << checkpoint << ")\n";
    const HeldOut english_heldout{
        Dataset(take(english, 0, plan.heldout), vocabulary)
            .batches(512, random, device),
        kinds};
    auto result = fine_tune(
        "pretrain",
        base,
        english_train,
        english_heldout,
        plan.pretrain_steps,
        3e-3,
        plan,
        random,
        device);
    std::cout << "base model: " << std::fixed << std::setprecision(3)
              << result.heldout_bpc << " bits/char on held-out English words, "
              << std::setprecision(1) << result.seconds << " s\n";
    torch::save(base, checkpoint);
  }
  // The others wait here (up to the 15-minute timeout) while rank 0 trains.
  dist::broadcast_state(base, world);
  // Every model below starts from this copy, kept in memory.
  std::ostringstream base_stream;
  torch::save(base, base_stream);
  const std::string base_state = base_stream.str();
  const auto load_base = [&](CharTransformer& model) {
    std::istringstream in(base_state);
    torch::load(model, in, device);
  };
  const auto base_bits = bits_by_kind(base, french_heldout);
  const double base_bpc = base_bits.total;
  // The same fine-tuning whether the base model was trained or loaded.
  torch::manual_seed(static_cast<uint64_t>(settings.seed) + 100);
  random.seed(static_cast<unsigned>(settings.seed) + 100);
  const int64_t fine_tune_steps = std::max<int64_t>(
      1,
      static_cast<int64_t>(std::ceil(
          settings.epochs * static_cast<double>(french_train.size()) /
          static_cast<double>(plan.batch))));

  // 2. LoRA, one model per placement: load the checkpoint, inject, train.
  std::vector<RunResult> runs;
  std::vector<CharTransformer> lora_models;
  for (const auto& placement : placements_for(settings)) {
    CharTransformer lora_model(plan.model);
    lora_model->to(device);
    load_base(lora_model);
    if (placement.nf4) {
      // QLoRA's recipe: the frozen Linear layers (but the output head) in
      // NF4, then LoRA over them.
      const auto float_bytes = linear_weight_bytes(*lora_model);
      const auto quantized = torchlora::quantize(lora_model);
      std::cout << "NF4 base: " << quantized.size()
                << " Linear layers quantized, their weights "
                << linear_weight_bytes(*lora_model) / 1024
                << " KiB (float32: " << float_bytes / 1024 << " KiB)\n";
    }
    const auto config =
        torchlora::LoRAConfig(placement.rank)
            .alpha(placement.alpha)
            .use_dora(placement.dora)
            .init(placement.init)
            .target_modules(split_targets(placement.targets))
            .modules_to_save(split_targets(settings.modules_to_save));
    const auto paths = torchlora::inject_lora(lora_model, config);
    std::cout << std::defaultfloat << std::setprecision(6) << placement.label
              << ": r = " << placement.rank << ", alpha = " << placement.alpha
              << " on " << paths.size() << " layers (" << placement.targets
              << ")";
    if (!settings.modules_to_save.empty()) {
      std::cout << ", trained in full: " << settings.modules_to_save;
    }
    std::cout << "\n";
    auto result = fine_tune(
        placement.label,
        lora_model,
        french_train,
        french_heldout,
        fine_tune_steps,
        settings.lora_lr,
        plan,
        random,
        device,
        world);
    result.key = placement.key;
    result.label = placement.label;
    result.short_label = placement.short_label;
    // Only rank 0 writes files. The config carries modules_to_save, which
    // the adapter file must hold.
    if (world.is_main()) {
      const auto folder = out / placement.folder;
      torchlora::save_adapter(*lora_model, folder.string(), config);
      result.saved_bytes = static_cast<int64_t>(
          fs::file_size(folder / "adapter_model.safetensors"));
    }
    runs.push_back(std::move(result));
    lora_models.push_back(lora_model);
  }

  // 3. Full fine-tuning of a copy of the base model, for reference.
  CharTransformer full_model(plan.model);
  full_model->to(device);
  load_base(full_model);
  runs.push_back(fine_tune(
      "full",
      full_model,
      french_train,
      french_heldout,
      fine_tune_steps,
      settings.full_lr,
      plan,
      random,
      device,
      world));
  runs.back().key = "full";
  runs.back().label = "full fine-tune";
  runs.back().short_label = "full";
  if (!world.is_main()) {
    return 0; // rank 0 evaluates, samples and writes the rest
  }
  torch::save(full_model, (out / "full_model.pt").string());
  runs.back().saved_bytes =
      static_cast<int64_t>(fs::file_size(out / "full_model.pt"));

  // Where the bits go, per model; then samples and the merged model (a
  // plain model with the last placement's adapter folded in).
  std::vector<std::pair<std::string, BitsByKind>> split{{"base", base_bits}};
  for (size_t i = 0; i < lora_models.size(); ++i) {
    split.emplace_back(
        runs[i].short_label, bits_by_kind(lora_models[i], french_heldout));
  }
  split.emplace_back("full", bits_by_kind(full_model, french_heldout));
  torch::manual_seed(static_cast<uint64_t>(settings.seed) + 1);
  const auto base_samples =
      sample_words(base, vocabulary, 8, plan.model.max_length, device);
  auto& merged_model = lora_models.back();
  torchlora::merge_and_unload(merged_model);
  torch::manual_seed(static_cast<uint64_t>(settings.seed) + 1);
  const auto adapted_samples =
      sample_words(merged_model, vocabulary, 8, plan.model.max_length, device);
  torch::save(merged_model, (out / "merged_model.pt").string());
  const double merged_bpc = bits_per_character(merged_model, french_heldout);

  // Files: metrics.csv, loss.svg, samples.txt.
  {
    std::ofstream csv(out / "metrics.csv");
    csv << "run,step,train_bits_per_char,heldout_bits_per_char\n";
    for (const auto& result : runs) {
      for (const auto& [step, bits] : result.heldout_curve.points) {
        std::string train_bits;
        for (const auto& [train_step, train_value] :
             result.train_curve.points) {
          if (train_step == step) {
            train_bits = std::to_string(train_value);
          }
        }
        csv << result.key << "," << static_cast<int64_t>(step) << ","
            << train_bits << "," << bits << "\n";
      }
    }
  }
  const std::array<const char*, 4> colors = {
      "#d62728", "#9467bd", "#8c564b", "#2ca02c"};
  std::vector<words::Curve> curves;
  for (size_t i = 0; i < runs.size(); ++i) {
    auto& result = runs[i];
    const bool is_full = i + 1 == runs.size();
    result.train_curve.label = result.label + ", training";
    result.heldout_curve.label = result.label + ", held-out";
    result.train_curve.color = result.heldout_curve.color =
        is_full ? "#1f77b4" : colors[i % colors.size()];
    result.train_curve.dashed = true;
    curves.push_back(result.train_curve);
    curves.push_back(result.heldout_curve);
  }
  words::write_svg(
      (out / "loss.svg").string(),
      "English word model adapted to French: bits per character",
      curves);
  {
    std::ofstream samples(out / "samples.txt");
    samples << "base model (English):";
    for (const auto& word : base_samples) {
      samples << " " << word;
    }
    samples << "\n" << runs[runs.size() - 2].label << ", merged (French):";
    for (const auto& word : adapted_samples) {
      samples << " " << word;
    }
    samples << "\n";
  }

  // The table.
  const double full_gain = base_bpc - runs.back().heldout_bpc;
  int label_width = 18;
  for (const auto& result : runs) {
    label_width =
        std::max(label_width, static_cast<int>(result.label.size()) + 2);
  }
  std::cout << "\nheld-out French words, bits per character (lower is better)\n"
            << std::left << std::setw(label_width) << "model" << std::right
            << std::setw(10) << "bits/char" << std::setw(8) << "gain"
            << std::setw(20) << "trainable params" << std::setw(14)
            << "train state" << std::setw(9) << "time" << std::setw(12)
            << "saved size"
            << "\n";
  std::cout << std::left << std::setw(label_width) << "base" << std::right
            << std::fixed << std::setprecision(3) << std::setw(10) << base_bpc
            << std::setw(8) << "-" << std::setw(20) << "-" << std::setw(14)
            << "-" << std::setw(9) << "-" << std::setw(12)
            << megabytes(static_cast<int64_t>(fs::file_size(checkpoint)))
            << "\n";
  for (const auto& result : runs) {
    std::ostringstream share;
    share << result.trainable << " (" << std::fixed << std::setprecision(2)
          << 100.0 * static_cast<double>(result.trainable) /
            static_cast<double>(result.total)
          << "%)";
    std::ostringstream seconds;
    seconds << std::fixed << std::setprecision(1) << result.seconds << " s";
    std::ostringstream gain;
    gain << std::fixed << std::setprecision(0)
         << 100.0 * (base_bpc - result.heldout_bpc) / full_gain << "%";
    std::cout << std::left << std::setw(label_width) << result.label
              << std::right << std::setw(10) << std::setprecision(3)
              << result.heldout_bpc << std::setw(8) << gain.str()
              << std::setw(20) << share.str() << std::setw(14)
              << megabytes(result.state_bytes) << std::setw(9) << seconds.str()
              << std::setw(12) << megabytes(result.saved_bytes) << "\n";
  }
  std::cout << "gain: share of full fine-tuning's gain over the base (base "
               "bits - model bits)\n"
            << "merged " << runs[runs.size() - 2].label
            << " model: " << std::setprecision(3) << merged_bpc
            << " bits/char\n";
  if (world.is_distributed()) {
    std::cout << "data-parallel over " << world.world_size()
              << " processes, gradients all-reduced per step:";
    for (const auto& result : runs) {
      std::cout << " " << result.short_label << " " << std::setprecision(1)
                << static_cast<double>(result.communicated_bytes_per_step) /
              1024.0
                << " KiB,";
    }
    std::cout << " time per step:";
    for (const auto& result : runs) {
      std::cout << " " << result.short_label << " " << std::setprecision(1)
                << 1000.0 * result.seconds / static_cast<double>(result.steps)
                << " ms";
    }
    std::cout << "\n";
  }
  print_bits_by_kind(split);
  std::cout << "samples, base:    ";
  for (const auto& word : base_samples) {
    std::cout << " " << word;
  }
  std::cout << "\nsamples, adapted: ";
  for (const auto& word : adapted_samples) {
    std::cout << " " << word;
  }
  std::cout << "\nfiles in " << out.string()
            << ": metrics.csv loss.svg samples.txt";
  for (const auto& placement : placements_for(settings)) {
    std::cout << " " << placement.folder << "/";
  }
  std::cout << " merged_model.pt full_model.pt base_model.pt\n";

  // What the table claims, checked (the exit status says whether it holds):
  // each adapter file, loaded into the base checkpoint, scores what its
  // trained model scored; the merged model scores what it scored unmerged
  // (one rounding per weight apart), and merged_model.pt scores the same.
  bool holds = true;
  const auto check =
      [&](const std::string& what, double got, double want, double tolerance) {
        const bool ok = std::abs(got - want) <= tolerance;
        std::cout << "check: " << what << ": " << std::setprecision(6) << got
                  << " against " << want << (ok ? " (ok)" : " (FAILED)")
                  << "\n";
        holds = holds && ok;
      };
  const auto placements = placements_for(settings);
  for (size_t i = 0; i < placements.size(); ++i) {
    CharTransformer reloaded(plan.model);
    reloaded->to(device);
    torch::load(reloaded, checkpoint, device);
    if (placements[i].nf4) {
      torchlora::quantize(reloaded); // the same codes as in training
    }
    torchlora::load_adapter(*reloaded, (out / placements[i].folder).string());
    check(
        placements[i].folder + " loaded into the base",
        bits_per_character(reloaded, french_heldout),
        runs[i].heldout_bpc,
        1e-5);
  }
  check(
      "merged " + runs[runs.size() - 2].label + " against unmerged",
      merged_bpc,
      runs[runs.size() - 2].heldout_bpc,
      5e-4);
  CharTransformer merged_reloaded(plan.model);
  merged_reloaded->to(device);
  torch::load(merged_reloaded, (out / "merged_model.pt").string(), device);
  check(
      "merged_model.pt loaded",
      bits_per_character(merged_reloaded, french_heldout),
      merged_bpc,
      1e-9);
  return holds ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  Settings settings;
  CLI::App app{
      "Adapts an English character-level word model to French with LoRA (torchlora example)."};
  app.add_option(
         "--rank",
         settings.rank,
         "LoRA rank r on q,v (torch-encoder: self_attn; or --targets)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option(
         "--alpha",
         settings.alpha,
         "LoRA alpha on q,v (torch-encoder: self_attn; or --targets)")
      ->capture_default_str();
  app.add_option(
         "--all-linear-rank",
         settings.all_linear_rank,
         "LoRA rank r on every Linear but the head (torch-encoder: "
         "self_attn,linear1,linear2; alpha = 2 r)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option(
      "--targets",
      settings.targets,
      "one placement instead of the default two: comma-separated module "
      "names to adapt, or all-linear");
  app.add_option(
      "--modules-to-save",
      settings.modules_to_save,
      "comma-separated modules trained in full next to the adapters");
  app.add_option(
         "--epochs", settings.epochs, "passes over the French training words")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--device", settings.device, "cpu or cuda")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option(
         "--data-dir",
         settings.data_dir,
         "folder with american-english and french")
      ->capture_default_str();
  app.add_option(
      "--out",
      settings.out,
      "output folder (default runs/finetune_words, with _torch_encoder for that "
      "model and _quick for --quick)");
  app.add_option("--seed", settings.seed, "random seed")->capture_default_str();
  app.add_option("--lora-lr", settings.lora_lr, "learning rate of the LoRA run")
      ->capture_default_str();
  app.add_option(
         "--full-lr", settings.full_lr, "learning rate of full fine-tuning")
      ->capture_default_str();
  app.add_option(
         "--pretrain-steps",
         settings.pretrain_steps,
         "steps of base training (0: default)")
      ->capture_default_str();
  app.add_option(
         "--width",
         settings.width,
         "model width, a multiple of the 4 heads (0: 128, --quick 64)")
      ->capture_default_str()
      ->check(CLI::Range(0, 4096));
  app.add_option(
         "--layers", settings.layers, "transformer blocks (0: 2, --quick 1)")
      ->capture_default_str()
      ->check(CLI::Range(0, 64));
  app.add_option(
         "--model",
         settings.model,
         "the blocks: own (declared in the example) or torch-encoder "
         "(torch::nn::TransformerEncoder)")
      ->capture_default_str()
      ->check(CLI::IsMember({"own", "torch-encoder"}));
  app.add_flag(
      "--distributed",
      settings.distributed,
      "data-parallel: run under scripts/launch.sh N or torchrun");
  app.add_flag(
      "--quick",
      settings.quick,
      "a tiny run of a few seconds (the CTest test)");
  CLI11_PARSE(app, argc, argv);
  if (settings.out.empty()) {
    settings.out = std::string("runs/finetune_words") +
        (settings.model == "torch-encoder" ? "_torch_encoder" : "") +
        (settings.quick ? "_quick" : "");
  }
  if (settings.width % words::ModelOptions{}.heads != 0) {
    std::cerr << "finetune_words: --width must be a multiple of "
              << words::ModelOptions{}.heads << " (the attention heads), got "
              << settings.width << "\n";
    return 1;
  }
  if (settings.device == "cuda" && !torch::cuda::is_available()) {
    std::cerr
        << "finetune_words: --device cuda, but no CUDA device is available\n";
    return 1;
  }
  try {
    return run(settings);
  } catch (const std::exception& error) {
    std::cerr << "finetune_words: " << error.what() << "\n";
    return 1;
  }
}
