#pragma once
// Word lists as character sequences for the fine-tune example.

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace words {

/// The characters of a UTF-8 string, one code point each.
inline std::vector<std::string> split_utf8(const std::string& text) {
  std::vector<std::string> characters;
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<unsigned char>(text[i]);
    const size_t length = lead < 0x80 ? 1
        : lead < 0xE0                 ? 2
        : lead < 0xF0                 ? 3
                                      : 4;
    characters.push_back(text.substr(i, length));
    i += length;
  }
  return characters;
}

/// Lowercases ASCII letters and the accented capitals the lists use.
inline std::string lowercase(const std::string& word) {
  std::string lower;
  for (const auto& character : split_utf8(word)) {
    if (character.size() == 1) {
      lower += static_cast<char>(
          std::tolower(static_cast<unsigned char>(character[0])));
    } else if (
        character.size() == 2 &&
        static_cast<unsigned char>(character[0]) == 0xC3 &&
        static_cast<unsigned char>(character[1]) >= 0x80 &&
        static_cast<unsigned char>(character[1]) <= 0x9E &&
        static_cast<unsigned char>(character[1]) != 0x97) {
      lower += character[0];
      lower += static_cast<char>(character[1] + 0x20); // À..Þ -> à..þ
    } else {
      lower += character;
    }
  }
  return lower;
}

/// Reads a word list (one word per line), lowercased, without duplicates
/// or words longer than `max_length` characters. Throws, naming the Debian
/// package, when the file is missing.
inline std::vector<std::string> read_list(
    const std::string& path,
    const std::string& package,
    size_t max_length) {
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error(
        "cannot read the word list " + path +
        ": install it with `apt-get install " + package + "` (Debian package " +
        package + "), or point --data-dir to a folder that has it");
  }
  std::vector<std::string> list;
  std::string line;
  while (std::getline(in, line)) {
    const auto word = lowercase(line);
    const auto length = split_utf8(word).size();
    if (length > 0 && length <= max_length) {
      list.push_back(word);
    }
  }
  std::sort(list.begin(), list.end());
  list.erase(std::unique(list.begin(), list.end()), list.end());
  return list;
}

/// Maps characters to ids; id 0 marks both the start and the end of a word.
class Vocabulary {
 public:
  explicit Vocabulary(
      const std::vector<const std::vector<std::string>*>& lists) {
    std::map<std::string, int64_t> seen;
    for (const auto* list : lists) {
      for (const auto& word : *list) {
        for (const auto& character : split_utf8(word)) {
          seen.emplace(character, 0);
        }
      }
    }
    characters_.push_back("\n");
    for (auto& [character, id] : seen) {
      id = static_cast<int64_t>(characters_.size());
      characters_.push_back(character);
    }
    ids_ = seen;
  }

  int64_t size() const {
    return static_cast<int64_t>(characters_.size());
  }

  /// 0, the word's ids, 0.
  std::vector<int64_t> encode(const std::string& word) const {
    std::vector<int64_t> ids = {0};
    for (const auto& character : split_utf8(word)) {
      ids.push_back(ids_.at(character));
    }
    ids.push_back(0);
    return ids;
  }

  const std::string& character(int64_t id) const {
    return characters_.at(static_cast<size_t>(id));
  }

 private:
  std::vector<std::string> characters_;
  std::map<std::string, int64_t> ids_;
};

/// A batch: inputs [B, T] (0-padded) and targets [B, T] (-100 where padded).
struct Batch {
  torch::Tensor inputs;
  torch::Tensor targets;
  int64_t words = 0;
};

/// Encoded words, cut into length-sorted batches.
class Dataset {
 public:
  Dataset(const std::vector<std::string>& list, const Vocabulary& vocabulary) {
    for (const auto& word : list) {
      encoded_.push_back(vocabulary.encode(word));
    }
  }

  size_t size() const {
    return encoded_.size();
  }

  /// Batches of `batch_size` words in a shuffled order; words of similar
  /// length share a batch, so that little is padded.
  std::vector<Batch> batches(
      size_t batch_size,
      std::mt19937& random,
      torch::Device device) const {
    std::vector<size_t> order(encoded_.size());
    for (size_t i = 0; i < order.size(); ++i) {
      order[i] = i;
    }
    std::shuffle(order.begin(), order.end(), random);
    const size_t window = batch_size * 32;
    for (size_t start = 0; start < order.size(); start += window) {
      const auto end = order.begin() +
          static_cast<std::ptrdiff_t>(std::min(order.size(), start + window));
      std::sort(
          order.begin() + static_cast<std::ptrdiff_t>(start),
          end,
          [&](size_t a, size_t b) {
            return encoded_[a].size() < encoded_[b].size();
          });
    }
    std::vector<Batch> result;
    for (size_t start = 0; start < order.size(); start += batch_size) {
      const auto count = std::min(batch_size, order.size() - start);
      size_t longest = 0;
      for (size_t i = 0; i < count; ++i) {
        longest = std::max(longest, encoded_[order[start + i]].size() - 1);
      }
      auto inputs = torch::zeros(
          {static_cast<int64_t>(count), static_cast<int64_t>(longest)},
          torch::kLong);
      auto targets = torch::full_like(inputs, -100);
      auto in = inputs.accessor<int64_t, 2>();
      auto out = targets.accessor<int64_t, 2>();
      for (size_t i = 0; i < count; ++i) {
        const auto& ids = encoded_[order[start + i]];
        for (size_t t = 0; t + 1 < ids.size(); ++t) {
          in[static_cast<int64_t>(i)][static_cast<int64_t>(t)] = ids[t];
          out[static_cast<int64_t>(i)][static_cast<int64_t>(t)] = ids[t + 1];
        }
      }
      result.push_back(Batch{
          inputs.to(device), targets.to(device), static_cast<int64_t>(count)});
    }
    std::shuffle(result.begin(), result.end(), random);
    return result;
  }

 private:
  std::vector<std::vector<int64_t>> encoded_;
};

} // namespace words
