// `qlora report` and what it is made of. The PNG encoder is checked by a decoder whose chunk walk
// and un-filtering are written here (zlib inflates and checks the CRC-32s and Adler-32), the
// plotter by finding series colours where the data say they must be,
// the summary by its numbers on a synthetic run folder, and the whole by training then reporting.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "launcher/errors.h"
#include "launcher/plot.h"
#include "launcher/png.h"
#include "launcher/report.h"
#include "common/json.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

namespace fs = std::filesystem;
using testing_support::qlora_binary;
using testing_support::run_command;
using testing_support::shared_temp_dir;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void write_text(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

// ---- a PNG decoder: chunk walk and un-filtering written here, inflate and CRC-32 from zlib ------

uint32_t read_be32(const uint8_t* bytes) {
  return (uint32_t{bytes[0]} << 24) | (uint32_t{bytes[1]} << 16) | (uint32_t{bytes[2]} << 8) | bytes[3];
}

// The IDAT stream inflated by zlib (which checks its header and Adler-32); it must hold exactly
// `size` bytes and end where the image data end.
std::vector<uint8_t> inflate_exactly(const std::vector<uint8_t>& stream, size_t size) {
  std::vector<uint8_t> out(size);
  uLongf out_size = size;
  uLong in_size = stream.size();
  const int status = uncompress2(out.data(), &out_size, stream.data(), &in_size);
  if (status != Z_OK) throw std::runtime_error("inflate failed: zlib status " + std::to_string(status));
  if (out_size != size) throw std::runtime_error("image data size");
  if (in_size != stream.size()) throw std::runtime_error("bytes after the zlib stream");
  return out;
}

struct DecodedPng {
  int width = 0;
  int height = 0;
  std::vector<std::string> chunk_types;
  std::vector<uint8_t> filter_types;  // one per row
  std::vector<uint8_t> pixels;        // RGB
  plot::Color at(int x, int y) const {
    const uint8_t* pixel = &pixels[(static_cast<size_t>(y) * width + x) * 3];
    return {pixel[0], pixel[1], pixel[2]};
  }
};

DecodedPng decode_png(const std::vector<uint8_t>& file) {
  static const uint8_t kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (file.size() < 8 || !std::equal(kSignature, kSignature + 8, file.begin())) throw std::runtime_error("no signature");
  DecodedPng png;
  std::vector<uint8_t> compressed;
  size_t at = 8;
  while (at < file.size()) {
    if (at + 12 > file.size()) throw std::runtime_error("truncated chunk");
    const uint32_t length = read_be32(&file[at]);
    if (at + 12 + length > file.size()) throw std::runtime_error("chunk runs past the end");
    const std::string type(file.begin() + at + 4, file.begin() + at + 8);
    if (read_be32(&file[at + 8 + length]) != crc32(0L, &file[at + 4], 4 + length))
      throw std::runtime_error("CRC mismatch in " + type);
    const uint8_t* data = &file[at + 8];
    png.chunk_types.push_back(type);
    if (type == "IHDR") {
      if (length != 13) throw std::runtime_error("IHDR length");
      png.width = static_cast<int>(read_be32(data));
      png.height = static_cast<int>(read_be32(data + 4));
      if (data[8] != 8 || data[9] != 2 || data[10] != 0 || data[11] != 0 || data[12] != 0)
        throw std::runtime_error("not 8-bit RGB, deflate, adaptive filtering, no interlace");
    } else if (type == "IDAT") {
      compressed.insert(compressed.end(), data, data + length);
    }
    at += 12 + length;
  }
  if (png.chunk_types.empty() || png.chunk_types.front() != "IHDR" || png.chunk_types.back() != "IEND")
    throw std::runtime_error("IHDR must come first and IEND last");
  const size_t stride = static_cast<size_t>(png.width) * 3;
  const auto scanlines = inflate_exactly(compressed, (stride + 1) * png.height);
  png.pixels.assign(stride * png.height, 0);
  for (int y = 0; y < png.height; ++y) {
    const uint8_t filter = scanlines[y * (stride + 1)];
    png.filter_types.push_back(filter);
    const uint8_t* in = &scanlines[y * (stride + 1) + 1];
    uint8_t* row = &png.pixels[y * stride];
    const uint8_t* above = y > 0 ? row - stride : nullptr;
    for (size_t i = 0; i < stride; ++i) {
      const int a = i >= 3 ? row[i - 3] : 0;
      const int b = above ? above[i] : 0;
      const int c = (above && i >= 3) ? above[i - 3] : 0;
      int predicted = 0;
      switch (filter) {
        case 0: break;
        case 1: predicted = a; break;
        case 2: predicted = b; break;
        case 3: predicted = (a + b) / 2; break;
        case 4: {
          const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
          predicted = (pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c);
          break;
        }
        default: throw std::runtime_error("bad filter type");
      }
      row[i] = static_cast<uint8_t>(in[i] + predicted);
    }
  }
  return png;
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  const std::string text = read_text(path);
  return std::vector<uint8_t>(text.begin(), text.end());
}

png::RgbImage random_image(int width, int height, uint32_t seed) {
  std::mt19937 generator(seed);
  png::RgbImage image;
  image.width = width;
  image.height = height;
  for (int i = 0; i < width * height * 3; ++i) image.pixels.push_back(static_cast<uint8_t>(generator()));
  return image;
}

// ---- PNG -----------------------------------------------------------------------------------------

TEST(Png, ImagesOfAnySizeDecodeToTheSamePixels) {
  for (const auto& [width, height] : std::vector<std::pair<int, int>>{{1, 1}, {7, 5}, {200, 150}}) {
    const auto image = random_image(width, height, 11 + width);
    const auto decoded = decode_png(png::encode(image));
    EXPECT_EQ(decoded.width, width);
    EXPECT_EQ(decoded.height, height);
    EXPECT_EQ(decoded.chunk_types, (std::vector<std::string>{"IHDR", "tEXt", "IDAT", "IEND"}));
    EXPECT_EQ(decoded.filter_types.size(), static_cast<size_t>(height));
    EXPECT_EQ(decoded.pixels, image.pixels) << width << "x" << height;
  }
}

TEST(Png, OneColourImageFiltersToZerosAndCompressesToAlmostNothing) {
  // Sub turns every row but its first pixel into zeros, Up every row after the first: deflate
  // then sees one long run, so 960 x 540 (1.5 MB raw) fits in a few KB.
  png::RgbImage image;
  image.width = 960;
  image.height = 540;
  for (int i = 0; i < image.width * image.height; ++i) image.pixels.insert(image.pixels.end(), {31, 119, 180});
  const auto file = png::encode(image);
  const auto decoded = decode_png(file);
  EXPECT_EQ(decoded.pixels, image.pixels);
  for (int y = 1; y < image.height; ++y) EXPECT_NE(decoded.filter_types[y], 0) << y;
  EXPECT_LT(file.size(), 4000u);
}

TEST(Png, FilteredCompressedImagesDecodeExactly) {
  // Noise (filters rarely help) and a chart (flat colours, long matches) both round-trip.
  const auto noise = random_image(33, 17, 13);
  EXPECT_EQ(decode_png(png::encode(noise)).pixels, noise.pixels);
  plot::LineChart chart;
  chart.title = "round trip";
  chart.series.push_back({"a", plot::colors::palette[0], {0, 1, 2, 3}, {1, 3, 2, 4}, true, true});
  const auto canvas = plot::render(chart, 640, 360);
  const auto file = png::encode(canvas.image());
  const auto decoded = decode_png(file);
  EXPECT_EQ(decoded.pixels, canvas.image().pixels);
  // Adaptive filtering is used: more than one filter type occurs in a chart.
  EXPECT_GT(std::set<uint8_t>(decoded.filter_types.begin(), decoded.filter_types.end()).size(), 1u);
  EXPECT_LT(file.size(), canvas.image().pixels.size() / 20) << "a flat-coloured chart should compress > 20x";
}

// ---- plotter -------------------------------------------------------------------------------------

TEST(Plot, TicksAreNiceAndEncloseTheRange) {
  EXPECT_EQ(plot::nice_ticks(1, 4), (std::vector<double>{1, 2, 3, 4}));
  EXPECT_EQ(plot::nice_ticks(1, 4, 8), (std::vector<double>{1, 1.5, 2, 2.5, 3, 3.5, 4}));
  EXPECT_EQ(plot::nice_ticks(0, 97, 6), (std::vector<double>{0, 20, 40, 60, 80, 100}));
  const auto small = plot::nice_ticks(0, 2e-4, 6);
  ASSERT_EQ(small.size(), 5u);
  EXPECT_DOUBLE_EQ(small[1], 5e-5);
  EXPECT_DOUBLE_EQ(small.back(), 2e-4);
  const auto flat = plot::nice_ticks(3, 3);  // a constant series still gets a range
  EXPECT_LT(flat.front(), 3);
  EXPECT_GT(flat.back(), 3);
  EXPECT_EQ(plot::format_tick(0, 0.5), "0.0");
  EXPECT_EQ(plot::format_tick(-1e-17, 0.25), "0.00");
  EXPECT_EQ(plot::format_tick(0, 5e-5), "0");
  EXPECT_EQ(plot::format_tick(2.5, 0.5), "2.5");
  EXPECT_EQ(plot::format_tick(40, 20), "40");
  EXPECT_EQ(plot::format_tick(0.25, 0.25), "0.25");
  EXPECT_EQ(plot::format_tick(1.5e-4, 5e-5), "1.5e-4");
  EXPECT_EQ(plot::format_tick(2e-4, 5e-5), "2e-4");
  EXPECT_EQ(plot::format_tick(3e6, 1e6), "3e6");
}

TEST(Plot, TextDrawsTheFontsPixels) {
  plot::Canvas canvas(20, 12);
  canvas.text(1, 1, "1", plot::colors::black);
  // '1' is ..#.. / .##.. / ..#.. x4 / .###. : 10 pixels, its stem in column 2 of the glyph.
  int set = 0;
  for (int y = 0; y < 12; ++y)
    for (int x = 0; x < 20; ++x) set += canvas.at(x, y) == plot::colors::black;
  EXPECT_EQ(set, 10);
  for (int row = 0; row < 7; ++row) EXPECT_EQ(canvas.at(1 + 2, 1 + row), plot::colors::black) << row;
  EXPECT_EQ(canvas.at(1 + 1, 1 + 1), plot::colors::black);
  EXPECT_EQ(canvas.at(1 + 0, 1 + 0), plot::colors::white);
  EXPECT_EQ(plot::Canvas::text_width("abc", 2), (3 * 6 - 1) * 2);
}

TEST(Plot, LineChartPutsTheLargestValueAtTheTopOfThePlotArea) {
  const plot::Color loss_color = plot::colors::palette[0];
  const plot::Color eval_color = plot::colors::palette[1];
  plot::LineChart chart;
  chart.title = "Loss";
  chart.x_label = "step";
  chart.series.push_back({"training", loss_color, {1, 2, 3, 4}, {4, 3, 2, 1}, true, false});
  chart.series.push_back({"eval", eval_color, {2}, {2.5}, false, true});
  plot::PlotArea area;
  const auto canvas = plot::render(chart, 800, 450, &area);
  // Ticks 1..4 in x and y enclose the data exactly: the first point (the largest loss) is the plot
  // area's top-left corner and the last one its bottom-right corner.
  EXPECT_DOUBLE_EQ(area.x_min, 1);
  EXPECT_DOUBLE_EQ(area.x_max, 4);
  EXPECT_DOUBLE_EQ(area.y_min, 1);
  EXPECT_DOUBLE_EQ(area.y_max, 4);
  EXPECT_EQ(canvas.at(area.left, area.top), loss_color);
  EXPECT_EQ(canvas.at(area.right, area.bottom), loss_color);
  // Search from just above the plot area (the legend swatch, also in this colour, lies higher up).
  int topmost = -1;
  int topmost_x = -1;
  for (int y = area.top - 5; y <= area.bottom && topmost < 0; ++y)
    for (int x = area.left - 5; x <= area.right + 5; ++x)
      if (canvas.at(x, y) == loss_color) {
        topmost = y;
        topmost_x = x;
        break;
      }
  EXPECT_EQ(topmost, area.top);
  EXPECT_LE(topmost_x, area.left + 2);
  // The middle points lie on the straight line between them; the opposite corners are empty.
  const int middle_x = static_cast<int>(std::lround(area.x_to_pixel(2.5)));
  const int middle_y = static_cast<int>(std::lround(area.y_to_pixel(2.5)));
  EXPECT_EQ(canvas.at(middle_x, middle_y), loss_color);
  EXPECT_NE(canvas.at(area.right, area.top + 3), loss_color);
  EXPECT_NE(canvas.at(area.left + 3, area.bottom), loss_color);
  // The evaluation marker (7x7, drawn after the line) covers its point.
  const int eval_x = static_cast<int>(std::lround(area.x_to_pixel(2)));
  const int eval_y = static_cast<int>(std::lround(area.y_to_pixel(2.5)));
  EXPECT_EQ(canvas.at(eval_x, eval_y), eval_color);
  EXPECT_EQ(canvas.at(eval_x + 3, eval_y - 3), eval_color);
  EXPECT_NE(canvas.at(eval_x + 5, eval_y - 5), eval_color);
  // Clipping: nothing of the series leaks onto the axes outside the plot area.
  for (int y = area.top; y <= area.bottom; ++y) EXPECT_NE(canvas.at(area.left - 1, y), loss_color) << y;
}

TEST(Plot, StackedBarsPutEverySegmentWhereItsValueSays) {
  const auto& palette = plot::colors::palette;
  plot::BarChart chart;
  chart.title = "Memory";
  chart.y_label = "MiB";
  chart.categories = {"rank 0", "rank 1"};
  chart.segments = {"weights", "adapters"};
  chart.segment_colors = {palette[0], palette[1]};
  chart.values = {{1, 2}, {3, 0}};
  chart.marker_name = "peak";
  chart.markers = {4, std::nan("")};
  plot::PlotArea area;
  const auto canvas = plot::render(chart, 800, 450, &area);
  EXPECT_DOUBLE_EQ(area.y_min, 0);
  EXPECT_DOUBLE_EQ(area.y_max, 4);
  auto row = [&](double value) { return static_cast<int>(std::lround(area.y_to_pixel(value))); };
  const int bar0 = static_cast<int>(std::lround(area.x_to_pixel(0.5)));
  const int bar1 = static_cast<int>(std::lround(area.x_to_pixel(1.5)));
  EXPECT_EQ(canvas.at(bar0, row(0.5)), palette[0]);
  EXPECT_EQ(canvas.at(bar0, row(1) + 1), palette[0]);
  EXPECT_EQ(canvas.at(bar0, row(1) - 1), palette[1]);
  EXPECT_EQ(canvas.at(bar0, row(2.9)), palette[1]);
  EXPECT_EQ(canvas.at(bar0, row(3) - 1), plot::colors::white);
  EXPECT_EQ(canvas.at(bar0, row(4)), plot::colors::black);  // the peak marker
  EXPECT_EQ(canvas.at(bar1, row(2.9)), palette[0]);          // a zero segment takes no room
  EXPECT_NE(canvas.at(bar1, row(3) - 2), palette[1]);
  EXPECT_NE(canvas.at(bar1, row(4)), plot::colors::black);   // NaN: no marker
  // Bars are 60% of their slot wide, centred: between the bars there is background.
  EXPECT_EQ(canvas.at((bar0 + bar1) / 2, row(0.5)), plot::colors::white);
}

// ---- the run folder and report.md ----------------------------------------------------------------

// A run folder with known numbers: 12 steps (loss 3 - 0.1 step, tokens/s 1000 + step, 0.5 s each),
// evaluations at 6 and 12, a resume that rewrote step 5, two ranks of memory.
std::string make_synthetic_run(const std::string& name) {
  const std::string dir = shared_temp_dir(MPI_COMM_SELF) + "/" + name;
  std::ostringstream metrics;
  auto step_line = [&](int step, double loss) {
    Json line;
    line["step"] = step;
    line["loss"] = loss;
    line["lr"] = 1e-3 * step / 12.0;
    line["grad_norm"] = 0.5;
    line["tokens_per_second"] = 1000.0 + step;
    line["step_seconds"] = 0.5;
    line["gather_wait_seconds"] = 0.05;
    line["peak_bytes_rank0"] = int64_t{3} << 20;
    metrics << line.dump() << "\n";
  };
  for (int step = 1; step <= 6; ++step) step_line(step, step == 5 ? 9.0 : 3 - 0.1 * step);  // 9: replaced below
  metrics << "{\"step\":6,\"eval_loss\":2.5,\"eval_perplexity\":" << std::exp(2.5) << "}\n";
  for (int step = 5; step <= 12; ++step) step_line(step, 3 - 0.1 * step);  // resumed at step 4
  metrics << "{\"step\":12,\"eval_loss\":2.25,\"eval_perplexity\":" << std::exp(2.25) << "}\n";
  write_text(dir + "/metrics.jsonl", metrics.str());
  Json ranks = Json::array();
  for (int rank = 0; rank < 2; ++rank) {
    Json entry;
    entry["rank"] = rank;
    entry["quantized_weights_bytes"] = (int64_t{10} + rank) << 20;  // 10 and 11 MiB
    entry["replicated_parameters_bytes"] = int64_t{4} << 20;
    entry["adapters_bytes"] = int64_t{1} << 20;
    entry["gradients_bytes"] = int64_t{1} << 20;
    entry["optimizer_state_bytes"] = int64_t{2} << 20;
    entry["gather_buffers_bytes"] = int64_t{3} << 20;
    entry["forward_activation_peak_bytes"] = (int64_t{5} + 2 * rank) << 20;  // 5 and 7 MiB
    entry["backward_activation_peak_bytes"] = int64_t{6} << 20;
    entry["peak_total_bytes"] = (int64_t{28} + rank) << 20;
    ranks.push_back(entry);
  }
  Json memory;
  memory["ranks"] = ranks;
  write_text(dir + "/memory.json", memory.dump(2));
  Json config;
  config["model"] = "model.h5";
  config["data"] = "corpus|with|bars";
  config["steps"] = int64_t{12};
  config["global-batch"] = int64_t{4};
  config["seq-len"] = int64_t{32};
  config["lr"] = 1e-3;
  config["lr-schedule"] = "cosine";
  config["warmup-steps"] = int64_t{2};
  config["weight-decay"] = 0.0;
  config["lora-r"] = int64_t{8};
  config["lora-alpha"] = 16.0;
  config["lora-dropout"] = 0.05;
  config["lora-targets"] = "all-linear";
  config["checkpointing"] = "reentrant";
  write_text(dir + "/config.json", config.dump(2));
  fs::create_directories(dir + "/checkpoints/step-6");
  fs::create_directories(dir + "/checkpoints/step-12");
  fs::create_directories(dir + "/checkpoints/step-10.partial");
  write_text(dir + "/final/adapter_model.safetensors", "x");
  return dir;
}

TEST(Report, ReadsTheRunFolderAndLaterLinesReplaceEarlierOnes) {
  const auto run = load_run(make_synthetic_run("read-run"));
  ASSERT_EQ(run.steps.size(), 12u);
  EXPECT_EQ(run.replaced_lines, 2);  // steps 5 and 6 were written twice
  EXPECT_NEAR(run.steps[4].loss, 2.5, 1e-12);  // the resumed line, not the first one's 9.0
  ASSERT_EQ(run.evaluations.size(), 2u);
  EXPECT_EQ(run.evaluations[1].step, 12);
  EXPECT_DOUBLE_EQ(run.evaluations[1].loss, 2.25);
  ASSERT_EQ(run.memory.size(), 2u);
  EXPECT_EQ(run.memory[1].forward_activation_peak, int64_t{7} << 20);
  EXPECT_EQ(run.checkpoints, (std::vector<std::string>{"step-6", "step-12"}));  // numeric order, no .partial
  EXPECT_TRUE(run.has_final_adapter);
  EXPECT_EQ(run.config.at("lora-r").get<int64_t>(), 8);
}

TEST(Report, MarkdownCarriesTheRunsNumbers) {
  const auto run = load_run(make_synthetic_run("markdown-run"));
  const std::string md = report_markdown(run, {"loss.png", "lr.png", "throughput.png", "memory.png"});
  auto row = [](const char* name, const char* step, double loss) {
    char line[200];
    std::snprintf(line, sizeof line, "| %s | %s | %.4f | %.3f |", name, step, loss, std::exp(loss));
    return std::string(line);
  };
  EXPECT_TRUE(contains(md, row("first training step", "1", 2.9))) << md;
  EXPECT_TRUE(contains(md, row("last training step", "12", 1.8))) << md;
  EXPECT_TRUE(contains(md, row("lowest training loss", "12", 1.8))) << md;
  // Steps 3..12: losses 2.7 .. 1.8, mean 2.25.
  EXPECT_TRUE(contains(md, row("mean of the last 10 steps", "3-12", 2.25))) << md;
  EXPECT_TRUE(contains(md, row("first evaluation", "6", 2.5))) << md;
  EXPECT_TRUE(contains(md, row("best evaluation", "12", 2.25))) << md;
  EXPECT_TRUE(contains(md, "| perplexity |")) << md;
  // Throughput over steps 2..12: tokens = sum(1000 + s) * 0.5, time 5.5 s, so 1007.0 tokens/s;
  // the median rate is 1007 too; gathers 11 x 0.05 = 0.55 s = 10%.
  EXPECT_TRUE(contains(md, "| tokens/s over all ranks (steps 2-12) | 1007.0 |")) << md;
  EXPECT_TRUE(contains(md, "| median tokens/s of a step | 1007.0 |")) << md;
  EXPECT_TRUE(contains(md, "| mean step time | 0.5000 s |")) << md;
  EXPECT_TRUE(contains(md, "| waiting on 4-bit gathers (rank 0) | 0.550 s (10.0% of step time) |")) << md;
  EXPECT_TRUE(contains(md, "| allocator peak on rank 0 | 3.00 MiB |")) << md;
  // Memory in MiB: per-rank rows, then min / max / mean of every column.
  EXPECT_TRUE(contains(md, "in MiB")) << md;
  EXPECT_TRUE(contains(md, "| 0 | 10.00 | 4.00 | 1.00 | 1.00 | 2.00 | 3.00 | 5.00 | 6.00 | 28.00 |")) << md;
  EXPECT_TRUE(contains(md, "| 1 | 11.00 | 4.00 | 1.00 | 1.00 | 2.00 | 3.00 | 7.00 | 6.00 | 29.00 |")) << md;
  EXPECT_TRUE(contains(md, "| **min** | 10.00 | 4.00 | 1.00 | 1.00 | 2.00 | 3.00 | 5.00 | 6.00 | 28.00 |")) << md;
  EXPECT_TRUE(contains(md, "| **max** | 11.00 | 4.00 | 1.00 | 1.00 | 2.00 | 3.00 | 7.00 | 6.00 | 29.00 |")) << md;
  EXPECT_TRUE(contains(md, "| **mean** | 10.50 | 4.00 | 1.00 | 1.00 | 2.00 | 3.00 | 6.00 | 6.00 | 28.50 |")) << md;
  // Configuration, checkpoints, images, and the resume noted.
  EXPECT_TRUE(contains(md, "| ranks | 2 |")) << md;
  EXPECT_TRUE(contains(md, "| global batch | 4 sequences x 32 tokens = 128 tokens per step |")) << md;
  EXPECT_TRUE(contains(md, "| data | corpus\\|with\\|bars |")) << md;  // a '|' cannot break the table
  EXPECT_TRUE(contains(md, "| checkpoints | checkpoints/step-6, checkpoints/step-12 |")) << md;
  EXPECT_TRUE(contains(md, "![loss curves](loss.png)")) << md;
  EXPECT_TRUE(contains(md, "![memory per rank](memory.png)")) << md;
  EXPECT_TRUE(contains(md, "repeat an earlier step")) << md;
}

TEST(Report, WritesDecodablePngsOfTheRightSize) {
  const std::string dir = make_synthetic_run("png-run");
  const std::string out = dir + "/custom-out";
  const auto images = write_report(load_run(dir), out);
  EXPECT_EQ(images.loss, "loss.png");
  EXPECT_EQ(images.memory, "memory.png");
  const auto loss = decode_png(read_bytes(out + "/loss.png"));
  EXPECT_EQ(loss.width, 960);
  EXPECT_EQ(loss.height, 540);
  const auto memory = decode_png(read_bytes(out + "/memory.png"));
  size_t weights_pixels = 0;
  for (int y = 0; y < memory.height; ++y)
    for (int x = 0; x < memory.width; ++x) weights_pixels += memory.at(x, y) == plot::colors::palette[0];
  EXPECT_GT(weights_pixels, 1000u);
  EXPECT_EQ(decode_png(read_bytes(out + "/lr.png")).height, 400);
  EXPECT_EQ(decode_png(read_bytes(out + "/throughput.png")).height, 400);
  EXPECT_TRUE(contains(read_text(out + "/report.md"), "# qlora run report"));
}

template <typename Body>
std::string user_error_of(Body&& body) {
  try {
    body();
  } catch (const UserError& error) {
    return std::string(error.what()) + " | hint: " + error.hint;
  }
  return "(no error)";
}

TEST(Report, BadRunFoldersAreUserErrorsNamingTheFile) {
  const std::string base = shared_temp_dir(MPI_COMM_SELF);
  EXPECT_TRUE(contains(user_error_of([&] { load_run(base + "/absent-run"); }), "no such run folder: " + base + "/absent-run"));
  fs::create_directories(base + "/empty-run");
  const std::string empty = user_error_of([&] { load_run(base + "/empty-run"); });
  EXPECT_TRUE(contains(empty, base + "/empty-run/metrics.jsonl: not found")) << empty;
  EXPECT_TRUE(contains(empty, "hint: ")) << empty;

  const std::string corrupt = make_synthetic_run("corrupt-run");
  std::string text = read_text(corrupt + "/metrics.jsonl");
  text.insert(text.find('\n', text.find('\n') + 1) + 1, "{\"step\": 3, \"loss\": 2.\n");  // becomes line 3
  write_text(corrupt + "/metrics.jsonl", text);
  const std::string message = user_error_of([&] { load_run(corrupt); });
  EXPECT_TRUE(contains(message, corrupt + "/metrics.jsonl line 3: ")) << message;
  EXPECT_TRUE(contains(message, "repair or delete that line")) << message;

  write_text(corrupt + "/metrics.jsonl", "{\"loss\": 2.0}\n");
  EXPECT_TRUE(contains(user_error_of([&] { load_run(corrupt); }), "line 1: no numeric \"step\""));
  write_text(corrupt + "/metrics.jsonl", "{\"step\": 1, \"loss\": \"high\"}\n");
  EXPECT_TRUE(contains(user_error_of([&] { load_run(corrupt); }), "line 1: \"loss\" is not a number"));
  write_text(corrupt + "/metrics.jsonl", "\n\n");
  EXPECT_TRUE(contains(user_error_of([&] { load_run(corrupt); }), "holds no training step"));

  // A last line cut off by a kill is skipped with a warning, not an error.
  write_text(corrupt + "/metrics.jsonl", "{\"step\": 1, \"loss\": 2.0}\n{\"step\": 2, \"lo");
  const auto run = load_run(corrupt);
  EXPECT_EQ(run.steps.size(), 1u);
  ASSERT_FALSE(run.warnings.empty());
  EXPECT_TRUE(contains(run.warnings.front(), "line 2 is cut short")) << run.warnings.front();

  write_text(corrupt + "/memory.json", "{\"ranks\": [{\"rank\": 0,}]}");
  const std::string memory = user_error_of([&] { load_run(corrupt); });
  EXPECT_TRUE(contains(memory, corrupt + "/memory.json: ")) << memory;
}

TEST(Report, CommandLineMistakesExitWithCodeTwo) {
  std::string output;
  EXPECT_EQ(run_command(qlora_binary() + " report /nonexistent/run", &output), 2) << output;
  EXPECT_TRUE(contains(output, "error: no such run folder: /nonexistent/run")) << output;
  EXPECT_TRUE(contains(output, "hint: give the folder `qlora train --out` wrote")) << output;
  EXPECT_EQ(run_command(qlora_binary() + " report", &output), 2) << output;
  EXPECT_TRUE(contains(output, "no run folder given")) << output;
  const std::string corrupt = make_synthetic_run("cli-corrupt-run");
  write_text(corrupt + "/metrics.jsonl", "{\"step\": 1, \"loss\": 2.0}\nnot json\n");
  EXPECT_EQ(run_command(qlora_binary() + " report " + corrupt, &output), 2) << output;
  EXPECT_TRUE(contains(output, corrupt + "/metrics.jsonl line 2: ")) << output;
  EXPECT_FALSE(fs::exists(corrupt + "/report")) << "no report folder is left behind by a failed read";
}

// ---- end to end ----------------------------------------------------------------------------------

TEST(Report, TrainOnTwoRanksThenReport) {
  const std::string model = testing_support::synthetic_store("micro", 64, MPI_COMM_SELF);
  const std::string out = shared_temp_dir(MPI_COMM_SELF) + "/e2e-run";
  std::string output;
  ASSERT_EQ(run_command("mpirun --oversubscribe --allow-run-as-root -np 2 " + qlora_binary() + " train --model " +
                            model + " --steps 6 --seq-len 32 --global-batch 4 --eval-every 3 --out " + out,
                        &output),
            0)
      << output;
  ASSERT_EQ(run_command(qlora_binary() + " report " + out, &output), 0) << output;
  EXPECT_TRUE(contains(output, "report: 6 steps")) << output;
  const std::string report = out + "/report";
  for (const char* file : {"report.md", "loss.png", "lr.png", "throughput.png", "memory.png"})
    EXPECT_TRUE(fs::is_regular_file(report + "/" + file)) << file;

  // The summary's last loss is metrics.jsonl's, and both ranks' memory rows are there.
  std::istringstream lines(read_text(out + "/metrics.jsonl"));
  std::string line;
  double last_loss = NAN;
  double last_eval = NAN;
  while (std::getline(lines, line)) {
    const auto value = parse_json(line, "metrics.jsonl");
    if (value.contains("loss")) {
      // Every step line carries its communication time: gather wait plus all-reduce wait.
      const double gather = value.at("gather_wait_seconds").get<double>();
      const double reduce = value.at("reduce_wait_seconds").get<double>();
      EXPECT_GE(reduce, 0.0);
      EXPECT_NEAR(value.at("communication_seconds").get<double>(), gather + reduce, 1e-9);
    }
    if (value.contains("loss")) last_loss = value.at("loss").get<double>();
    if (value.contains("eval_loss")) last_eval = value.at("eval_loss").get<double>();
  }
  const std::string md = read_text(report + "/report.md");
  char expected[200];
  std::snprintf(expected, sizeof expected, "| last training step | 6 | %.4f | %.3f |", last_loss, std::exp(last_loss));
  EXPECT_TRUE(contains(md, expected)) << md;
  std::snprintf(expected, sizeof expected, "| last evaluation | 6 | %.4f |", last_eval);
  EXPECT_TRUE(contains(md, expected)) << md;
  EXPECT_TRUE(contains(md, "| ranks | 2 |")) << md;
  EXPECT_TRUE(contains(md, "\n| 0 |")) << md;
  EXPECT_TRUE(contains(md, "\n| 1 |")) << md;
  EXPECT_TRUE(contains(md, "| final adapter | final/ (PEFT format) |")) << md;
  EXPECT_TRUE(contains(md, "| waiting on the gradient all-reduce (rank 0) |")) << md;

  // The loss plot holds both curves' colours, the memory plot two bars.
  const auto loss = decode_png(read_bytes(report + "/loss.png"));
  size_t training = 0, evaluation = 0;
  for (int y = 0; y < loss.height; ++y)
    for (int x = 0; x < loss.width; ++x) {
      training += loss.at(x, y) == plot::colors::palette[0];
      evaluation += loss.at(x, y) == plot::colors::palette[1];
    }
  EXPECT_GT(training, 500u);
  EXPECT_GT(evaluation, 49u);  // at least the two 7x7 markers
}

}  // namespace
}  // namespace qlora::launcher
