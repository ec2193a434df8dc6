// `qlora report`: parses a run folder strictly (a damaged file is named with its line, never
// guessed around) and turns it into PNG charts and a markdown summary.
#include "launcher/report.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include "cluster/memory_report.h"
#include "common/atomic_file.h"
#include "launcher/adapter_io.h"
#include "launcher/errors.h"
#include "launcher/plot.h"
#include "launcher/png.h"

namespace qlora::launcher {
namespace {

namespace fs = std::filesystem;
constexpr double kMissing = std::numeric_limits<double>::quiet_NaN();

std::string format(const char* pattern, ...) {
  char buffer[512];
  va_list arguments;
  va_start(arguments, pattern);
  std::vsnprintf(buffer, sizeof buffer, pattern, arguments);
  va_end(arguments);
  return buffer;
}

std::string read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("cannot read " + path, "check the file's permissions");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

Json parse_json_file(const std::string& path, const std::string& hint) {
  try {
    return parse_json(read_whole_file(path), path);
  } catch (const FormatError& error) {
    throw UserError(error.what(), hint);
  }
}

// ---- metrics.jsonl -------------------------------------------------------------------------------

void read_metrics(const std::string& path, RunRecord& run) {
  const std::string hint = "the file is damaged; repair or delete that line and run qlora report again";
  const std::string text = read_whole_file(path);
  std::map<int64_t, MetricsLine> steps;
  std::map<int64_t, MetricsLine> evaluations;
  int64_t ignored = 0;
  size_t begin = 0;
  for (int64_t number = 1; begin < text.size(); ++number) {
    size_t end = text.find('\n', begin);
    const bool complete = end != std::string::npos;
    if (!complete) end = text.size();
    const std::string line = text.substr(begin, end - begin);
    begin = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string label = path + " line " + std::to_string(number);
    Json value;
    try {
      value = parse_json(line, label);
    } catch (const FormatError& error) {
      // The writer flushes whole lines; a last line without its newline was cut off by a kill.
      if (complete) throw UserError(error.what(), hint);
      run.warnings.push_back(label + " is cut short (the run was killed while writing it) and was skipped");
      continue;
    }
    std::optional<MetricsLine> entry;
    try {
      entry = read_metrics_line(value, label);
    } catch (const FormatError& error) {
      throw UserError(error.what(), hint);
    }
    if (!entry) {
      ++ignored;  // a kind of line this reader does not know: leave it to newer readers
      continue;
    }
    auto& kept = entry->kind == MetricsLine::Kind::training ? steps : evaluations;
    if (kept.count(entry->step)) ++run.replaced_lines;
    kept[entry->step] = *entry;
  }
  for (const auto& [step, point] : steps) run.steps.push_back(point);
  for (const auto& [step, point] : evaluations) run.evaluations.push_back(point);
  if (ignored > 0)
    run.warnings.push_back(std::to_string(ignored) + " line(s) of " + path +
                           " are neither training steps (\"loss\") nor evaluations (\"eval_loss\") and were ignored");
  if (run.replaced_lines > 0)
    run.warnings.push_back(std::to_string(run.replaced_lines) + " line(s) of " + path +
                           " repeat an earlier step (the run was resumed from a checkpoint); the later line is used");
  if (run.steps.empty())
    throw UserError(path + ": holds no training step", "the run stopped before its first step finished; train longer");
}

// ---- memory.json ---------------------------------------------------------------------------------

void read_memory(const std::string& path, RunRecord& run) {
  const std::string hint = "the file is damaged; qlora train writes it again at the end of a run";
  const Json root = parse_json_file(path, hint);
  try {
    run.memory = cluster::parse_memory_reports(root, path);
  } catch (const FormatError& error) {
    throw UserError(error.what(), hint);
  }
}

// ---- formatting ----------------------------------------------------------------------------------

std::string escape_cell(std::string text) {
  std::string out;
  for (char c : text) {
    if (c == '|') out += "\\|";
    else if (c == '\n') out += ' ';
    else out += c;
  }
  return out;
}

std::string config_text(const Json& config, const std::string& key) {
  if (!config.contains(key)) return "";
  const auto& value = config.at(key);
  if (value.is_string()) return value.get<std::string>();
  return dump_json(value);
}

std::string loss_cell(double value) { return std::isfinite(value) ? format("%.4f", value) : "n/a"; }
std::string perplexity_cell(double loss) { return std::isfinite(loss) ? format("%.3f", std::exp(loss)) : "n/a"; }

// Bytes shown in one unit for a whole table or axis: the largest unit in which the largest value
// is at least 10, so that two decimals still tell the small parts apart.
struct ByteUnit {
  const char* name;
  double bytes;
};
ByteUnit unit_for(double largest) {
  if (largest >= 10.0 * 1024 * 1024 * 1024) return {"GiB", 1024.0 * 1024 * 1024};
  if (largest >= 10.0 * 1024 * 1024) return {"MiB", 1024.0 * 1024};
  return {"KiB", 1024.0};
}

double largest_memory_figure(const std::vector<cluster::MemoryReport>& reports) {
  double largest = 0;
  for (const auto& report : reports)
    for (const auto& field : cluster::memory_fields()) largest = std::max(largest, static_cast<double>(report.*field.member));
  return largest;
}

// Tokens and seconds summed over the steps that count for throughput: all but the first (which
// pays one-time costs) when there is more than one.
struct Throughput {
  int64_t first_step = 0;
  int64_t last_step = 0;
  double tokens = 0;
  double seconds = 0;
  double median_tokens_per_second = kMissing;
  double gather_wait_seconds = 0;
  double reduce_wait_seconds = 0;
  bool has_reduce_wait = false;
  bool known = false;
};

Throughput measure_throughput(const std::vector<MetricsLine>& steps) {
  Throughput result;
  const size_t from = steps.size() > 1 ? 1 : 0;
  std::vector<double> rates;
  for (size_t i = from; i < steps.size(); ++i) {
    const auto& step = steps[i];
    if (!std::isfinite(step.tokens_per_second) || !std::isfinite(step.step_seconds)) continue;
    if (!result.known) result.first_step = step.step;
    result.known = true;
    result.last_step = step.step;
    result.tokens += step.tokens_per_second * step.step_seconds;
    result.seconds += step.step_seconds;
    if (std::isfinite(step.gather_wait_seconds)) result.gather_wait_seconds += step.gather_wait_seconds;
    if (std::isfinite(step.reduce_wait_seconds)) {
      result.reduce_wait_seconds += step.reduce_wait_seconds;
      result.has_reduce_wait = true;
    }
    rates.push_back(step.tokens_per_second);
  }
  if (!rates.empty()) {
    std::sort(rates.begin(), rates.end());
    const size_t middle = rates.size() / 2;
    result.median_tokens_per_second =
        rates.size() % 2 ? rates[middle] : 0.5 * (rates[middle - 1] + rates[middle]);
  }
  return result;
}

}  // namespace

// ---- reading -------------------------------------------------------------------------------------

RunRecord load_run(const std::string& directory) {
  if (!fs::is_directory(directory))
    throw UserError("no such run folder: " + directory,
                    "give the folder `qlora train --out` wrote, e.g. qlora report runs/a");
  RunRecord run;
  run.directory = directory;
  const std::string metrics = directory + "/metrics.jsonl";
  if (!fs::is_regular_file(metrics))
    throw UserError(metrics + ": not found",
                    directory + " is not a run folder, or its run stopped before the first step "
                                "(qlora train writes metrics.jsonl there)");
  read_metrics(metrics, run);

  const std::string memory = directory + "/memory.json";
  if (fs::is_regular_file(memory)) read_memory(memory, run);
  else run.warnings.push_back(memory + " not found: the run did not finish (stopped or preempted), so there is no "
                              "per-rank memory report");

  const std::string config_hint = "the file is damaged; it records the options the run was started with";
  const std::string config = directory + "/config.json";
  const std::string config_resumed = directory + "/config-resumed.json";
  run.resumed = fs::is_regular_file(config_resumed);
  if (fs::is_regular_file(config)) run.config_file = config;
  else if (run.resumed) run.config_file = config_resumed;
  if (!run.config_file.empty()) run.config = parse_json_file(run.config_file, config_hint);
  if (!run.config.is_null() && !run.config.is_object())
    throw UserError(run.config_file + ": not a JSON object", config_hint);

  std::vector<std::pair<int64_t, std::string>> checkpoints;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(directory + "/checkpoints", error)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || name.rfind("step-", 0) != 0) continue;
    const std::string digits = name.substr(5);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;  // *.partial
    checkpoints.emplace_back(std::stoll(digits), name);
  }
  std::sort(checkpoints.begin(), checkpoints.end());
  for (const auto& [step, name] : checkpoints) run.checkpoints.push_back(name);
  run.has_final_adapter = fs::is_regular_file(directory + "/final/adapter_model.safetensors");
  return run;
}

// ---- report.md -----------------------------------------------------------------------------------

std::string report_markdown(const RunRecord& run, const ReportImages& images) {
  assert(!run.steps.empty());  // load_run refuses a run without steps
  std::ostringstream md;
  const auto& steps = run.steps;
  const auto& config = run.config;
  md << "# qlora run report: " << run.directory << "\n\n";
  md << "Written by `qlora report` from `" << run.directory << "`: " << steps.size() << " training step"
     << (steps.size() == 1 ? "" : "s") << " and " << run.evaluations.size() << " evaluation"
     << (run.evaluations.size() == 1 ? "" : "s") << " in metrics.jsonl"
     << (run.memory.empty() ? ", no memory.json" : ", memory of " + std::to_string(run.memory.size()) + " rank" +
                                                       (run.memory.size() == 1 ? "" : "s") + " in memory.json")
     << ".\n\n";
  for (const auto& warning : run.warnings) md << "> note: " << escape_cell(warning) << "\n>\n";
  if (!run.warnings.empty()) md << "\n";

  // -- the run at a glance
  md << "## Run\n\n| | |\n|---|---|\n";
  auto row = [&](const std::string& name, const std::string& value) {
    if (!value.empty()) md << "| " << name << " | " << escape_cell(value) << " |\n";
  };
  const std::string model = config_text(config, "model");
  row("model", config.is_null() ? "" : (model.empty() ? "embedded synthetic demo model" : model));
  const std::string data = config_text(config, "data");
  row("data", config.is_null() ? "" : (data.empty() ? "embedded Austen excerpt" : data));
  row("ranks", run.memory.empty() ? "" : std::to_string(run.memory.size()));
  const std::string configured_steps = config_text(config, "steps");
  row("steps", std::to_string(steps.back().step) + (configured_steps.empty() ? "" : " of " + configured_steps) +
                   (run.resumed ? " (resumed from a checkpoint)" : ""));
  if (config.contains("global-batch") && config.contains("seq-len")) {
    const int64_t batch = json_int(config, "global-batch", run.config_file);
    const int64_t length = json_int(config, "seq-len", run.config_file);
    row("global batch", format("%lld sequences x %lld tokens = %lld tokens per step", static_cast<long long>(batch),
                               static_cast<long long>(length), static_cast<long long>(batch * length)));
  }
  if (config.contains("lr"))
    row("learning rate", config_text(config, "lr") + ", " + config_text(config, "lr-schedule") + ", warmup " +
                             config_text(config, "warmup-steps") + " steps, weight decay " +
                             config_text(config, "weight-decay"));
  if (config.contains("lora-r"))
    row("LoRA", "r " + config_text(config, "lora-r") + ", alpha " + config_text(config, "lora-alpha") + ", dropout " +
                    config_text(config, "lora-dropout") + ", targets " + config_text(config, "lora-targets"));
  row("checkpointing", config_text(config, "checkpointing"));
  std::string saved;
  for (const auto& name : run.checkpoints) saved += (saved.empty() ? "" : ", ") + ("checkpoints/" + name);
  row("checkpoints", saved.empty() ? "none" : saved);
  row("final adapter", run.has_final_adapter ? "final/ (PEFT format)" : "none (the run did not finish)");

  // -- losses
  md << "\n## Loss\n\n| | step | loss | perplexity |\n|---|---:|---:|---:|\n";
  auto loss_row = [&](const std::string& name, const std::string& step, double loss) {
    md << "| " << name << " | " << step << " | " << loss_cell(loss) << " | " << perplexity_cell(loss) << " |\n";
  };
  const auto lowest = std::min_element(steps.begin(), steps.end(), [](const auto& a, const auto& b) {
    return (std::isfinite(a.loss) ? a.loss : INFINITY) < (std::isfinite(b.loss) ? b.loss : INFINITY);
  });
  loss_row("first training step", std::to_string(steps.front().step), steps.front().loss);
  loss_row("last training step", std::to_string(steps.back().step), steps.back().loss);
  loss_row("lowest training loss", std::to_string(lowest->step), lowest->loss);
  const size_t tail = std::max<size_t>(1, std::min<size_t>(10, steps.size()));
  double tail_sum = 0;
  for (size_t i = steps.size() - tail; i < steps.size(); ++i) tail_sum += steps[i].loss;
  loss_row("mean of the last " + std::to_string(tail) + " steps",
           std::to_string(steps[steps.size() - tail].step) + "-" + std::to_string(steps.back().step),
           tail_sum / static_cast<double>(tail));
  if (!run.evaluations.empty()) {
    const auto& evaluations = run.evaluations;
    const auto best = std::min_element(evaluations.begin(), evaluations.end(),
                                       [](const auto& a, const auto& b) { return a.loss < b.loss; });
    loss_row("first evaluation", std::to_string(evaluations.front().step), evaluations.front().loss);
    loss_row("last evaluation", std::to_string(evaluations.back().step), evaluations.back().loss);
    loss_row("best evaluation", std::to_string(best->step), best->loss);
  } else {
    md << "\nNo evaluation lines (the run had no held-out data: `--eval-fraction 0` and no `--eval-data`).\n";
  }
  md << "\nPerplexity is exp(loss), the loss being the mean next-token cross-entropy in nats.\n\n";
  md << "![loss curves](" << images.loss << ")\n";

  // -- throughput
  const Throughput throughput = measure_throughput(steps);
  md << "\n## Throughput\n\n";
  if (!throughput.known) {
    md << "No step timings in metrics.jsonl.\n";
  } else {
    md << "| | |\n|---|---|\n";
    const std::string span = throughput.first_step == throughput.last_step
                                 ? "step " + std::to_string(throughput.first_step)
                                 : "steps " + std::to_string(throughput.first_step) + "-" +
                                       std::to_string(throughput.last_step);
    md << "| tokens/s over all ranks (" << span << ") | "
       << format("%.1f", throughput.seconds > 0 ? throughput.tokens / throughput.seconds : 0.0) << " |\n";
    md << "| median tokens/s of a step | " << format("%.1f", throughput.median_tokens_per_second) << " |\n";
    const int64_t counted = throughput.last_step - throughput.first_step + 1;
    md << "| mean step time | " << format("%.4f s", throughput.seconds / static_cast<double>(std::max<int64_t>(counted, 1)))
       << " |\n";
    md << "| time in these steps | " << format("%.3f s", throughput.seconds) << " |\n";
    md << "| waiting on 4-bit gathers (rank 0) | "
       << format("%.3f s (%.1f%% of step time)", throughput.gather_wait_seconds,
                 throughput.seconds > 0 ? 100.0 * throughput.gather_wait_seconds / throughput.seconds : 0.0)
       << " |\n";
    if (throughput.has_reduce_wait)
      md << "| waiting on the gradient all-reduce (rank 0) | "
         << format("%.3f s (%.1f%% of step time)", throughput.reduce_wait_seconds,
                   throughput.seconds > 0 ? 100.0 * throughput.reduce_wait_seconds / throughput.seconds : 0.0)
         << " |\n";
    if (steps.back().peak_bytes_rank0 >= 0)
      md << "| allocator peak on rank 0 | "
         << format("%.2f MiB", static_cast<double>(steps.back().peak_bytes_rank0) / (1024.0 * 1024.0)) << " |\n";
    if (steps.size() > 1)
      md << "\nThe first step is left out of the throughput figures: it pays one-time costs (first gathers, "
            "allocator warm-up).\n";
  }
  if (!images.throughput.empty()) md << "\n![throughput](" << images.throughput << ")\n";
  if (!images.learning_rate.empty()) md << "\n![learning rate](" << images.learning_rate << ")\n";

  // -- memory
  md << "\n## Memory per rank\n\n";
  if (run.memory.empty()) {
    md << "No memory.json: it is written when a run finishes.\n";
  } else {
    const ByteUnit unit = unit_for(largest_memory_figure(run.memory));
    md << "Measured by the counting allocator, in " << unit.name
       << ". The activation peaks are above the resident state (weights, adapters, gradients, optimizer); "
          "peak total is the allocator's peak over the whole run.\n\n| rank |";
    for (const auto& field : cluster::memory_fields()) md << " " << field.description << " |";
    md << "\n|---:|";
    for (size_t i = 0; i < cluster::memory_fields().size(); ++i) md << "---:|";
    md << "\n";
    for (const auto& report : run.memory) {
      md << "| " << report.rank << " |";
      for (const auto& field : cluster::memory_fields())
        md << " " << format("%.2f", static_cast<double>(report.*field.member) / unit.bytes) << " |";
      md << "\n";
    }
    std::vector<double> lows, highs, means;
    for (const auto& field : cluster::memory_fields()) {
      double low = INFINITY, high = -INFINITY, sum = 0;
      for (const auto& report : run.memory) {
        const double value = static_cast<double>(report.*field.member);
        low = std::min(low, value);
        high = std::max(high, value);
        sum += value;
      }
      lows.push_back(low);
      highs.push_back(high);
      means.push_back(sum / static_cast<double>(run.memory.size()));
    }
    for (const auto& [statistic, values] : {std::make_pair("min", &lows), std::make_pair("max", &highs),
                                            std::make_pair("mean", &means)}) {
      md << "| **" << statistic << "** |";
      for (double value : *values) md << " " << format("%.2f", value / unit.bytes) << " |";
      md << "\n";
    }
    md << "\n![memory per rank](" << images.memory << ")\n";
  }

  // -- every option
  if (config.is_object()) {
    md << "\n## Configuration\n\n<details><summary>all options, as resolved by qlora train ("
       << fs::path(run.config_file).filename().string() << ")</summary>\n\n| option | value |\n|---|---|\n";
    for (const auto& [key, value] : config.items())
      md << "| " << escape_cell(key) << " | " << escape_cell(value.is_string() ? value.get<std::string>() : dump_json(value))
         << " |\n";
    md << "\n</details>\n";
  }
  return md.str();
}

// ---- images --------------------------------------------------------------------------------------

ReportImages write_report(const RunRecord& run, const std::string& out_dir) {
  std::error_code error;
  fs::create_directories(out_dir, error);
  if (error || !fs::is_directory(out_dir))
    throw UserError("cannot create the report folder " + out_dir, "check --out and the permissions of its parent");
  constexpr int kWidth = 960;
  ReportImages images;
  const auto& palette = plot::colors::palette;

  plot::LineChart loss;
  loss.title = "Loss";
  loss.x_label = "step";
  loss.y_label = "loss (mean next-token cross-entropy, nats)";
  plot::Series training{"training loss", palette[0], {}, {}, true, false};
  for (const auto& step : run.steps) {
    training.x.push_back(static_cast<double>(step.step));
    training.y.push_back(step.loss);
  }
  loss.series.push_back(training);
  // A trailing moving average shows the trend through per-batch noise on longer runs.
  if (run.steps.size() >= 40) {
    const size_t window = std::max<size_t>(5, run.steps.size() / 20);
    plot::Series average{"moving average of " + std::to_string(window) + " steps", palette[2], {}, {}, true, false};
    double sum = 0;
    size_t counted = 0;
    for (size_t i = 0; i < run.steps.size(); ++i) {
      sum += run.steps[i].loss;
      ++counted;
      if (counted > window) {
        sum -= run.steps[i - window].loss;
        --counted;
      }
      if (counted == window) {
        average.x.push_back(static_cast<double>(run.steps[i].step));
        average.y.push_back(sum / static_cast<double>(window));
      }
    }
    loss.series.push_back(average);
  }
  if (!run.evaluations.empty()) {
    plot::Series evaluation{"evaluation loss", palette[1], {}, {}, true, true};
    for (const auto& point : run.evaluations) {
      evaluation.x.push_back(static_cast<double>(point.step));
      evaluation.y.push_back(point.loss);
    }
    loss.series.push_back(evaluation);
  }
  images.loss = "loss.png";
  png::write_file(out_dir + "/" + images.loss, plot::render(loss, kWidth, 540).image());

  auto draw_step_chart = [&](const std::string& file, const std::string& title, const std::string& y_label,
                             const std::string& name, plot::Color color, double MetricsLine::*field) -> std::string {
    plot::LineChart chart;
    chart.title = title;
    chart.x_label = "step";
    chart.y_label = y_label;
    chart.y_from_zero = true;
    plot::Series series{name, color, {}, {}, true, false};
    for (const auto& step : run.steps) {
      if (!std::isfinite(step.*field)) continue;
      series.x.push_back(static_cast<double>(step.step));
      series.y.push_back(step.*field);
    }
    if (series.x.empty()) return "";
    chart.series.push_back(series);
    png::write_file(out_dir + "/" + file, plot::render(chart, kWidth, 400).image());
    return file;
  };
  images.throughput = draw_step_chart("throughput.png", "Throughput", "tokens/s (all ranks)", "tokens/s", palette[0],
                                      &MetricsLine::tokens_per_second);
  images.learning_rate = draw_step_chart("lr.png", "Learning rate", "learning rate", "learning rate", palette[4],
                                         &MetricsLine::learning_rate);

  if (!run.memory.empty()) {
    const ByteUnit unit = unit_for(largest_memory_figure(run.memory));
    plot::BarChart memory;
    memory.title = "Memory per rank (counting allocator)";
    memory.x_label = "rank";
    memory.y_label = unit.name;
    memory.segments = {"quantized weights", "replicated parameters", "adapters",      "gradients",
                       "optimizer state",   "gather buffers",        "activation peak"};
    memory.segment_colors.assign(palette, palette + memory.segments.size());
    memory.marker_name = "measured peak";
    for (const auto& report : run.memory) {
      memory.categories.push_back(std::to_string(report.rank));
      const int64_t activation = std::max(report.forward_activation_peak, report.backward_activation_peak);
      std::vector<double> values;
      for (int64_t bytes : {report.quantized_weights, report.replicated_parameters, report.adapters, report.gradients,
                            report.optimizer_state, report.gather_buffers, activation})
        values.push_back(static_cast<double>(bytes) / unit.bytes);
      memory.values.push_back(values);
      memory.markers.push_back(report.peak_total > 0 ? static_cast<double>(report.peak_total) / unit.bytes : kMissing);
    }
    images.memory = "memory.png";
    png::write_file(out_dir + "/" + images.memory, plot::render(memory, kWidth, 540).image());
  }

  write_file_atomically(out_dir + "/report.md", report_markdown(run, images));
  return images;
}

}  // namespace qlora::launcher
