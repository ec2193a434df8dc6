// Errors a user can cause end in one message that names the thing, a hint, and exit code 2.
// Setup phases run "collectively": every rank runs the phase, then all agree whether any failed, so
// an error seen by one rank (a file missing on one node) ends every rank instead of hanging them.
#pragma once

#include <functional>
#include <stdexcept>
#include <string>

#include "cluster/communicator.h"

namespace qlora {

constexpr int kExitUserError = 2;

struct UserError : std::runtime_error {
  UserError(const std::string& message, std::string hint_text = "", bool already_reported = false)
      : std::runtime_error(message), hint(std::move(hint_text)), reported(already_reported) {}
  std::string hint;
  bool reported;  // true on ranks whose part of the report rank 0 prints
};

// A failure of the job itself that every rank detects together (e.g. replicas drifting apart):
// rank 0 reports it, every rank exits with kExitJobError.
constexpr int kExitJobError = 3;
struct JobError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Runs `phase` on every rank. If it throws a user-caused error (UserError, a format or preparation
// error) on any rank, every rank throws: rank 0 a UserError listing each distinct message with the
// ranks that saw it, the others a UserError marked reported. Other exceptions propagate unchanged.
void run_collectively(cluster::Communicator& communicator, const std::function<void()>& phase);

}  // namespace qlora
