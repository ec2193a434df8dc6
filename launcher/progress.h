// What a training run shows while it runs: one line per step in logs, or a bar redrawn in place on
// a terminal, with loss, learning rate, throughput and the time left. Rank 0 only.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace qlora::launcher {

class Progress {
 public:
  // `style`: auto (a bar on a terminal, lines otherwise) | bar | lines. `enabled` false: no step lines.
  Progress(int64_t first_step, int64_t steps, bool enabled, const std::string& style);

  // `step` is 1-based (the step just finished).
  void step(int64_t step, double loss, double learning_rate, double tokens_per_second, double step_seconds);

  // A line that interrupts the bar starts on a fresh line.
  void message(const std::string& text);

 private:
  int64_t first_step_;
  int64_t steps_;
  bool enabled_;
  bool terminal_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace qlora::launcher
