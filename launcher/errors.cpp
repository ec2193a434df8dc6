// Agreement on setup failures across ranks.
#include "launcher/errors.h"

#include <map>
#include <vector>


namespace qlora {

void run_collectively(cluster::Communicator& communicator, const std::function<void()>& phase) {
  std::string failure;  // "message\x1fhint", empty when the phase succeeded
  try {
    phase();
  } catch (const UserError& error) {
    failure = std::string(error.what()) + '\x1f' + error.hint;
  }
  if (communicator.size() == 1) {
    if (failure.empty()) return;
    const auto separator = failure.find('\x1f');
    throw UserError(failure.substr(0, separator), failure.substr(separator + 1));
  }
  const auto records = communicator.gather_to_root(failure);
  int failed = 0;
  std::string message;
  std::string hint;
  if (communicator.rank() == 0) {
    std::map<std::string, std::vector<int>> ranks_by_failure;
    for (size_t rank = 0; rank < records.size(); ++rank)
      if (!records[rank].empty()) ranks_by_failure[records[rank]].push_back(static_cast<int>(rank));
    failed = ranks_by_failure.empty() ? 0 : 1;
    for (const auto& [record, ranks] : ranks_by_failure) {
      const auto separator = record.find('\x1f');
      if (!message.empty()) message += "\nerror: ";
      message += record.substr(0, separator);
      if (ranks.size() != records.size()) {
        message += " (rank" + std::string(ranks.size() > 1 ? "s" : "");
        for (size_t i = 0; i < ranks.size(); ++i) message += (i ? "," : " ") + std::to_string(ranks[i]);
        message += ")";
      }
      if (hint.empty()) hint = record.substr(separator + 1);
    }
  }
  communicator.broadcast(&failed, sizeof failed, 0);
  if (!failed) return;
  if (communicator.rank() == 0) throw UserError(message, hint);
  throw UserError("setup failed", "", /*already_reported=*/true);
}

}  // namespace qlora
