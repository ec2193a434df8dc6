// Step lines and the terminal progress bar.
#include "launcher/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "common/log.h"

namespace qlora::launcher {
namespace {

std::string format_duration(double seconds) {
  const int64_t total = static_cast<int64_t>(seconds + 0.5);
  char text[32];
  if (total >= 3600)
    std::snprintf(text, sizeof text, "%lld:%02lld:%02lld", static_cast<long long>(total / 3600),
                  static_cast<long long>(total / 60 % 60), static_cast<long long>(total % 60));
  else
    std::snprintf(text, sizeof text, "%lld:%02lld", static_cast<long long>(total / 60), static_cast<long long>(total % 60));
  return text;
}

// mpirun hands its ranks a pseudo-terminal even when its own output goes to a file, so a rank's
// isatty() says nothing under a launcher: draw the bar only for a plain process on a terminal.
bool draws_on_a_terminal() {
  return isatty(fileno(stdout)) != 0 && std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr &&
         std::getenv("SLURM_STEP_ID") == nullptr;
}

}  // namespace

Progress::Progress(int64_t first_step, int64_t steps, bool enabled, const std::string& style)
    : first_step_(first_step), steps_(steps), enabled_(enabled && log::is_root()),
      terminal_(style == "bar" || (style == "auto" && draws_on_a_terminal())), start_(std::chrono::steady_clock::now()) {}

void Progress::step(int64_t step, double loss, double learning_rate, double tokens_per_second, double step_seconds) {
  if (!enabled_) return;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = elapsed / static_cast<double>(step - first_step_) * static_cast<double>(steps_ - step);
  char line[256];
  if (terminal_) {
    const int width = 24;
    const int filled = static_cast<int>(width * step / std::max<int64_t>(1, steps_));
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(width, '.');
    std::snprintf(line, sizeof line, "\r[%s] step %lld/%lld  loss %.4f  lr %.2e  %.0f tokens/s  ETA %s   ",
                  bar.c_str(), static_cast<long long>(step), static_cast<long long>(steps_), loss, learning_rate,
                  tokens_per_second, format_duration(eta).c_str());
    std::fputs(line, stdout);
    if (step == steps_) std::fputs("\n", stdout);
    std::fflush(stdout);
  } else {
    std::snprintf(line, sizeof line, "step %4lld/%lld  loss %.4f  lr %.2e  %8.0f tokens/s  %.3f s/step  ETA %s",
                  static_cast<long long>(step), static_cast<long long>(steps_), loss, learning_rate,
                  tokens_per_second, step_seconds, format_duration(eta).c_str());
    log::banner(line);
  }
}

void Progress::message(const std::string& text) {
  if (!log::is_root()) return;
  if (enabled_ && terminal_) std::fputs("\n", stdout);
  log::banner(text);
}

}  // namespace qlora::launcher
