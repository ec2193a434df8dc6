// The one family of errors a user can cause (a bad flag, a missing or malformed file, a model that
// cannot be split or trained): every layer throws a UserError or a subclass, and the launcher turns
// any of them into one message with a hint and exit code 2. Bugs are asserts, not these.
#pragma once

#include <stdexcept>
#include <string>

namespace qlora {

constexpr int kExitUserError = 2;

struct UserError : std::runtime_error {
  explicit UserError(const std::string& message, std::string hint_text = "", bool already_reported = false)
      : std::runtime_error(message), hint(std::move(hint_text)), reported(already_reported) {}
  std::string hint;
  bool reported;  // true on ranks whose part of the report rank 0 prints
};

// A file whose bytes or fields contradict its format; the message names the file and, where it
// applies, the tensor or field.
struct FormatError : UserError {
  using UserError::UserError;
};

// A failure of the job itself that every rank detects together (e.g. replicas drifting apart):
// rank 0 reports it, every rank exits with kExitJobError.
constexpr int kExitJobError = 3;
struct JobError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace qlora
