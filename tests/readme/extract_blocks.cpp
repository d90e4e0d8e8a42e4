// Turns the ```cpp blocks of a Markdown file into one GoogleTest source file,
// so that every C++ block of the README compiles and runs in the test suite.
//
//   extract_blocks README.md out.cpp [--tag TAG]
//
// A block opened with ```cpp TAG (for example ```cpp distributed) goes only
// into the file made with --tag TAG; without --tag, only untagged blocks.
// A block with `int main(` is a whole program: its `main` runs as a test and
// must return 0. Any other block is a list of statements run as a test body.
// `#include` lines of every block move to the top of the file. Each block
// lives in a namespace of its own, so blocks may reuse names.
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

} // namespace

int main(int argc, char** argv) {
  const bool tagged = argc == 5 && std::string(argv[3]) == "--tag";
  if (argc != 3 && !tagged) {
    std::cerr << "usage: extract_blocks README.md out.cpp [--tag TAG]\n";
    return 2;
  }
  const std::string wanted_tag = tagged ? argv[4] : "";
  std::ifstream in(argv[1]);
  if (!in) {
    std::cerr << "extract_blocks: cannot read " << argv[1] << "\n";
    return 1;
  }
  std::vector<Block> blocks;
  try {
    blocks = read_cpp_blocks(in);
  } catch (const std::exception& error) {
    std::cerr << "extract_blocks: " << argv[1] << ": " << error.what() << "\n";
    return 1;
  }

  std::set<std::string> includes = {
      "#include <gtest/gtest.h>", "#include <torchlora/torchlora.h>"};
  std::ostringstream body;
  size_t taken = 0;
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
    const auto name = "readme_block_" + std::to_string(index + 1);
    body << "\n// README.md line " << block.first_line << "\n"
         << "namespace " << name << " {\n";
    if (is_program) {
      body << "#define main run\n"
           << "#line " << block.first_line << " \"README.md\"\n"
           << code.str() << "#undef main\n"
           << "} // namespace " << name << "\n"
           << "TEST(Readme, Block" << index + 1 << "Line" << block.first_line
           << ") {\n  EXPECT_EQ(" << name << "::run(), 0);\n}\n";
    } else {
      body << "void run() {\n"
           << "#line " << block.first_line << " \"README.md\"\n"
           << code.str() << "}\n"
           << "} // namespace " << name << "\n"
           << "TEST(Readme, Block" << index + 1 << "Line" << block.first_line
           << ") {\n  " << name << "::run();\n}\n";
    }
  }

  std::ofstream out(argv[2]);
  out << "// Generated from README.md by tests/readme/extract_blocks.cpp.\n";
  for (const auto& include : includes) {
    out << include << "\n";
  }
  out << body.str();
  if (!out) {
    std::cerr << "extract_blocks: cannot write " << argv[2] << "\n";
    return 1;
  }
  std::cout << "extract_blocks: " << taken << " C++ blocks"
            << (tagged ? " tagged " + wanted_tag : std::string()) << " from "
            << argv[1] << "\n";
  return 0;
}
