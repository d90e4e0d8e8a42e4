#pragma once
// Progress lines, the loss-curve picture and small formatting helpers for
// the fine-tune example.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace words {

/// A live progress line on a terminal; a plain line every `every` steps
/// otherwise. `unit` names what `update` counts ("words", "images").
class Progress {
 public:
  Progress(
      std::string label,
      int64_t total,
      int64_t every,
      std::string unit = "words")
      : label_(std::move(label)),
        unit_(std::move(unit)),
        total_(total),
        every_(every),
        live_(isatty(fileno(stdout)) != 0),
        start_(std::chrono::steady_clock::now()) {}

  void update(int64_t step, double loss, int64_t items) {
    items_ += items;
    const double seconds = elapsed();
    if (!live_ && step % every_ != 0 && step != total_) {
      return;
    }
    const double rate = items_ / std::max(seconds, 1e-9);
    const double eta = seconds / static_cast<double>(step) *
        static_cast<double>(total_ - step);
    std::ostringstream line;
    line << label_ << " step " << step << "/" << total_ << "  loss "
         << std::fixed << std::setprecision(3) << loss << "  "
         << std::setprecision(0) << rate << " " << unit_ << "/s  ETA "
         << std::setprecision(0) << eta << " s";
    if (live_) {
      std::cout << "\r" << std::left << std::setw(78) << line.str()
                << std::flush;
      if (step == total_) {
        std::cout << "\n";
      }
    } else {
      std::cout << line.str() << "\n";
    }
  }

  double elapsed() const {
    return std::chrono::duration<double>(
               std::chrono::steady_clock::now() - start_)
        .count();
  }

 private:
  std::string label_;
  std::string unit_;
  int64_t total_;
  int64_t every_;
  bool live_;
  std::chrono::steady_clock::time_point start_;
  double items_ = 0;
};

/// One curve of the loss picture.
struct Curve {
  std::string label;
  std::string color;
  bool dashed = false;
  std::vector<std::pair<double, double>> points; // (step, value)
};

/// Writes an SVG line chart of `curves` that any browser opens.
inline void write_svg(
    const std::string& path,
    const std::string& title,
    const std::vector<Curve>& curves,
    const std::string& y_label = "bits per character",
    const std::string& x_label = "fine-tuning step") {
  double max_x = 1;
  double min_y = 1e9;
  double max_y = -1e9;
  for (const auto& curve : curves) {
    for (const auto& [x, y] : curve.points) {
      max_x = std::max(max_x, x);
      min_y = std::min(min_y, y);
      max_y = std::max(max_y, y);
    }
  }
  min_y = std::floor(min_y * 2) / 2;
  max_y = std::ceil(max_y * 2) / 2;
  if (max_y <= min_y) {
    max_y = min_y + 1;
  }
  const double left = 70, right = 760, top = 50, bottom = 390;
  auto sx = [&](double x) { return left + (right - left) * x / max_x; };
  auto sy = [&](double y) {
    return bottom - (bottom - top) * (y - min_y) / (max_y - min_y);
  };
  std::ofstream svg(path);
  svg << std::fixed << std::setprecision(1)
      << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\" height=\"460\" "
         "font-family=\"sans-serif\" font-size=\"13\">\n"
      << "<rect width=\"800\" height=\"460\" fill=\"white\"/>\n"
      << "<text x=\"400\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">"
      << title << "</text>\n";
  for (int i = 0; i <= 5; ++i) {
    const double y = min_y + (max_y - min_y) * i / 5.0;
    svg << "<line x1=\"" << left << "\" x2=\"" << right << "\" y1=\"" << sy(y)
        << "\" y2=\"" << sy(y) << "\" stroke=\"#ddd\"/>\n"
        << "<text x=\"" << left - 8 << "\" y=\"" << sy(y) + 4
        << "\" text-anchor=\"end\">" << std::setprecision(2) << y
        << std::setprecision(1) << "</text>\n";
    const double x = max_x * i / 5.0;
    svg << "<text x=\"" << sx(x) << "\" y=\"" << bottom + 18
        << "\" text-anchor=\"middle\">" << static_cast<long>(x) << "</text>\n";
  }
  svg << "<line x1=\"" << left << "\" x2=\"" << right << "\" y1=\"" << bottom
      << "\" y2=\"" << bottom << "\" stroke=\"black\"/>\n"
      << "<line x1=\"" << left << "\" x2=\"" << left << "\" y1=\"" << top
      << "\" y2=\"" << bottom << "\" stroke=\"black\"/>\n"
      << "<text x=\"" << (left + right) / 2 << "\" y=\"" << bottom + 40
      << "\" text-anchor=\"middle\">" << x_label << "</text>\n"
      << "<text x=\"18\" y=\"" << (top + bottom) / 2
      << "\" text-anchor=\"middle\" transform=\"rotate(-90 18 "
      << (top + bottom) / 2 << ")\">" << y_label << "</text>\n";
  for (size_t c = 0; c < curves.size(); ++c) {
    const auto& curve = curves[c];
    svg << "<polyline fill=\"none\" stroke=\"" << curve.color
        << "\" stroke-width=\"2\""
        << (curve.dashed ? " stroke-dasharray=\"6 4\"" : "") << " points=\"";
    for (const auto& [x, y] : curve.points) {
      svg << sx(x) << "," << sy(y) << " ";
    }
    svg << "\"/>\n";
    const double ly = top + 8 + 18.0 * static_cast<double>(c);
    svg << "<line x1=\"" << right - 210 << "\" x2=\"" << right - 180
        << "\" y1=\"" << ly << "\" y2=\"" << ly << "\" stroke=\"" << curve.color
        << "\" stroke-width=\"2\""
        << (curve.dashed ? " stroke-dasharray=\"6 4\"" : "") << "/>\n"
        << "<text x=\"" << right - 172 << "\" y=\"" << ly + 4 << "\">"
        << curve.label << "</text>\n";
  }
  svg << "</svg>\n";
}

} // namespace words
