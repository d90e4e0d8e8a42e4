#pragma once
// Fashion-MNIST from Debian's dataset-fashion-mnist package (gzipped idx
// files), as a LibTorch dataset of a chosen set of classes.

#include <torch/torch.h>

#include <zlib.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace fashion {

/// Where Debian's dataset-fashion-mnist package puts the files.
inline const char* const kDefaultDir = "/usr/share/datasets/fashion-mnist";

/// The ten class names, by label.
inline const std::array<const char*, 10> kClassNames = {
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot"};

/// Every byte of a gzip file.
inline std::vector<uint8_t> read_gzip(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) {
    throw std::runtime_error(
        "no file " + path +
        " (on Debian: apt-get install dataset-fashion-mnist, or pass "
        "--data-dir)");
  }
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    throw std::runtime_error("cannot open " + path);
  }
  std::vector<uint8_t> bytes;
  std::vector<uint8_t> chunk(1 << 16);
  for (;;) {
    const int got =
        gzread(file, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (got < 0) {
      gzclose(file);
      throw std::runtime_error("cannot decompress " + path);
    }
    if (got == 0) {
      break;
    }
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + got);
  }
  gzclose(file);
  return bytes;
}

/// The big-endian 32-bit number at `offset`.
inline uint32_t big_endian_at(
    const std::vector<uint8_t>& bytes,
    size_t offset,
    const std::string& path) {
  if (bytes.size() < offset + 4) {
    throw std::runtime_error(path + " is too short for an idx header");
  }
  return (uint32_t{bytes[offset]} << 24) | (uint32_t{bytes[offset + 1]} << 16) |
      (uint32_t{bytes[offset + 2]} << 8) | uint32_t{bytes[offset + 3]};
}

/// An idx file of unsigned bytes with `dims` dimensions, as a uint8 tensor.
inline torch::Tensor read_idx(const std::string& path, size_t dims) {
  const auto bytes = read_gzip(path);
  const uint32_t magic = big_endian_at(bytes, 0, path);
  if (magic != (0x0800u | dims)) {
    throw std::runtime_error(
        path + ": not an idx file of " + std::to_string(dims) +
        "-dimensional bytes (magic " + std::to_string(magic) + ")");
  }
  std::vector<int64_t> shape;
  size_t count = 1;
  for (size_t d = 0; d < dims; ++d) {
    shape.push_back(big_endian_at(bytes, 4 + 4 * d, path));
    count *= static_cast<size_t>(shape.back());
  }
  const size_t header = 4 + 4 * dims;
  if (bytes.size() != header + count) {
    throw std::runtime_error(
        path + ": holds " + std::to_string(bytes.size() - header) +
        " bytes of data, its header says " + std::to_string(count));
  }
  return torch::from_blob(
             const_cast<uint8_t*>(bytes.data() + header), shape, torch::kUInt8)
      .clone();
}

/// Images `[N, 1, 28, 28]` (float, normalized) and labels `[N]` (int64).
struct Split {
  torch::Tensor images;
  torch::Tensor labels;
};

/// The "train" or "t10k" split from `dir`.
inline Split read_split(const std::string& dir, const std::string& prefix) {
  const auto images = read_idx(dir + "/" + prefix + "-images-idx3-ubyte.gz", 3);
  const auto labels = read_idx(dir + "/" + prefix + "-labels-idx1-ubyte.gz", 1);
  if (images.size(0) != labels.size(0)) {
    throw std::runtime_error(
        dir + "/" + prefix + ": " + std::to_string(images.size(0)) +
        " images but " + std::to_string(labels.size(0)) + " labels");
  }
  // Fashion-MNIST's pixel mean and standard deviation.
  return {
      ((images.to(torch::kFloat32) / 255.0 - 0.2860) / 0.3530).unsqueeze(1),
      labels.to(torch::kInt64)};
}

/// The examples of `split` whose labels are `first_class ..
/// first_class + classes - 1`, relabelled from 0, at most `per_class` of
/// each (0: all).
inline Split select_classes(
    const Split& split,
    int64_t first_class,
    int64_t classes,
    int64_t per_class = 0) {
  std::vector<int64_t> rows;
  std::vector<int64_t> taken(static_cast<size_t>(classes), 0);
  const auto labels = split.labels.accessor<int64_t, 1>();
  for (int64_t i = 0; i < labels.size(0); ++i) {
    const int64_t label = labels[i] - first_class;
    if (label < 0 || label >= classes) {
      continue;
    }
    auto& count = taken[static_cast<size_t>(label)];
    if (per_class == 0 || count < per_class) {
      ++count;
      rows.push_back(i);
    }
  }
  const auto index = torch::tensor(rows, torch::kInt64);
  return {
      split.images.index_select(0, index),
      split.labels.index_select(0, index) - first_class};
}

/// A split as a LibTorch dataset: one example is an image and its label.
class Dataset : public torch::data::datasets::Dataset<Dataset> {
 public:
  explicit Dataset(Split split) : split_(std::move(split)) {}

  torch::data::Example<> get(size_t index) override {
    const auto i = static_cast<int64_t>(index);
    return {split_.images[i], split_.labels[i]};
  }

  c10::optional<size_t> size() const override {
    return static_cast<size_t>(split_.images.size(0));
  }

 private:
  Split split_;
};

} // namespace fashion
