// The report's plotter: canvas primitives, the 5x7 font, tick selection and the two chart layouts
// (title, wrapped legend, y label above the axis, tick labels, plot area, data clipped to it).
#include "launcher/plot.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdio>
#include <limits>

namespace qlora::launcher::plot {
namespace {

// Printable ASCII from ' ' (32) to '~' (126): seven rows of five pixels each, '#' set.
constexpr const char* kFont[95] = {
    "..... ..... ..... ..... ..... ..... .....",  // ' '
    "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",  // !
    ".#.#. .#.#. ..... ..... ..... ..... .....",  // "
    ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",  // #
    "..#.. .#### #.#.. .###. ..#.# ####. ..#..",  // $
    "##... ##..# ...#. ..#.. .#... #..## ...##",  // %
    ".##.. #..#. #.#.. .#... #.#.# #..#. .##.#",  // &
    "..#.. ..#.. ..... ..... ..... ..... .....",  // '
    "...#. ..#.. .#... .#... .#... ..#.. ...#.",  // (
    ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",  // )
    "..... ..#.. #.#.# .###. #.#.# ..#.. .....",  // *
    "..... ..#.. ..#.. ##### ..#.. ..#.. .....",  // +
    "..... ..... ..... ..... .##.. ..#.. .#...",  // ,
    "..... ..... ..... ##### ..... ..... .....",  // -
    "..... ..... ..... ..... ..... .##.. .##..",  // .
    "..... ....# ...#. ..#.. .#... #.... .....",  // /
    ".###. #...# #..## #.#.# ##..# #...# .###.",  // 0
    "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",  // 1
    ".###. #...# ....# ...#. ..#.. .#... #####",  // 2
    "##### ...#. ..#.. ...#. ....# #...# .###.",  // 3
    "...#. ..##. .#.#. #..#. ##### ...#. ...#.",  // 4
    "##### #.... ####. ....# ....# #...# .###.",  // 5
    "..##. .#... #.... ####. #...# #...# .###.",  // 6
    "##### ....# ...#. ..#.. .#... .#... .#...",  // 7
    ".###. #...# #...# .###. #...# #...# .###.",  // 8
    ".###. #...# #...# .#### ....# ...#. .##..",  // 9
    "..... .##.. .##.. ..... .##.. .##.. .....",  // :
    "..... .##.. .##.. ..... .##.. ..#.. .#...",  // ;
    "...#. ..#.. .#... #.... .#... ..#.. ...#.",  // <
    "..... ..... ##### ..... ##### ..... .....",  // =
    ".#... ..#.. ...#. ....# ...#. ..#.. .#...",  // >
    ".###. #...# ....# ...#. ..#.. ..... ..#..",  // ?
    ".###. #...# ....# .##.# #.#.# #.#.# .###.",  // @
    ".###. #...# #...# ##### #...# #...# #...#",  // A
    "####. #...# #...# ####. #...# #...# ####.",  // B
    ".###. #...# #.... #.... #.... #...# .###.",  // C
    "###.. #..#. #...# #...# #...# #..#. ###..",  // D
    "##### #.... #.... ####. #.... #.... #####",  // E
    "##### #.... #.... ####. #.... #.... #....",  // F
    ".###. #...# #.... #.### #...# #...# .####",  // G
    "#...# #...# #...# ##### #...# #...# #...#",  // H
    ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",  // I
    "..### ...#. ...#. ...#. ...#. #..#. .##..",  // J
    "#...# #..#. #.#.. ##... #.#.. #..#. #...#",  // K
    "#.... #.... #.... #.... #.... #.... #####",  // L
    "#...# ##.## #.#.# #.#.# #...# #...# #...#",  // M
    "#...# #...# ##..# #.#.# #..## #...# #...#",  // N
    ".###. #...# #...# #...# #...# #...# .###.",  // O
    "####. #...# #...# ####. #.... #.... #....",  // P
    ".###. #...# #...# #...# #.#.# #..#. .##.#",  // Q
    "####. #...# #...# ####. #.#.. #..#. #...#",  // R
    ".#### #.... #.... .###. ....# ....# ####.",  // S
    "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",  // T
    "#...# #...# #...# #...# #...# #...# .###.",  // U
    "#...# #...# #...# #...# #...# .#.#. ..#..",  // V
    "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",  // W
    "#...# #...# .#.#. ..#.. .#.#. #...# #...#",  // X
    "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",  // Y
    "##### ....# ...#. ..#.. .#... #.... #####",  // Z
    ".###. .#... .#... .#... .#... .#... .###.",  // [
    "..... #.... .#... ..#.. ...#. ....# .....",  // backslash
    ".###. ...#. ...#. ...#. ...#. ...#. .###.",  // ]
    "..#.. .#.#. #...# ..... ..... ..... .....",  // ^
    "..... ..... ..... ..... ..... ..... #####",  // _
    ".#... ..#.. ..... ..... ..... ..... .....",  // `
    "..... ..... .###. ....# .#### #...# .####",  // a
    "#.... #.... #.##. ##..# #...# #...# ####.",  // b
    "..... ..... .###. #.... #.... #...# .###.",  // c
    "....# ....# .##.# #..## #...# #...# .####",  // d
    "..... ..... .###. #...# ##### #.... .###.",  // e
    "..##. .#..# .#... ###.. .#... .#... .#...",  // f
    ".#### #...# #...# #...# .#### ....# .###.",  // g (descends)
    "#.... #.... #.##. ##..# #...# #...# #...#",  // h
    "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",  // i
    "...#. ..... ..##. ...#. ...#. #..#. .##..",  // j
    "#.... #.... #..#. #.#.. ##... #.#.. #..#.",  // k
    ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",  // l
    "..... ..... ##.#. #.#.# #.#.# #...# #...#",  // m
    "..... ..... #.##. ##..# #...# #...# #...#",  // n
    "..... ..... .###. #...# #...# #...# .###.",  // o
    "####. #...# #...# #...# ####. #.... #....",  // p (descends)
    ".#### #...# #...# #...# .#### ....# ....#",  // q (descends)
    "..... ..... #.##. ##..# #.... #.... #....",  // r
    "..... ..... .###. #.... .###. ....# ####.",  // s
    ".#... .#... ###.. .#... .#... .#..# ..##.",  // t
    "..... ..... #...# #...# #...# #..## .##.#",  // u
    "..... ..... #...# #...# #...# .#.#. ..#..",  // v
    "..... ..... #...# #...# #.#.# #.#.# .#.#.",  // w
    "..... ..... #...# .#.#. ..#.. .#.#. #...#",  // x
    "#...# #...# #...# #...# .#### ....# .###.",  // y (descends)
    "..... ..... ##### ...#. ..#.. .#... #####",  // z
    "...#. ..#.. ..#.. .#... ..#.. ..#.. ...#.",  // {
    "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",  // |
    ".#... ..#.. ..#.. ...#. ..#.. ..#.. .#...",  // }
    "..... ..... .#... #.#.# ...#. ..... .....",  // ~
};

// g, p, q and y are drawn two rows lower: their x-height part then lines up with the
// other lower-case letters (rows 2-6) and the tail hangs below the baseline.
int glyph_drop(char character) {
  return (character == 'g' || character == 'p' || character == 'q' || character == 'y') ? 2 : 0;
}

bool glyph_pixel(char character, int column, int row) {
  const int index = (character >= 32 && character <= 126) ? character - 32 : '?' - 32;
  return kFont[index][row * 6 + column] == '#';
}

// Text and spacing of every chart, in pixels.
constexpr int kTextScale = 2;
constexpr int kTextHeight = kGlyphHeight * kTextScale;
constexpr int kMargin = 14;
constexpr int kTickLength = 5;

// Titles are the body font drawn twice, one pixel apart: a cheap bold.
void draw_title(Canvas& canvas, const std::string& title) {
  canvas.text(kMargin, kMargin, title, colors::black, kTextScale);
  canvas.text(kMargin + 1, kMargin, title, colors::black, kTextScale);
}

// A legend entry is a swatch (a short thick line, or a filled square for bars) and a name.
struct LegendEntry {
  std::string name;
  Color color;
  bool square;
};

// Draws the legend in rows that wrap at the canvas width; returns the y just below it.
int draw_legend(Canvas& canvas, const std::vector<LegendEntry>& entries, int top) {
  constexpr int kSwatch = 22;
  constexpr int kGap = 8;
  constexpr int kSpacing = 24;
  int x = kMargin;
  int y = top;
  for (const auto& entry : entries) {
    const int width = kSwatch + kGap + Canvas::text_width(entry.name, kTextScale);
    if (x > kMargin && x + width > canvas.width() - kMargin) {
      x = kMargin;
      y += kTextHeight + 8;
    }
    const int middle = y + kTextHeight / 2;
    if (entry.square) canvas.fill_rect(x + 4, middle - 6, x + kSwatch - 4, middle + 6, entry.color);
    else canvas.fill_rect(x, middle - 1, x + kSwatch, middle + 1, entry.color);
    canvas.text(x + kSwatch + kGap, y, entry.name, colors::text, kTextScale);
    x += width + kSpacing;
  }
  return entries.empty() ? top : y + kTextHeight + 8;
}

struct Range {
  double low = std::numeric_limits<double>::infinity();
  double high = -std::numeric_limits<double>::infinity();
  void add(double value) {
    if (!std::isfinite(value)) return;
    low = std::min(low, value);
    high = std::max(high, value);
  }
  bool empty() const { return low > high; }
};

// Frame, grid, tick marks and tick labels around an area whose value range is already set.
void draw_axes(Canvas& canvas, const PlotArea& area, const std::vector<double>& x_ticks,
               const std::vector<double>& y_ticks, const std::string& x_label, const std::string& y_label) {
  const double y_spacing = y_ticks.size() > 1 ? y_ticks[1] - y_ticks[0] : 1.0;
  for (double tick : y_ticks) {
    const int y = static_cast<int>(std::lround(area.y_to_pixel(tick)));
    canvas.fill_rect(area.left, y, area.right, y, colors::grid);
    canvas.fill_rect(area.left - 1 - kTickLength, y, area.left - 2, y, colors::axis);
    const std::string label = format_tick(tick, y_spacing);
    canvas.text(area.left - 1 - kTickLength - 4 - Canvas::text_width(label, kTextScale), y - kTextHeight / 2, label,
                colors::text, kTextScale);
  }
  if (!x_ticks.empty()) {
    const double x_spacing = x_ticks.size() > 1 ? x_ticks[1] - x_ticks[0] : 1.0;
    for (double tick : x_ticks) {
      const int x = static_cast<int>(std::lround(area.x_to_pixel(tick)));
      canvas.fill_rect(x, area.top, x, area.bottom, colors::grid);
      canvas.fill_rect(x, area.bottom + 2, x, area.bottom + 1 + kTickLength, colors::axis);
      const std::string label = format_tick(tick, x_spacing);
      canvas.text(x - Canvas::text_width(label, kTextScale) / 2, area.bottom + 1 + kTickLength + 4, label, colors::text,
                  kTextScale);
    }
  }
  canvas.fill_rect(area.left - 1, area.top, area.left - 1, area.bottom + 1, colors::axis);
  canvas.fill_rect(area.left - 1, area.bottom + 1, area.right, area.bottom + 1, colors::axis);
  if (!x_label.empty()) {
    const int x = (area.left + area.right - Canvas::text_width(x_label, kTextScale)) / 2;
    canvas.text(x, area.bottom + 1 + kTickLength + 4 + kTextHeight + 10, x_label, colors::text, kTextScale);
  }
  if (!y_label.empty()) canvas.text(kMargin, area.top - kTextHeight - 16, y_label, colors::text, kTextScale);
}

// The left edge of the plot area: room for the widest y tick label.
int left_edge(const std::vector<double>& y_ticks) {
  const double spacing = y_ticks.size() > 1 ? y_ticks[1] - y_ticks[0] : 1.0;
  int widest = 0;
  for (double tick : y_ticks) widest = std::max(widest, Canvas::text_width(format_tick(tick, spacing), kTextScale));
  return kMargin + widest + 4 + kTickLength + 2;
}

// Space under the plot area for tick labels and the x label.
constexpr int kBottomSpace = 1 + kTickLength + 4 + kTextHeight + 10 + kTextHeight + kMargin;

}  // namespace

// ---- canvas --------------------------------------------------------------------------------------

Canvas::Canvas(int width, int height, Color background) {
  assert(width > 0 && height > 0);
  image_.width = width;
  image_.height = height;
  clear_clip();
  image_.pixels.resize(static_cast<size_t>(width) * static_cast<size_t>(height) * 3);
  fill_rect(0, 0, width - 1, height - 1, background);
}

void Canvas::set_clip(int left, int top, int right, int bottom) {
  clip_left_ = std::max(left, 0);
  clip_top_ = std::max(top, 0);
  clip_right_ = std::min(right, width() - 1);
  clip_bottom_ = std::min(bottom, height() - 1);
}

void Canvas::clear_clip() { set_clip(0, 0, width() - 1, height() - 1); }

Color Canvas::at(int x, int y) const {
  assert(x >= 0 && y >= 0 && x < width() && y < height());
  const uint8_t* pixel = &image_.pixels[(static_cast<size_t>(y) * static_cast<size_t>(width()) + x) * 3];
  return {pixel[0], pixel[1], pixel[2]};
}

void Canvas::set(int x, int y, Color color) {
  if (x < clip_left_ || y < clip_top_ || x > clip_right_ || y > clip_bottom_) return;
  uint8_t* pixel = &image_.pixels[(static_cast<size_t>(y) * static_cast<size_t>(width()) + x) * 3];
  pixel[0] = color.red;
  pixel[1] = color.green;
  pixel[2] = color.blue;
}

void Canvas::fill_rect(int left, int top, int right, int bottom, Color color) {
  left = std::max(left, 0);
  top = std::max(top, 0);
  right = std::min(right, width() - 1);
  bottom = std::min(bottom, height() - 1);
  for (int y = top; y <= bottom; ++y)
    for (int x = left; x <= right; ++x) set(x, y, color);
}

void Canvas::rect_outline(int left, int top, int right, int bottom, Color color) {
  fill_rect(left, top, right, top, color);
  fill_rect(left, bottom, right, bottom, color);
  fill_rect(left, top, left, bottom, color);
  fill_rect(right, top, right, bottom, color);
}

void Canvas::line(double x0, double y0, double x1, double y1, Color color, int thickness) {
  // Stamp a square pen at sub-pixel steps along the segment: simple, and exact at the endpoints.
  const double length = std::hypot(x1 - x0, y1 - y0);
  const int steps = std::max(1, static_cast<int>(std::ceil(length * 2)));
  const int before = thickness / 2;
  const int after = (thickness - 1) / 2;
  for (int i = 0; i <= steps; ++i) {
    const double t = static_cast<double>(i) / steps;
    const int x = static_cast<int>(std::lround(x0 + (x1 - x0) * t));
    const int y = static_cast<int>(std::lround(y0 + (y1 - y0) * t));
    fill_rect(x - before, y - before, x + after, y + after, color);
  }
}

void Canvas::text(int x, int y, const std::string& text, Color color, int scale) {
  for (size_t i = 0; i < text.size(); ++i) {
    const int origin = x + static_cast<int>(i) * kGlyphAdvance * scale;
    const int top = y + glyph_drop(text[i]) * scale;
    for (int row = 0; row < kGlyphHeight; ++row)
      for (int column = 0; column < kGlyphWidth; ++column)
        if (glyph_pixel(text[i], column, row))
          fill_rect(origin + column * scale, top + row * scale, origin + (column + 1) * scale - 1,
                    top + (row + 1) * scale - 1, color);
  }
}

int Canvas::text_width(const std::string& text, int scale) {
  // The last character's spacing column is not part of the drawn width.
  return text.empty() ? 0 : (static_cast<int>(text.size()) * kGlyphAdvance - 1) * scale;
}

// ---- axes ----------------------------------------------------------------------------------------

double PlotArea::x_to_pixel(double x) const {
  return left + (x - x_min) / (x_max - x_min) * (right - left);
}

double PlotArea::y_to_pixel(double y) const {
  return bottom - (y - y_min) / (y_max - y_min) * (bottom - top);
}

std::vector<double> nice_ticks(double low, double high, int target) {
  assert(std::isfinite(low) && std::isfinite(high) && target >= 2);
  if (!(high > low)) {
    const double pad = low != 0 ? std::fabs(low) * 0.1 : 1.0;
    low -= pad;
    high += pad;
  }
  const double raw = (high - low) / (target - 1);
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  double spacing = 10 * power;
  for (double factor : {1.0, 2.0, 2.5, 5.0}) {
    if (factor * power >= raw * (1 - 1e-9)) {
      spacing = factor * power;
      break;
    }
  }
  // Indices rather than repeated addition keep the ticks free of accumulated rounding.
  const double first = std::floor(low / spacing + 1e-9);
  const double last = std::ceil(high / spacing - 1e-9);
  std::vector<double> ticks;
  for (double index = first; index <= last; index += 1) ticks.push_back(index * spacing);
  return ticks;
}

std::string format_tick(double value, double spacing) {
  if (std::fabs(value) < spacing * 1e-6) value = 0;  // not "-0.00" or "3e-17"
  char buffer[48];
  const double magnitude = std::max(std::fabs(value), spacing);
  if (spacing < 1e-3 || magnitude >= 1e6) {
    if (value == 0) return "0";
    // m x 10^e with as many mantissa digits as the spacing needs.
    const int exponent = static_cast<int>(std::floor(std::log10(std::fabs(value)) + 1e-9));
    const int spacing_exponent = static_cast<int>(std::floor(std::log10(spacing) + 1e-9));
    const int decimals = std::clamp(exponent - spacing_exponent + 1, 0, 6);
    std::snprintf(buffer, sizeof buffer, "%.*f", decimals, value / std::pow(10.0, exponent));
    std::string mantissa = buffer;
    if (mantissa.find('.') != std::string::npos) {
      while (mantissa.back() == '0') mantissa.pop_back();
      if (mantissa.back() == '.') mantissa.pop_back();
    }
    return mantissa + "e" + std::to_string(exponent);
  }
  int decimals = 0;
  while (decimals < 6) {
    const double scaled = spacing * std::pow(10.0, decimals);
    if (std::fabs(scaled - std::round(scaled)) <= 1e-6 * scaled) break;
    ++decimals;
  }
  std::snprintf(buffer, sizeof buffer, "%.*f", decimals, value);
  return buffer;
}

// ---- charts --------------------------------------------------------------------------------------

Canvas render(const LineChart& chart, int width, int height, PlotArea* area_out) {
  Canvas canvas(width, height);
  draw_title(canvas, chart.title);
  std::vector<LegendEntry> legend;
  Range x_range;
  Range y_range;
  for (const auto& series : chart.series) {
    assert(series.x.size() == series.y.size());
    if (!series.x.empty()) legend.push_back({series.name, series.color, false});
    for (size_t i = 0; i < series.x.size(); ++i) {
      if (!std::isfinite(series.y[i])) continue;
      x_range.add(series.x[i]);
      y_range.add(series.y[i]);
    }
  }
  if (x_range.empty()) {  // nothing to draw: still a valid, empty chart
    x_range.add(0);
    x_range.add(1);
  }
  if (y_range.empty()) {
    y_range.add(0);
    y_range.add(1);
  }
  if (chart.y_from_zero) y_range.add(0);
  const int legend_bottom = draw_legend(canvas, legend, kMargin + kTextHeight + 12);

  PlotArea area;
  const auto x_ticks = nice_ticks(x_range.low, x_range.high, 8);
  const auto y_ticks = nice_ticks(y_range.low, y_range.high, 6);
  area.x_min = x_ticks.front();
  area.x_max = x_ticks.back();
  area.y_min = y_ticks.front();
  area.y_max = y_ticks.back();
  area.left = left_edge(y_ticks);
  area.top = legend_bottom + kTextHeight + 24;
  area.right = width - 1 - 3 * kMargin;
  area.bottom = height - 1 - kBottomSpace;
  assert(area.right > area.left + 10 && area.bottom > area.top + 10);
  draw_axes(canvas, area, x_ticks, y_ticks, chart.x_label, chart.y_label);

  // The data are clipped to the plot area, so a pen or marker at the edge never covers an axis.
  canvas.set_clip(area.left, area.top, area.right, area.bottom);
  for (const auto& series : chart.series) {
    std::vector<std::pair<double, double>> points;
    for (size_t i = 0; i < series.x.size(); ++i)
      if (std::isfinite(series.x[i]) && std::isfinite(series.y[i]))
        points.emplace_back(area.x_to_pixel(series.x[i]), area.y_to_pixel(series.y[i]));
    if (series.line) {
      for (size_t i = 0; i + 1 < points.size(); ++i)
        canvas.line(points[i].first, points[i].second, points[i + 1].first, points[i + 1].second, series.color, 2);
      if (points.size() == 1)
        canvas.line(points[0].first, points[0].second, points[0].first, points[0].second, series.color, 2);
    }
    if (series.markers) {
      for (const auto& [x, y] : points) {
        const int center_x = static_cast<int>(std::lround(x));
        const int center_y = static_cast<int>(std::lround(y));
        canvas.fill_rect(center_x - 3, center_y - 3, center_x + 3, center_y + 3, series.color);
      }
    }
  }
  canvas.clear_clip();
  if (area_out != nullptr) *area_out = area;
  return canvas;
}

Canvas render(const BarChart& chart, int width, int height, PlotArea* area_out) {
  assert(chart.segments.size() == chart.segment_colors.size());
  assert(chart.values.size() == chart.categories.size());
  Canvas canvas(width, height);
  draw_title(canvas, chart.title);
  std::vector<LegendEntry> legend;
  for (size_t i = 0; i < chart.segments.size(); ++i) legend.push_back({chart.segments[i], chart.segment_colors[i], true});
  Range y_range;
  y_range.add(0);
  bool any_marker = false;
  for (size_t category = 0; category < chart.categories.size(); ++category) {
    assert(chart.values[category].size() == chart.segments.size());
    double total = 0;
    for (double value : chart.values[category]) total += std::max(value, 0.0);
    y_range.add(total);
    if (category < chart.markers.size() && std::isfinite(chart.markers[category])) {
      y_range.add(chart.markers[category]);
      any_marker = true;
    }
  }
  if (any_marker) legend.push_back({chart.marker_name, colors::black, false});
  const int legend_bottom = draw_legend(canvas, legend, kMargin + kTextHeight + 12);

  PlotArea area;
  const auto y_ticks = nice_ticks(y_range.low, y_range.high, 6);
  const size_t count = std::max<size_t>(chart.categories.size(), 1);
  area.x_min = 0;
  area.x_max = static_cast<double>(count);
  area.y_min = y_ticks.front();
  area.y_max = y_ticks.back();
  area.left = left_edge(y_ticks);
  area.top = legend_bottom + kTextHeight + 24;
  area.right = width - 1 - 3 * kMargin;
  area.bottom = height - 1 - kBottomSpace;
  assert(area.right > area.left + 10 && area.bottom > area.top + 10);
  draw_axes(canvas, area, {}, y_ticks, chart.x_label, chart.y_label);

  const double slot = static_cast<double>(area.right - area.left) / static_cast<double>(count);
  const int bar_half_width = std::max(0, static_cast<int>(slot * 0.3));
  // Label every k-th bar so that the labels never overlap.
  int widest_label = 1;
  for (const auto& name : chart.categories) widest_label = std::max(widest_label, Canvas::text_width(name, kTextScale));
  const size_t label_every = std::max<size_t>(1, static_cast<size_t>(std::ceil((widest_label + 12) / slot)));
  for (size_t category = 0; category < chart.categories.size(); ++category) {
    const int center = static_cast<int>(std::lround(area.x_to_pixel(static_cast<double>(category) + 0.5)));
    double stacked = 0;
    for (size_t segment = 0; segment < chart.segments.size(); ++segment) {
      const double value = std::max(chart.values[category][segment], 0.0);
      if (value <= 0) continue;
      const int top = static_cast<int>(std::lround(area.y_to_pixel(stacked + value)));
      const int bottom = static_cast<int>(std::lround(area.y_to_pixel(stacked))) - (stacked > 0 ? 1 : 0);
      if (bottom >= top)
        canvas.fill_rect(center - bar_half_width, top, center + bar_half_width, bottom, chart.segment_colors[segment]);
      stacked += value;
    }
    if (category < chart.markers.size() && std::isfinite(chart.markers[category])) {
      const int y = static_cast<int>(std::lround(area.y_to_pixel(chart.markers[category])));
      canvas.fill_rect(center - bar_half_width - 6, y - 1, center + bar_half_width + 6, y, colors::black);
    }
    if (category % label_every == 0) {
      const auto& name = chart.categories[category];
      canvas.text(center - Canvas::text_width(name, kTextScale) / 2, area.bottom + 1 + kTickLength + 4, name,
                  colors::text, kTextScale);
    }
  }
  if (area_out != nullptr) *area_out = area;
  return canvas;
}

}  // namespace qlora::launcher::plot
