// The metrics.jsonl schema: writing and strictly reading its lines.
#include "launcher/metrics.h"

#include <cmath>

namespace qlora::launcher {
namespace {

double number_or_missing(const Json& value, const std::string& key, const std::string& label) {
  const auto found = value.find(key);
  if (found == value.end()) return MetricsLine::kMissing;
  if (!found->is_number()) throw FormatError(label + ": \"" + key + "\" is not a number");
  return found->get<double>();
}

// Fields a line does not have (NaN, or a negative byte count) are left out rather than written as null.
void put(Json& json, const char* key, double value) {
  if (std::isfinite(value)) json[key] = value;
}

}  // namespace

Json metrics_json(const MetricsLine& line) {
  Json json;
  json["step"] = line.step;
  if (line.kind == MetricsLine::Kind::evaluation) {
    put(json, "eval_loss", line.loss);
    put(json, "eval_perplexity", line.perplexity);
    return json;
  }
  put(json, "loss", line.loss);
  put(json, "lr", line.learning_rate);
  put(json, "grad_norm", line.gradient_norm);
  put(json, "tokens_per_second", line.tokens_per_second);
  put(json, "step_seconds", line.step_seconds);
  put(json, "gather_wait_seconds", line.gather_wait_seconds);
  put(json, "reduce_wait_seconds", line.reduce_wait_seconds);
  put(json, "communication_seconds", line.reduce_wait_seconds + line.gather_wait_seconds);
  if (line.peak_bytes_rank0 >= 0) json["peak_bytes_rank0"] = line.peak_bytes_rank0;
  return json;
}

std::optional<MetricsLine> read_metrics_line(const Json& value, const std::string& label) {
  if (!value.is_object()) throw FormatError(label + ": not a JSON object");
  const auto step = value.find("step");
  if (step == value.end() || !step->is_number()) throw FormatError(label + ": no numeric \"step\"");
  int64_t step_number = 0;
  try {
    step_number = json_as_int(*step, "step");
  } catch (const FormatError&) {
    throw FormatError(label + ": \"step\" is not an integer");
  }
  if (step_number < 0) throw FormatError(label + ": \"step\" is negative");
  MetricsLine read;
  read.step = step_number;
  if (value.contains("eval_loss")) {
    read.kind = MetricsLine::Kind::evaluation;
    read.loss = number_or_missing(value, "eval_loss", label);
    read.perplexity = value.contains("eval_perplexity") ? number_or_missing(value, "eval_perplexity", label)
                                                        : std::exp(read.loss);
    return read;
  }
  if (!value.contains("loss")) return std::nullopt;
  read.loss = number_or_missing(value, "loss", label);
  read.learning_rate = number_or_missing(value, "lr", label);
  read.gradient_norm = number_or_missing(value, "grad_norm", label);
  read.tokens_per_second = number_or_missing(value, "tokens_per_second", label);
  read.step_seconds = number_or_missing(value, "step_seconds", label);
  read.gather_wait_seconds = number_or_missing(value, "gather_wait_seconds", label);
  read.reduce_wait_seconds = number_or_missing(value, "reduce_wait_seconds", label);
  const double peak = number_or_missing(value, "peak_bytes_rank0", label);
  read.peak_bytes_rank0 = std::isfinite(peak) ? static_cast<int64_t>(peak) : -1;
  return read;
}

MetricsFile::MetricsFile(const std::string& path, bool append)
    : file_(path, append ? std::ios::app : std::ios::trunc), path_(path) {
  if (!file_.is_open()) throw UserError("cannot open " + path + " for writing", "check free space and permissions of --out");
}

void MetricsFile::write(const MetricsLine& line) {
  if (path_.empty()) return;
  file_ << dump_json(metrics_json(line)) << "\n" << std::flush;
  if (!file_.good())
    throw UserError("cannot append step " + std::to_string(line.step) + " to " + path_ + " (disk full?)",
                    "free space on the file system of --out; the checkpoints saved before are intact (--resume auto)");
}

}  // namespace qlora::launcher
