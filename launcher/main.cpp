// Entry point of the `qlora` binary: initialises MPI (any launcher, or none), dispatches the
// subcommand, and turns user-caused errors into one message and exit code 2 on every rank. A rank
// that ends with an error reports it to the others (the fault watchdog), so an error only it saw
// ends them too, with its message, instead of leaving them waiting in a collective.
#include <mpi.h>

#include <csignal>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "common/log.h"
#include "cluster/mpi_communicator.h"
#include "cluster/rank_layout.h"
#include "launcher/commands.h"
#include "launcher/errors.h"
#include "launcher/train.h"
#include "model/llama.h"
#include "prepare/prepare.h"
#include "shard/safetensors.h"

namespace {

void report_user_error(const std::string& message, const std::string& hint) {
  if (!qlora::log::is_root()) return;  // every rank saw it; say it once
  std::string text = "error: " + message + "\n";
  if (!hint.empty()) text += "hint: " + hint + "\n";
  std::fputs(text.c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace

int main(int argc, char** argv) {
  // Every write is checked, so a file-size limit (ulimit -f) must surface as that write's error,
  // naming the file, rather than kill the process with SIGXFSZ midway through a checkpoint.
  std::signal(SIGXFSZ, SIG_IGN);
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int exit_code = 0;
  {
    auto layout = qlora::cluster::discover_rank_layout(MPI_COMM_WORLD);
    qlora::log::set_rank(layout.rank, layout.world);
    auto communicator = qlora::cluster::make_mpi_communicator(MPI_COMM_WORLD);
    qlora::launcher::CommandContext context{*communicator, layout, MPI_COMM_WORLD};

    const std::string command = argc > 1 ? argv[1] : "";
    std::vector<std::string> arguments(argv + (argc > 1 ? 2 : 1), argv + argc);
    try {
      if (command == "train") {
        exit_code = qlora::launcher::run_train(arguments, context);
      } else if (command == "convert") {
        exit_code = qlora::launcher::run_convert(arguments, context);
      } else if (command == "eval") {
        exit_code = qlora::launcher::run_eval(arguments, context);
      } else if (command == "plan") {
        exit_code = qlora::launcher::run_plan(arguments, context);
      } else if (command == "inspect") {
        exit_code = qlora::launcher::run_inspect(arguments, context);
      } else if (command == "generate") {
        exit_code = qlora::launcher::run_generate(arguments, context);
      } else if (command == "report") {
        exit_code = qlora::launcher::run_report(arguments, context);
      } else if (command == "merge") {
        exit_code = qlora::launcher::run_merge(arguments, context);
      } else if (command == "--help" || command == "-h" || command == "help") {
        if (layout.rank == 0) std::cout << qlora::launcher::usage();
      } else {
        report_user_error(command.empty() ? "no command given" : "unknown command '" + command + "'",
                          "commands are train, convert, eval, generate, inspect, plan, report, merge; see `qlora --help`");
        exit_code = qlora::kExitUserError;
      }
    } catch (const qlora::UserError& error) {
      if (!error.reported) report_user_error(error.what(), error.hint);
      exit_code = qlora::kExitUserError;
      communicator->report_failure(error.what(), exit_code);
    } catch (const qlora::launcher::Preempted& error) {
      // Every rank stops together after the checkpoint barrier: a goodbye, not a failure.
      exit_code = qlora::launcher::kExitPreempted;
    } catch (const qlora::JobError& error) {
      report_user_error(error.what(), "");
      exit_code = qlora::kExitJobError;
      communicator->report_failure(error.what(), exit_code);
    } catch (const std::exception& error) {
      // Not a user error: a bug or a system failure on this rank. End every rank now rather than
      // leave the others waiting in a collective.
      qlora::log::error(std::string("internal error: ") + error.what());
      communicator->report_failure(std::string("internal error: ") + error.what(), 1);
      communicator->abort(1);
    }
  }
  MPI_Finalize();
  return exit_code;
}
