// Implementation of the rank-aware log; whole lines are written with one call so ranks that share
// a terminal do not interleave mid-line.
#include "common/log.h"

#include <cstdio>

namespace qlora::log {
namespace {
int g_rank = 0;
int g_world = 1;

void write_line(FILE* stream, const std::string& prefix, const std::string& line) {
  const std::string tag = g_world > 1 ? "[rank " + std::to_string(g_rank) + "] " : "";
  const std::string text = tag + prefix + line + "\n";
  std::fwrite(text.data(), 1, text.size(), stream);
  std::fflush(stream);
}
}  // namespace

void set_rank(int rank, int world) {
  g_rank = rank;
  g_world = world;
}
int rank() { return g_rank; }
bool is_root() { return g_rank == 0; }

void banner(const std::string& line) {
  if (g_rank != 0) return;
  const std::string text = line + "\n";
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}
void info(const std::string& line) { write_line(stdout, "", line); }
void warn(const std::string& line) { write_line(stderr, "warning: ", line); }
void error(const std::string& line) { write_line(stderr, "error: ", line); }


}  // namespace qlora::log
