// Rank-aware logging: banners and progress come from rank 0 untagged; every other line carries
// "[rank r]" so interleaved output from many ranks stays readable.
#pragma once

#include <string>

namespace qlora::log {

void set_rank(int rank, int world);
int rank();
bool is_root();

void banner(const std::string& line);   // rank 0 only, stdout
void info(const std::string& line);     // every rank, stdout, tagged when world > 1
void warn(const std::string& line);     // every rank, stderr, "warning: " and tagged
void error(const std::string& line);    // every rank, stderr, "error: " and tagged

}  // namespace qlora::log
