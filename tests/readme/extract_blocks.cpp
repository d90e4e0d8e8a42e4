// Turns the ```cpp blocks of Markdown pages into one GoogleTest source file,
// so that every C++ block of the README and of docs/ compiles and runs in the
// test suite.
//
//   extract_blocks out.cpp [--tag TAG] PAGE.md...
//
// The tests of a page form a suite named after it (README.md: Readme,
// docs/serving.md: Serving), one test per block: Block<n>Line<line>.//
// A block opened with ```cpp TAG (for example ```cpp distributed) goes only
// into the file made with --tag TAG; without --tag, only untagged blocks.
// A block with `int main(` is a whole program: its `main` runs as a test and
// must return 0. Any other block is a list of statements run as a test body.
// `#include` lines of every block move to the top of the file. Each block
// lives in a namespace of its own, so blocks may reuse names.
#include <cctype>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Block {
  int first_line = 0;
  std::string tag;
  std::vector<std::string> lines;
};

bool starts_with(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}

std::string trim_left(const std::string& text) {
  const auto start = text.find_first_not_of(" \t");
  return start == std::string::npos ? std::string() : text.substr(start);
}

std::vector<Block> read_cpp_blocks(std::istream& in) {
  std::vector<Block> blocks;
  std::string line;
  int number = 0;
  bool inside = false;
  while (std::getline(in, line)) {
    ++number;
    const auto text = trim_left(line);
    if (!inside &&
        (starts_with(text, "```cpp") || starts_with(text, "```c++")) &&
        (text.size() == 6 || text[6] == ' ')) {
      inside = true;
      const auto tag = text.size() > 6 ? trim_left(text.substr(6)) : "";
      blocks.push_back(Block{number + 1, tag, {}});
    } else if (inside && starts_with(text, "```")) {
      inside = false;
    } else if (inside) {
      blocks.back().lines.push_back(line);
    }
  }
  if (inside) {
    throw std::runtime_error("a ```cpp block is not closed");
  }
  return blocks;
}

/// The test suite named after a page: README.md gives `Readme`,
/// docs/adapter-files.md gives `AdapterFiles`.
std::string suite_of(const std::string& path) {
  auto name = path.substr(path.find_last_of('/') + 1);
  name = name.substr(0, name.find('.'));
  std::string suite;
  bool upper = true;
  for (const char c : name) {
    if (c == '-' || c == '_') {
      upper = true;
      continue;
    }
    const auto lower =
        static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    suite += upper
        ? static_cast<char>(std::toupper(static_cast<unsigned char>(c)))
        : lower;
    upper = false;
  }
  return suite;
}

} // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pages;
  std::string wanted_tag;
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--tag" && i + 1 < argc) {
      wanted_tag = argv[++i];
    } else if (out_path.empty()) {
      out_path = arg;
    } else {
      pages.push_back(arg);
    }
  }
  if (out_path.empty() || pages.empty()) {
    std::cerr << "usage: extract_blocks out.cpp [--tag TAG] PAGE.md...\n";
    return 2;
  }

  std::set<std::string> includes = {
      "#include <gtest/gtest.h>", "#include <torchlora/torchlora.h>"};
  std::ostringstream body;
  size_t taken = 0;
  for (const auto& page : pages) {
    std::ifstream in(page);
    if (!in) {
      std::cerr << "extract_blocks: cannot read " << page << "\n";
      return 1;
    }
    std::vector<Block> blocks;
    try {
      blocks = read_cpp_blocks(in);
    } catch (const std::exception& error) {
      std::cerr << "extract_blocks: " << page << ": " << error.what() << "\n";
      return 1;
    }
    const auto suite = suite_of(page);
    for (size_t index = 0; index < blocks.size(); ++index) {
      const auto& block = blocks[index];
      if (block.tag != wanted_tag) {
        continue;
      }
      ++taken;
      bool is_program = false;
      std::ostringstream code;
      for (const auto& line : block.lines) {
        if (starts_with(trim_left(line), "#include")) {
          includes.insert(trim_left(line));
          continue;
        }
        is_program = is_program || line.find("int main(") != std::string::npos;
        code << line << "\n";
      }
      const auto name = suite + "_block_" + std::to_string(index + 1);
      const auto test = "TEST(" + suite + ", Block" +
          std::to_string(index + 1) + "Line" +
          std::to_string(block.first_line) + ") {\n  ";
      body << "\n// " << page << " line " << block.first_line << "\n"
           << "namespace " << name << " {\n";
      if (is_program) {
        body << "#define main run\n"
             << "#line " << block.first_line << " \"" << page << "\"\n"
             << code.str() << "#undef main\n"
             << "} // namespace " << name << "\n"
             << test << "EXPECT_EQ(" << name << "::run(), 0);\n}\n";
      } else {
        body << "void run() {\n"
             << "#line " << block.first_line << " \"" << page << "\"\n"
             << code.str() << "}\n"
             << "} // namespace " << name << "\n"
             << test << name << "::run();\n}\n";
      }
    }
  }

  std::ofstream out(out_path);
  out << "// Generated from the documentation's C++ blocks by "
         "tests/readme/extract_blocks.cpp.\n";
  for (const auto& include : includes) {
    out << include << "\n";
  }
  out << body.str();
  if (!out) {
    std::cerr << "extract_blocks: cannot write " << out_path << "\n";
    return 1;
  }
  std::cout << "extract_blocks: " << taken << " C++ blocks"
            << (wanted_tag.empty() ? std::string() : " tagged " + wanted_tag)
            << " from " << pages.size() << " pages\n";
  return 0;
}
