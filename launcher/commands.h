// The subcommands of the `qlora` binary. Each returns the process exit code and throws UserError
// (or a layer's format/prepare error) for anything the user can fix.
#pragma once

#include <string>
#include <vector>

#include "cluster/communicator.h"
#include "cluster/rank_layout.h"

namespace qlora::launcher {

struct CommandContext {
  cluster::Communicator& communicator;
  cluster::RankLayout& layout;
  MPI_Comm comm;
};

int run_convert(const std::vector<std::string>& arguments, CommandContext& context);
int run_train(const std::vector<std::string>& arguments, CommandContext& context);
int run_eval(const std::vector<std::string>& arguments, CommandContext& context);
int run_plan(const std::vector<std::string>& arguments, CommandContext& context);
int run_inspect(const std::vector<std::string>& arguments, CommandContext& context);
int run_generate(const std::vector<std::string>& arguments, CommandContext& context);
int run_report(const std::vector<std::string>& arguments, CommandContext& context);
// Defined in launcher/merge.cpp.
int run_merge(const std::vector<std::string>& arguments, CommandContext& context);

std::string usage();

}  // namespace qlora::launcher
