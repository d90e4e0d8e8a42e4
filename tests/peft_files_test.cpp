// Adapter files written by the real Python peft (0.15.2 and 0.20.0), kept in
// tests/data/peft-<version>/<case>/ by `scripts/run-peft-interop.sh --keep`:
// each case's base weights and inputs (made by torchlora_interop export),
// peft's adapter folder after one training step (peft_adapter/), the
// outputs of peft's own reload of it (peft_output.safetensors) and a float64
// reference computed from the file with plain ops
// (reference_output.safetensors). The cases are those of
// tests/interop/interop_cases.h. These run everywhere, without Python.
#include "interop/interop_cases.h"
#include "test_support.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_peft_files_test {

namespace {

namespace fs = std::filesystem;
using torchlora_interop::Case;
using torchlora_test::expect_unchanged;
using torchlora_test::message_of;
using torchlora_test::snapshot;

/// A copy of the case `name` (by value: a reference into the static list,
/// bound to a call with a temporary argument, trips GCC 14's
/// -Wdangling-reference).
Case case_named(const std::string& name) {
  static const auto all = torchlora_interop::cases();
  for (const auto& test : all) {
    if (test.name == name) {
      return test;
    }
  }
  throw std::runtime_error("no case " + name);
}

std::string fixture(const std::string& version, const std::string& name) {
  return std::string(TORCHLORA_TEST_DATA_DIR) + "/peft-" + version + "/" + name;
}

/// A copy of a fixture's folder to change.
std::string copy_of(const std::string& folder, const std::string& name) {
  const auto copy =
      (fs::temp_directory_path() /
       ("torchlora_peft_files_" + name + "_" + std::to_string(::getpid())))
          .string();
  fs::remove_all(copy);
  fs::copy(folder, copy, fs::copy_options::recursive);
  return copy;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

void write_json(const std::string& path, const nlohmann::json& json) {
  std::ofstream(path) << json.dump(2);
}

class PeftFiles : public ::testing::TestWithParam<std::string> {};

TEST_P(PeftFiles, EveryCaseLoadsAndBehavesAsInPeft) {
  size_t checked = 0;
  for (const auto& test : torchlora_interop::cases()) {
    const auto folder = fixture(GetParam(), test.name);
    ASSERT_TRUE(fs::exists(folder)) << folder;
    ::testing::internal::CaptureStderr(); // the lora_only case warns
    const auto model =
        torchlora_interop::load_case(test, folder, "peft_adapter");
    ::testing::internal::GetCapturedStderr();
    const auto inputs =
        torchlora::safetensors::load(folder + "/input.safetensors");
    const auto peft =
        torchlora::safetensors::load(folder + "/peft_output.safetensors");
    const auto reference =
        torchlora::safetensors::load(folder + "/reference_output.safetensors");
    for (const auto& item :
         torchlora_interop::outputs_of(*model, test, inputs)) {
      EXPECT_LE(
          torchlora_interop::largest_difference(item.value(), peft[item.key()]),
          1e-9)
          << test.name << " " << item.key();
      EXPECT_LE(
          torchlora_interop::largest_difference(
              item.value(), reference[item.key()]),
          1e-9)
          << test.name << " " << item.key();
      ++checked;
    }
  }
  EXPECT_EQ(checked, 13u); // 11 cases, two with two adapters
}

INSTANTIATE_TEST_SUITE_P(
    Versions,
    PeftFiles,
    ::testing::Values("0.15.2", "0.20.0"),
    [](const auto& info) {
      auto name = "peft_" + info.param;
      std::replace(name.begin(), name.end(), '.', '_');
      return name;
    });

TEST(PeftFile, ALoraOnlyFileWithoutBiasesKeepsTheBaseBiasesAndSaysSo) {
  const auto test = case_named("bias_lora_only");
  const auto folder = fixture("0.20.0", test.name);
  const auto file = torchlora::safetensors::load(
      folder + "/peft_adapter/adapter_model.safetensors");
  ASSERT_EQ(file.find("base_model.model.fc1.base_layer.bias"), nullptr);
  ::testing::internal::CaptureStderr();
  const auto model = torchlora_interop::load_case(test, folder, "peft_adapter");
  const auto warnings = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(
      warnings.find(
          "torchlora: load_adapter: the file has bias = \"lora_only\" but no "
          "tensor for 1 bias(es) (\"fc1.base_layer.bias\"): peft's "
          "save_pretrained leaves them out. They keep the base model's "
          "values, as they do when peft reloads the file"),
      std::string::npos)
      << warnings;
  const auto base = torchlora::safetensors::load(folder + "/base.safetensors");
  EXPECT_TRUE(
      torch::equal(model->named_parameters()["fc1.bias"], base["fc1.bias"]));
  EXPECT_TRUE(model->named_parameters()["fc1.bias"].requires_grad());
}

TEST(PeftFile, ABiasAllFileWithModulesToSaveLoadsPeftsExtraKeys) {
  const auto test = case_named("rslora_bias_all_modules_to_save");
  const auto folder = fixture("0.20.0", test.name);
  const std::string prefix = "base_model.model.head.";
  const auto file = torchlora::safetensors::load(
      folder + "/peft_adapter/adapter_model.safetensors");
  ASSERT_NE(file.find(prefix + "modules_to_save.bias"), nullptr);
  ASSERT_NE(file.find(prefix + "original_module.bias"), nullptr);
  const auto model = torchlora_interop::load_case(test, folder, "peft_adapter");
  EXPECT_TRUE(torch::equal(
      model->named_parameters()["head.bias"], file[prefix + "bias"]));
  EXPECT_FALSE(torch::equal(
      file[prefix + "bias"], file[prefix + "original_module.bias"]));
}

TEST(PeftFile, ExtraKeysOfAModuleToSaveThatDisagreeAreRefused) {
  const auto test = case_named("rslora_bias_all_modules_to_save");
  const auto folder =
      copy_of(fixture("0.20.0", test.name), "modules_to_save_keys");
  const auto path = folder + "/peft_adapter/adapter_model.safetensors";
  const auto original = torchlora::safetensors::load(path);
  const std::string prefix = "base_model.model.head.";
  const auto rewrite = [&](const std::string& key, const torch::Tensor& t) {
    torchlora::safetensors::Tensors tensors;
    for (const auto& item : original) {
      tensors.insert(item.key(), item.key() == key ? t : item.value());
    }
    torchlora::safetensors::save(path, tensors);
  };
  const auto expect_refused = [&](const std::string& message) {
    auto model = test.make();
    model->to(torch::kFloat64);
    const auto before = snapshot(*model);
    try {
      torchlora::load_adapter(*model, folder + "/peft_adapter");
      ADD_FAILURE() << "no error";
    } catch (const c10::Error& error) {
      EXPECT_NE(message_of(error).find(message), std::string::npos)
          << message_of(error);
    }
    expect_unchanged(before, *model);
  };
  rewrite(
      prefix + "modules_to_save.bias",
      original[prefix + "modules_to_save.bias"] + 1);
  expect_refused(
      "torchlora: load_adapter: the file holds "
      "\"base_model.model.head.bias\" and "
      "\"base_model.model.head.modules_to_save.bias\" (the same tensor under "
      "two keys), and they differ");
  rewrite(prefix + "original_module.bias", torch::zeros({4}, torch::kFloat64));
  expect_refused(
      "torchlora: load_adapter: tensor "
      "\"base_model.model.head.original_module.bias\" has shape [4] in the "
      "file, but the module's own copy has [3]");
  fs::remove_all(folder);
}

TEST(PeftFile, AnAttentionsOutProjDeltaCountsTwiceAsInPeft) {
  const auto test = case_named("mixed");
  const auto folder = fixture("0.20.0", test.name);
  const auto file = torchlora::safetensors::load(
      folder + "/peft_adapter/adapter_model.safetensors");
  const auto b =
      file["base_model.model.attn.base_layer.out_proj.lora_B.weight"];
  ASSERT_GT(b.abs().max().item<double>(), 0.0);
  const auto model = torchlora_interop::load_case(test, folder, "peft_adapter");
  const auto loaded =
      model->named_parameters()["attn.out_proj.lora_B.default.weight"];
  EXPECT_TRUE(torch::equal(loaded, 2 * b));

  // Saved again, the file holds peft's B: peft doubles it back.
  const auto saved = copy_of(folder, "out_proj_saved");
  torchlora::save_adapter(*model, saved + "/again", test.adapters.front());
  const auto again =
      torchlora::safetensors::load(saved + "/again/adapter_model.safetensors");
  EXPECT_TRUE(torch::equal(
      again["base_model.model.attn.base_layer.out_proj.lora_B.weight"], b));
  EXPECT_TRUE(
      read_json(saved + "/again/adapter_config.json").contains("auto_mapping"));

  // A config with neither peft_version nor auto_mapping (older torchlora,
  // or by hand) counts the delta once.
  auto json = read_json(saved + "/peft_adapter/adapter_config.json");
  json.erase("peft_version");
  json.erase("auto_mapping");
  write_json(saved + "/peft_adapter/adapter_config.json", json);
  const auto once = torchlora_interop::load_case(test, saved, "peft_adapter");
  EXPECT_TRUE(torch::equal(
      once->named_parameters()["attn.out_proj.lora_B.default.weight"], b));

  // A peft newer than the newest checked: taken as doubling, with a warning.
  json["peft_version"] = "0.21.0";
  write_json(saved + "/peft_adapter/adapter_config.json", json);
  ::testing::internal::CaptureStderr();
  const auto newer = torchlora_interop::load_case(test, saved, "peft_adapter");
  const auto warnings = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(
      warnings.find(
          "was written by peft 0.21.0, newer than the newest release "
          "torchlora was checked against (0.20); a MultiheadAttention's "
          "out_proj delta is taken to count twice, as in peft up to 0.20 "
          "(huggingface/peft#3774)"),
      std::string::npos)
      << warnings;
  EXPECT_TRUE(torch::equal(
      newer->named_parameters()["attn.out_proj.lora_B.default.weight"], 2 * b));
  fs::remove_all(saved);
}

/// `folder`/peft_adapter's tensors, each passed through `change` (key,
/// tensor) -> (key, tensor), written back.
void rewrite_adapter(
    const std::string& folder,
    const std::function<std::pair<std::string, torch::Tensor>(
        const std::string&,
        const torch::Tensor&)>& change) {
  const auto path = folder + "/peft_adapter/adapter_model.safetensors";
  const auto original = torchlora::safetensors::load(path);
  torchlora::safetensors::Tensors tensors;
  for (const auto& item : original) {
    const auto [key, tensor] = change(item.key(), item.value());
    tensors.insert(key, tensor);
  }
  torchlora::safetensors::save(path, tensors);
}

TEST(PeftFile, TheOutProjDoublingHoldsForEveryKeyAndDtype) {
  const auto test = case_named("mixed");
  const std::string out_proj = "base_model.model.attn.base_layer.out_proj.";
  // An fp16 file into a float32 model: doubled in float32, no overflow.
  auto folder = copy_of(fixture("0.20.0", test.name), "out_proj_fp16");
  rewrite_adapter(folder, [&](const std::string& key, const torch::Tensor& t) {
    auto half = t.to(torch::kFloat16);
    if (key == out_proj + "lora_B.weight") {
      half.fill_(40000);
    }
    return std::make_pair(key, half);
  });
  auto model = test.make();
  torchlora::load_adapter(*model, folder + "/peft_adapter");
  const auto loaded =
      model->named_parameters()["attn.out_proj.lora_B.default.weight"];
  EXPECT_EQ(loaded.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(loaded, torch::full_like(loaded, 80000)));
  fs::remove_all(folder);

  // Under torchlora's plain key too: the config says how it counts.
  folder = copy_of(fixture("0.20.0", test.name), "out_proj_plain_key");
  const auto b = torchlora::safetensors::load(
      folder +
      "/peft_adapter/adapter_model.safetensors")[out_proj + "lora_B.weight"];
  rewrite_adapter(folder, [&](const std::string& key, const torch::Tensor& t) {
    auto renamed = key;
    if (key.rfind(out_proj, 0) == 0) {
      renamed = "base_model.model.attn.out_proj." + key.substr(out_proj.size());
    }
    return std::make_pair(renamed, t);
  });
  const auto plain = torchlora_interop::load_case(test, folder, "peft_adapter");
  EXPECT_TRUE(torch::equal(
      plain->named_parameters()["attn.out_proj.lora_B.default.weight"], 2 * b));
  fs::remove_all(folder);
}

TEST(PeftFile, ALoraOnlyFileWithAnAttentionLoads) {
  // peft's lora_only files hold no bias at all, attentions or not.
  const auto test = case_named("mixed");
  const auto folder = copy_of(fixture("0.20.0", test.name), "lora_only_attn");
  auto json = read_json(folder + "/peft_adapter/adapter_config.json");
  json["bias"] = "lora_only";
  write_json(folder + "/peft_adapter/adapter_config.json", json);
  ::testing::internal::CaptureStderr();
  const auto model = torchlora_interop::load_case(test, folder, "peft_adapter");
  const auto warnings = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(warnings.find("\"q_proj.base_layer.bias\""), std::string::npos)
      << warnings;
  const auto inputs =
      torchlora::safetensors::load(folder + "/input.safetensors");
  const auto peft =
      torchlora::safetensors::load(folder + "/peft_output.safetensors");
  EXPECT_LE(
      torchlora_interop::largest_difference(
          torchlora_interop::outputs_of(*model, test, inputs)["y_default"],
          peft["y_default"]),
      1e-9);
  fs::remove_all(folder);
}

TEST(PeftFile, AnOutProjAdaptedWithoutItsAttentionIsNamedInAWarning) {
  const auto test = case_named("mixed");
  auto model = test.make();
  torchlora::inject_lora(
      *model, torchlora::LoRAConfig(2).target_modules({"attn.out_proj"}));
  const auto dir = (fs::temp_directory_path() /
                    ("torchlora_out_proj_alone_" + std::to_string(::getpid())))
                       .string();
  ::testing::internal::CaptureStderr();
  torchlora::save_adapter(*model, dir);
  const auto warnings = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(
      warnings.find(
          "torchlora: save_adapter: 'attn.out_proj' carries adapter "
          "\"default\" but its attention 'attn' does not: peft's "
          "MultiheadAttention reads out_proj's weight directly, so peft "
          "ignores this adapter in its forward (it counts only once merged). "
          "Adapt the attention to carry it to peft"),
      std::string::npos)
      << warnings;
  fs::remove_all(dir);
}

TEST(PeftFile, TorchloraWritesTheConfigPeftWritesForTheSameSettings) {
  for (const auto& test : torchlora_interop::cases()) {
    const auto folder = fixture("0.20.0", test.name);
    auto model = test.make();
    model->to(torch::kFloat64);
    for (auto config : test.adapters) {
      torchlora::inject_lora(*model, config);
    }
    const auto out = copy_of(folder, "config_" + test.name) + "/ours";
    for (const auto& config : test.adapters) {
      torchlora::save_adapter(*model, out, config);
      const auto sub = config.adapter_name() == "default"
          ? std::string()
          : "/" + config.adapter_name();
      const auto ours = read_json(out + sub + "/adapter_config.json");
      const auto peft =
          read_json(folder + "/peft_adapter" + sub + "/adapter_config.json");
      for (const auto& [key, value] : ours.items()) {
        if (key == "init_lora_weights" || key == "auto_mapping") {
          continue; // not recorded by torchlora; peft names a Python class
        }
        ASSERT_TRUE(peft.contains(key)) << key;
        auto mine = value;
        auto theirs = peft[key];
        if (mine.is_array() && theirs.is_array()) {
          std::sort(mine.begin(), mine.end());
          std::sort(theirs.begin(), theirs.end());
        }
        EXPECT_EQ(mine, theirs) << test.name << " " << key;
      }
    }
    fs::remove_all(fs::path(out).parent_path());
  }
}

} // namespace

} // namespace torchlora_peft_files_test
