// Tests of the safetensors reader and writer (include/torchlora/safetensors.h).
#include "test_support.h"

#include <torchlora/safetensors.h>

#include <nlohmann/json.hpp>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <grp.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_safetensors_test {

namespace st = torchlora::safetensors;

namespace {

class SafetensorsTest : public torchlora_test::Seeded {};

/// Bytes from a list of byte values.
std::string bytes_of(std::initializer_list<int> values) {
  std::string bytes;
  for (const int value : values) {
    bytes.push_back(static_cast<char>(value));
  }
  return bytes;
}

/// A file made by hand: the 8-byte length of `header` (little-endian, by
/// hand), `header`, then `data`.
std::string file_of(const std::string& header, const std::string& data) {
  std::string file;
  uint64_t length = header.size();
  for (int i = 0; i < 8; ++i) {
    file.push_back(static_cast<char>(length & 0xff));
    length >>= 8;
  }
  return file + header + data;
}

st::Tensors read(const std::string& file) {
  return st::load_bytes(file.data(), file.size());
}

/// The message of the error `read(file)` throws ("" if none).
std::string error_of(const std::string& file) {
  try {
    read(file);
  } catch (const c10::Error& error) {
    return torchlora_test::message_of(error);
  }
  return "";
}

std::string write_file(const std::string& name, const std::string& bytes) {
  const auto path = ::testing::TempDir() + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

/// A valid file with one F32 tensor "a" of shape [2] = {1.5, -2}.
const std::string& small_file() {
  static const std::string file = file_of(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
      bytes_of({0x00, 0x00, 0xC0, 0x3F, 0x00, 0x00, 0x00, 0xC0}));
  return file;
}

} // namespace

TEST_F(SafetensorsTest, ReadsAFileWrittenByHandInEverySupportedDtype) {
  const std::string header =
      R"({"__metadata__":{"format":"pt","note":"by hand"},)"
      R"("f64":{"dtype":"F64","shape":[2],"data_offsets":[0,16]},)"
      R"("f32":{"dtype":"F32","shape":[2],"data_offsets":[16,24]},)"
      R"("f16":{"dtype":"F16","shape":[2],"data_offsets":[24,28]},)"
      R"("bf16":{"dtype":"BF16","shape":[2],"data_offsets":[28,32]},)"
      R"("i64":{"dtype":"I64","shape":[2],"data_offsets":[32,48]},)"
      R"("i32":{"dtype":"I32","shape":[2],"data_offsets":[48,56]},)"
      R"("i16":{"dtype":"I16","shape":[2],"data_offsets":[56,60]},)"
      R"("i8":{"dtype":"I8","shape":[2],"data_offsets":[60,62]},)"
      R"("u8":{"dtype":"U8","shape":[1,2],"data_offsets":[62,64]},)"
      R"("bool":{"dtype":"BOOL","shape":[2],"data_offsets":[64,66]},)"
      R"("empty":{"dtype":"F32","shape":[0,3],"data_offsets":[66,66]}})";
  const std::string data =
      bytes_of(
          {0, 0, 0, 0, 0, 0, 0xF8, 0x3F, 0, 0, 0, 0, 0, 0, 0, 0xC0}) + // 1.5,
                                                                       // -2
      bytes_of({0, 0, 0xC0, 0x3F, 0, 0, 0, 0xC0}) + // 1.5f, -2.0f
      bytes_of({0x00, 0x3E, 0x00, 0xC0}) + // half 1.5, -2
      bytes_of({0xC0, 0x3F, 0x00, 0xC0}) + // bfloat16 1.5, -2
      bytes_of(
          {1,
           0,
           0,
           0,
           0,
           0,
           0,
           0,
           0xFE,
           0xFF,
           0xFF,
           0xFF,
           0xFF,
           0xFF,
           0xFF,
           0xFF}) + // 1, -2
      bytes_of({2, 1, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF}) + // 258, -1
      bytes_of({2, 1, 0xFF, 0xFF}) + // 258, -1
      bytes_of({5, 0xFD}) + // 5, -3
      bytes_of({200, 7}) + // 200, 7
      bytes_of({1, 0}); // true, false
  const auto file = file_of(header, data);
  st::Metadata metadata;
  const auto tensors = st::load_bytes(file.data(), file.size(), &metadata);

  EXPECT_EQ(metadata, (st::Metadata{{"format", "pt"}, {"note", "by hand"}}));
  EXPECT_EQ(
      tensors.keys(),
      (std::vector<std::string>{
          "f64",
          "f32",
          "f16",
          "bf16",
          "i64",
          "i32",
          "i16",
          "i8",
          "u8",
          "bool",
          "empty"}));
  auto floats = [](torch::Dtype dtype) {
    return torch::tensor({1.5, -2.0}).to(dtype);
  };
  EXPECT_TRUE(torch::equal(tensors["f64"], floats(torch::kFloat64)));
  EXPECT_TRUE(torch::equal(tensors["f32"], floats(torch::kFloat32)));
  EXPECT_TRUE(torch::equal(tensors["f16"], floats(torch::kFloat16)));
  EXPECT_TRUE(torch::equal(tensors["bf16"], floats(torch::kBFloat16)));
  EXPECT_TRUE(
      torch::equal(tensors["i64"], torch::tensor({1, -2}, torch::kInt64)));
  EXPECT_TRUE(
      torch::equal(tensors["i32"], torch::tensor({258, -1}, torch::kInt32)));
  EXPECT_TRUE(
      torch::equal(tensors["i16"], torch::tensor({258, -1}, torch::kInt16)));
  EXPECT_TRUE(
      torch::equal(tensors["i8"], torch::tensor({5, -3}, torch::kInt8)));
  EXPECT_TRUE(
      torch::equal(tensors["u8"], torch::tensor({{200, 7}}, torch::kUInt8)));
  EXPECT_TRUE(torch::equal(tensors["bool"], torch::tensor({true, false})));
  EXPECT_EQ(tensors["empty"].sizes(), (c10::IntArrayRef{0, 3}));
}

TEST_F(SafetensorsTest, TensorsOwnTheirMemory) {
  auto file = small_file();
  const auto tensors = read(file);
  file.assign(file.size(), '\0');
  EXPECT_TRUE(torch::equal(tensors["a"], torch::tensor({1.5f, -2.0f})));
}

TEST_F(SafetensorsTest, TheWritersBytesFollowTheFormat) {
  st::Tensors tensors;
  tensors.insert("weight", torch::randn({3, 5}));
  tensors.insert("half", torch::randn({7}).to(torch::kFloat16));
  tensors.insert("steps", torch::tensor({4, 5, 6}, torch::kInt64));
  tensors.insert("scalar", torch::tensor(2.5, torch::kFloat64));
  tensors.insert(
      "strided", torch::arange(12, torch::kFloat32).view({3, 4}).t());
  const auto file = st::save_bytes(tensors, {{"format", "pt"}});

  // An independent parse: length by hand, JSON by nlohmann, bytes compared.
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) {
    length = (length << 8) | static_cast<uint8_t>(file[i]);
  }
  ASSERT_LE(8 + length, file.size());
  EXPECT_EQ((8 + length) % 8, 0u) << "the data block starts 8-byte aligned";
  const auto header = nlohmann::json::parse(file.substr(8, length));
  EXPECT_EQ(header["__metadata__"], nlohmann::json({{"format", "pt"}}));
  const auto data = file.substr(8 + length);
  uint64_t covered = 0;
  const std::vector<std::pair<std::string, std::string>> dtypes = {
      {"weight", "F32"},
      {"half", "F16"},
      {"steps", "I64"},
      {"scalar", "F64"},
      {"strided", "F32"}};
  for (const auto& [name, dtype] : dtypes) {
    const auto& entry = header[name];
    EXPECT_EQ(entry["dtype"], dtype) << name;
    const auto& tensor = tensors[name];
    EXPECT_EQ(entry["shape"].get<std::vector<int64_t>>(), tensor.sizes().vec())
        << name;
    const auto begin = entry["data_offsets"][0].get<uint64_t>();
    const auto end = entry["data_offsets"][1].get<uint64_t>();
    const auto contiguous = tensor.contiguous();
    ASSERT_EQ(end - begin, contiguous.numel() * contiguous.element_size())
        << name;
    EXPECT_EQ(
        data.substr(begin, end - begin),
        std::string(
            static_cast<const char*>(contiguous.data_ptr()), end - begin))
        << name;
    covered += end - begin;
  }
  EXPECT_EQ(covered, data.size());
  EXPECT_EQ(header.size(), dtypes.size() + 1);
}

TEST_F(SafetensorsTest, SaveAndLoadRoundTripInEveryDtype) {
  st::Tensors tensors;
  for (const auto dtype :
       {torch::kFloat64,
        torch::kFloat32,
        torch::kFloat16,
        torch::kBFloat16,
        torch::kInt64,
        torch::kInt32,
        torch::kInt16,
        torch::kInt8,
        torch::kUInt8,
        torch::kBool}) {
    tensors.insert(
        std::string("t_") + c10::toString(dtype),
        (torch::randn({4, 3}) * 50).to(dtype));
  }
  tensors.insert("empty", torch::zeros({0}));
  const auto path = ::testing::TempDir() + "/nested/dir/round_trip.safetensors";
  std::filesystem::remove_all(::testing::TempDir() + "/nested");
  st::save(path, tensors, {{"format", "pt"}, {"k", "v"}});
  st::Metadata metadata;
  const auto loaded = st::load(path, &metadata);
  EXPECT_EQ(metadata, (st::Metadata{{"format", "pt"}, {"k", "v"}}));
  ASSERT_EQ(loaded.keys(), tensors.keys());
  for (const auto& item : tensors) {
    EXPECT_TRUE(torch::equal(loaded[item.key()], item.value())) << item.key();
    EXPECT_EQ(loaded[item.key()].scalar_type(), item.value().scalar_type())
        << item.key();
  }
  for (const auto& entry : std::filesystem::directory_iterator(
           ::testing::TempDir() + "/nested/dir")) {
    EXPECT_EQ(entry.path().filename(), "round_trip.safetensors")
        << "a temporary file was left";
  }
}

// ---------------------------------------------------------------- bad files

TEST_F(SafetensorsTest, AnEmptyFileIsAnError) {
  EXPECT_NE(
      error_of("").find(
          "is not a valid safetensors file: the file has 0 bytes, fewer than the 8"),
      std::string::npos)
      << error_of("");
  const auto path = write_file("empty.safetensors", "");
  EXPECT_TORCHLORA_ERROR(
      st::load(path), "empty.safetensors' is not a valid safetensors file");
}

TEST_F(SafetensorsTest, ATruncatedFileIsAnError) {
  const auto& file = small_file();
  EXPECT_NE(
      error_of(file.substr(0, file.size() - 3))
          .find("tensor \"a\" ends at byte 8 of a data block of 5 bytes"),
      std::string::npos);
  EXPECT_NE(
      error_of(file.substr(0, 12)).find("runs past the end of the file"),
      std::string::npos);
  EXPECT_NE(
      error_of(file.substr(0, 5)).find("fewer than the 8"), std::string::npos);
}

TEST_F(
    SafetensorsTest,
    HeaderLengthsPastTheEndOrNearTwoToTheSixtyFourAreErrors) {
  for (const uint64_t length :
       {uint64_t{1000},
        uint64_t{0xFFFFFFFFFFFFFFF8ull},
        uint64_t{0xFFFFFFFFFFFFFFFFull},
        uint64_t{0x8000000000000000ull}}) {
    std::string file;
    for (int i = 0; i < 8; ++i) {
      file.push_back(static_cast<char>((length >> (8 * i)) & 0xff));
    }
    file += R"({"a":1})";
    EXPECT_NE(
        error_of(file).find(
            "the header length " + std::to_string(length) +
            " runs past the end"),
        std::string::npos)
        << error_of(file);
  }
}

TEST_F(SafetensorsTest, EachMalformedHeaderGivesItsError) {
  const std::string eight = std::string(8, '\0');
  const std::vector<std::pair<std::string, std::string>> cases = {
      {file_of("{not json", ""), "the header is not valid JSON"},
      {file_of("[1, 2]", ""), "must be a JSON object starting with '{'"},
      {file_of("{\"a\xff\":1}", ""), "the header is not valid JSON"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
           std::string(4, '\0')),
       "tensor \"a\" ends at byte 8 of a data block of 4 bytes"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
       "tensor \"a\" has 8 bytes between its offsets, but its dtype and shape need 12"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
           R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
           eight),
       "overlaps the tensor before it"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
       "bytes 0 to 4 of the data block belong to no tensor (a hole before \"a\")"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight),
       "the data block has 8 bytes but the tensors cover 4"},
      {file_of(
           R"({"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})",
           "x"),
       "tensor \"a\" has an unsupported dtype \"F8_E4M3\""},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", ""),
       "a dimension of \"a\" must be an unsigned integer, got -1"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,0]}})", ""),
       "must be an unsigned integer, got 2.5"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}})",
           ""),
       "the shape of tensor \"a\" overflows 64 bits"},
      {file_of(
           R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})",
           ""),
       "the byte size of \"a\" overflows 64 bits"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", eight),
       "tensor \"a\" ends (4) before it begins (8)"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551616]}})",
           ""),
       "the end offset of \"a\" must be an unsigned integer"},
      {file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", ""),
       "the data_offsets of \"a\" must be [begin, end], got [0]"},
      {file_of(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", ""),
       "entry \"a\" has no \"dtype\""},
      {file_of(R"({"a":[1,2]})", ""),
       "entry \"a\" must be an object, got [1,2]"},
      {file_of(R"({"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", ""),
       "the dtype of \"a\" must be a string, got 7"},
      {file_of(R"({"a":{"dtype":"F32","shape":3,"data_offsets":[0,4]}})", ""),
       "the shape of \"a\" must be an array, got 3"},
      {file_of(R"({"__metadata__":{"k":1}})", ""),
       "metadata \"k\" must be a string, got 1"},
      {file_of(R"({"__metadata__":[1]})", ""),
       "__metadata__ must be an object, got [1]"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
           R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
           eight),
       "the header names \"a\" twice"},
      {file_of("", ""), "must be a JSON object starting with '{'"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}})",
           ""),
       "the shape of tensor \"a\" is too large for int64 indexing"},
      {file_of(
           R"({"a":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,0]}})",
           ""),
       "the shape of tensor \"a\" overflows 64 bits"},
      {file_of(
           std::string(R"({"a":{"dtype":"U8","shape":[)") +
               [] {
                 std::string dims = "1";
                 for (int i = 0; i < 64; ++i) {
                   dims += ",1";
                 }
                 return dims;
               }() +
               R"(],"data_offsets":[0,1]}})",
           "x"),
       "tensor \"a\" has 65 dimensions, more than 64"},
      {file_of(
           R"({"a":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})",
           bytes_of({1, 7, 0})),
       "BOOL tensor \"a\" holds the byte 7; only 0 and 1 are booleans"},
      {file_of(
           "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') +
               "}",
           ""),
       "the header nests JSON deeper than 8 levels"},
  };
  for (const auto& [file, expected] : cases) {
    const auto message = error_of(file);
    EXPECT_EQ(
        message.rfind(
            "torchlora: the given bytes is not a valid safetensors file: ", 0),
        0u)
        << message;
    EXPECT_NE(message.find(expected), std::string::npos)
        << "expected: " << expected << "\ngot: " << message;
  }
}

TEST_F(SafetensorsTest, AMissingFileIsAnError) {
  EXPECT_TORCHLORA_ERROR(
      st::load(::testing::TempDir() + "/no/such.safetensors"),
      "cannot read safetensors file '");
}

TEST_F(SafetensorsTest, PathsThatAreNotReadableRegularFilesAreErrors) {
  namespace fs = std::filesystem;
  const auto dir = ::testing::TempDir() + "/safetensors_not_files";
  fs::remove_all(dir);
  fs::create_directories(dir);
  EXPECT_TORCHLORA_ERROR(
      st::load(dir),
      "cannot read safetensors file '" + dir +
          "': it is a directory, not a regular file");
  const auto fifo = dir + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_TORCHLORA_ERROR(
      st::load(fifo),
      "cannot read safetensors file '" + fifo +
          "': it is a FIFO, not a regular file");
  EXPECT_TORCHLORA_ERROR(
      st::load("/dev/null"),
      "'/dev/null': it is a character device, not a regular file");
  // A path through a regular file.
  const auto file = dir + "/file.safetensors";
  st::save(file, st::Tensors{});
  EXPECT_TORCHLORA_ERROR(
      st::load(file + "/below"),
      "cannot read safetensors file '" + file + "/below': Not a directory");
}

/// Exits 0 when loading `file` fails with a message holding `expected`,
/// else 1 after printing what happened (run in a death test's child).
[[noreturn]] static void exit_on_load_error(
    const std::string& file,
    const std::string& expected) {
  try {
    torchlora::safetensors::load(file);
    std::fprintf(stderr, "loaded '%s' without an error\n", file.c_str());
  } catch (const c10::Error& error) {
    const auto message = torchlora_test::message_of(error);
    if (message.find(expected) != std::string::npos) {
      std::_Exit(0);
    }
    std::fprintf(stderr, "unexpected error: %s\n", message.c_str());
  }
  std::_Exit(1);
}

TEST_F(SafetensorsTest, AnUnreadableFileIsAnError) {
  namespace fs = std::filesystem;
  // A folder everybody may enter, so that only the file's own mode denies.
  // A fixed name: the death test's child (a new process running this test
  // again) must use the same folder.
  const auto folder = ::testing::TempDir() + "torchlora_unreadable";
  fs::remove_all(folder);
  fs::create_directories(folder);
  fs::permissions(
      folder,
      fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
          fs::perms::others_read | fs::perms::others_exec);
  const auto file = folder + "/unreadable.safetensors";
  st::save(file, st::Tensors{});
  fs::permissions(file, fs::perms::none);
  const auto expected =
      "cannot read safetensors file '" + file + "': Permission denied";
  if (geteuid() != 0) {
    EXPECT_TORCHLORA_ERROR(st::load(file), expected);
  } else {
    // Root reads whatever the mode says: the load runs in a child process
    // that gives up root for the user "nobody" first.
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    const uid_t nobody = 65534;
    EXPECT_EXIT(
        {
          if (setgroups(0, nullptr) != 0 || setgid(nobody) != 0 ||
              setuid(nobody) != 0 || geteuid() != nobody) {
            std::fprintf(
                stderr,
                "could not give up root for uid %d\n",
                static_cast<int>(nobody));
            std::_Exit(2);
          }
          exit_on_load_error(file, expected);
        },
        ::testing::ExitedWithCode(0),
        "");
  }
  fs::remove_all(folder);
}

TEST_F(SafetensorsTest, AFileTooLargeForMemoryIsAnError_Optional) {
  namespace fs = std::filesystem;
  const auto file = ::testing::TempDir() + "/huge.safetensors";
  { std::ofstream create(file); }
  std::error_code error;
  fs::resize_file(file, uintmax_t{1} << 43, error); // 8 TiB, sparse
  if (error) {
    fs::remove(file);
    GTEST_SKIP() << "no sparse 8 TiB file here: " << error.message();
  }
  EXPECT_TORCHLORA_ERROR(
      st::load(file),
      "cannot read safetensors file '" + file +
          "': not enough memory for its 8796093022208 bytes");
  fs::remove(file);
}

TEST_F(SafetensorsTest, AFileThatChangesSizeWhileReadIsAnError) {
  // Shrank: fewer bytes than the file system said when it was opened.
  std::istringstream shrunk(std::string(10, 'x'));
  EXPECT_TORCHLORA_ERROR(
      torchlora::detail::read_expected_bytes(
          shrunk, 16, "f.safetensors", "safetensors file"),
      "safetensors file 'f.safetensors' changed size while it was read (16 "
      "bytes when opened, 10 read)");
  // Grew: more bytes than that. Files under /proc say they hold 0 bytes.
  std::istringstream grown(std::string(20, 'x'));
  EXPECT_TORCHLORA_ERROR(
      torchlora::detail::read_expected_bytes(
          grown, 16, "f.safetensors", "safetensors file"),
      "changed size while it was read (16 bytes when opened, more read)");
  EXPECT_TORCHLORA_ERROR(
      st::load("/proc/self/status"),
      "cannot read safetensors file '/proc/self/status': it says it holds 0 "
      "bytes but has content (a file under /proc or /sys?)");
  std::istringstream exact(std::string(16, 'x'));
  EXPECT_EQ(
      torchlora::detail::read_expected_bytes(exact, 16, "f", "file").size(),
      16u);
}

// ---------------------------------------------------------------- writing

TEST_F(SafetensorsTest, UnsupportedTensorsAreErrors) {
  st::Tensors complex;
  complex.insert("z", torch::randn({2}, torch::kComplexFloat));
  EXPECT_TORCHLORA_ERROR(
      st::save_bytes(complex),
      "safetensors cannot store tensor \"z\" of dtype ComplexFloat");
  st::Tensors reserved;
  reserved.insert("__metadata__", torch::zeros({1}));
  EXPECT_TORCHLORA_ERROR(
      st::save_bytes(reserved), "a tensor cannot be named \"__metadata__\"");
  st::Tensors undefined;
  undefined.insert("u", torch::Tensor());
  EXPECT_TORCHLORA_ERROR(
      st::save_bytes(undefined), "cannot store tensor \"u\": it is undefined");
}

TEST_F(SafetensorsTest, AFolderThatCannotBeCreatedIsAnError) {
  const auto blocker = write_file("a_plain_file", "x");
  EXPECT_TORCHLORA_ERROR(
      st::save(blocker + "/sub/out.safetensors", st::Tensors()),
      "cannot create folder '");
}

TEST_F(SafetensorsTest, AShortWriteIsAnErrorAndLeavesTheGoodFileInPlace) {
  const auto dir = ::testing::TempDir() + "/short_write";
  std::filesystem::remove_all(dir);
  const auto path = dir + "/good.safetensors";
  st::Tensors good;
  good.insert("a", torch::ones({3}));
  st::save(path, good);
  st::Tensors big;
  big.insert("b", torch::ones({1 << 16}));
  // Files of this process may not grow past 64 KiB: the write falls short.
  struct rlimit old_limit {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit limit = old_limit;
  limit.rlim_cur = 1 << 16;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
  std::string message;
  try {
    st::save(path, big);
  } catch (const c10::Error& error) {
    message = torchlora_test::message_of(error);
  }
  setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_NE(
      message.find(
          "writing '" + path + "' failed (a short write: is the disk full?)"),
      std::string::npos)
      << message;
  EXPECT_TRUE(torch::equal(st::load(path)["a"], torch::ones({3})));
  size_t files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    EXPECT_EQ(entry.path().filename(), "good.safetensors");
    ++files;
  }
  EXPECT_EQ(files, 1u);
}

TEST_F(SafetensorsTest, AFailedSaveLeavesTheGoodFileInPlace) {
  const auto dir = ::testing::TempDir() + "/failed_save";
  std::filesystem::remove_all(dir);
  const auto path = dir + "/good.safetensors";
  st::Tensors good;
  good.insert("a", torch::ones({3}));
  st::save(path, good);
  st::Tensors bad;
  bad.insert("b", torch::ones({3}));
  bad.insert("z", torch::randn({2}, torch::kComplexFloat));
  EXPECT_TORCHLORA_ERROR(st::save(path, bad), "cannot store tensor \"z\"");
  EXPECT_TRUE(torch::equal(st::load(path)["a"], torch::ones({3})));
  size_t files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    EXPECT_EQ(entry.path().filename(), "good.safetensors");
    ++files;
  }
  EXPECT_EQ(files, 1u);
}

} // namespace torchlora_safetensors_test
