// A small raster plotter for `qlora report`: an RGB canvas with lines, rectangles and text in a
// built-in 5x7 bitmap font, and two chart kinds drawn on it - line charts (loss, learning rate,
// throughput against step) and stacked bar charts (memory per rank). No anti-aliasing: the
// output is meant to be exact, so tests can find a series by its colour.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "launcher/png.h"

namespace qlora::launcher::plot {

struct Color {
  uint8_t red = 0;
  uint8_t green = 0;
  uint8_t blue = 0;
  bool operator==(const Color& other) const {
    return red == other.red && green == other.green && blue == other.blue;
  }
  bool operator!=(const Color& other) const { return !(*this == other); }
};

namespace colors {
constexpr Color white{255, 255, 255};
constexpr Color black{0, 0, 0};
constexpr Color axis{64, 64, 64};
constexpr Color grid{225, 225, 225};
constexpr Color text{32, 32, 32};
// A qualitative palette (distinct hues of similar weight), used in this order.
constexpr Color palette[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44}, {214, 39, 40},
                             {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {127, 127, 127},
                             {188, 189, 34},  {23, 190, 207}};
}  // namespace colors

// The built-in font: 5x7 glyphs for printable ASCII; others draw as '?'. A character advances
// 6 * scale pixels and is 7 * scale pixels tall; g, p, q and y hang 2 * scale pixels lower.
constexpr int kGlyphWidth = 5;
constexpr int kGlyphHeight = 7;
constexpr int kGlyphAdvance = 6;

class Canvas {
 public:
  Canvas(int width, int height, Color background = colors::white);

  int width() const { return image_.width; }
  int height() const { return image_.height; }
  Color at(int x, int y) const;
  void set(int x, int y, Color color);  // ignores points outside the clip rectangle
  // Drawing is limited to this rectangle (inclusive corners) until clear_clip(); initially the canvas.
  void set_clip(int left, int top, int right, int bottom);
  void clear_clip();
  void fill_rect(int left, int top, int right, int bottom, Color color);  // inclusive corners
  void rect_outline(int left, int top, int right, int bottom, Color color);
  // A straight line of the given thickness (a square pen), clipped to the canvas.
  void line(double x0, double y0, double x1, double y1, Color color, int thickness = 1);
  // Text with its top-left corner at (x, y).
  void text(int x, int y, const std::string& text, Color color, int scale = 1);
  static int text_width(const std::string& text, int scale = 1);

  const png::RgbImage& image() const { return image_; }

 private:
  png::RgbImage image_;
  int clip_left_ = 0, clip_top_ = 0, clip_right_ = 0, clip_bottom_ = 0;
};

// Where the data land on a chart: the plot area's inclusive pixel bounds and the value range they
// span (x grows rightwards, y upwards). Filled by the render functions, for callers and tests.
struct PlotArea {
  int left = 0;
  int top = 0;
  int right = 0;
  int bottom = 0;
  double x_min = 0, x_max = 1, y_min = 0, y_max = 1;
  double x_to_pixel(double x) const;
  double y_to_pixel(double y) const;
};

struct Series {
  std::string name;
  Color color;
  std::vector<double> x;
  std::vector<double> y;
  bool line = true;      // join the points
  bool markers = false;  // a 5x5 square at every point
};

struct LineChart {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::vector<Series> series;
  bool y_from_zero = false;  // include 0 in the y range (throughput, memory)
};

// Stacked bars, one per category; `segments[i]` names layer i and values[category][i] its height.
// An optional marker per category (NaN: none) draws a black tick across the bar, e.g. the measured
// peak against the stacked parts.
struct BarChart {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::vector<std::string> categories;
  std::vector<std::string> segments;
  std::vector<Color> segment_colors;
  std::vector<std::vector<double>> values;
  std::string marker_name;
  std::vector<double> markers;
};

Canvas render(const LineChart& chart, int width, int height, PlotArea* area = nullptr);
Canvas render(const BarChart& chart, int width, int height, PlotArea* area = nullptr);

// Axis ticks: "nice" values (1, 2, 2.5 or 5 times a power of ten) covering [low, high], at most
// about `target` of them; the first and last tick enclose the range.
std::vector<double> nice_ticks(double low, double high, int target = 6);
// A tick label as short as the tick spacing allows ("0.25", "1.5e-4", "12000").
std::string format_tick(double value, double spacing);

}  // namespace qlora::launcher::plot
