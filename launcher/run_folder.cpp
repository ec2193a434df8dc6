// Run folder checks, metrics reconciliation and run identity.
#include "launcher/run_folder.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/atomic_file.h"
#include "common/errors.h"
#include "common/json.h"
#include "common/log.h"

namespace qlora::launcher {
namespace {

namespace fs = std::filesystem;

// Everything `qlora train` (and `qlora report` inside the run folder) writes at the top of --out.
const char* const kRunEntries[] = {"metrics.jsonl", "checkpoints", "final", "final.partial", "config.json",
                                   "config-resumed.json", "memory.json"};

std::string unwritable_hint(int error_number) {
  if (error_number == ENOSPC || error_number == EDQUOT) return "the file system is full: free space or choose another --out";
  if (error_number == EROFS) return "the file system is read-only: choose another --out";
  return "choose a folder you can write, e.g. --out runs/NAME under your working directory";
}

// Creates out_dir (remembering which folders it had to create) and a probe file in it.
void probe_writable(const std::string& out_dir) {
  fs::path first_created;
  std::error_code error;
  for (fs::path ancestor = fs::absolute(out_dir, error); !ancestor.empty(); ancestor = ancestor.parent_path()) {
    if (fs::exists(ancestor, error)) break;
    first_created = ancestor;
    if (ancestor == ancestor.parent_path()) break;
  }
  if (fs::exists(out_dir, error) && !fs::is_directory(out_dir, error))
    throw UserError("--out " + out_dir + " exists and is not a folder", "choose a folder for the run");
  fs::create_directories(out_dir, error);
  if (error)
    throw UserError("--out " + out_dir + " cannot be created: " + error.message(), unwritable_hint(error.value()));
  const std::string probe = out_dir + "/.qlora-write-probe." + std::to_string(::getpid());
  const int descriptor = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  const int error_number = errno;
  bool wrote = descriptor >= 0 && ::write(descriptor, "q", 1) == 1;
  const int write_error = errno;
  if (descriptor >= 0) ::close(descriptor);
  ::unlink(probe.c_str());
  if (!first_created.empty()) fs::remove_all(first_created, error);  // leave no trace before the run starts
  if (descriptor < 0)
    throw UserError("--out " + out_dir + " is not writable: " + std::strerror(error_number), unwritable_hint(error_number));
  if (!wrote)
    throw UserError("--out " + out_dir + " is not writable: " + std::strerror(write_error), unwritable_hint(write_error));
}

// The "step" of one metrics line, or -1 for a line that does not parse (a cut-short last line).
int64_t step_of_line(const std::string& line) {
  try {
    const Json value = parse_json(line, "metrics line");
    if (value.is_object() && value.contains("step") && value["step"].is_number_integer()) return value["step"].get<int64_t>();
  } catch (const UserError&) {
  }
  return -1;
}

std::string join(const std::vector<std::string>& parts, const char* separator) {
  std::string joined;
  for (const auto& part : parts) joined += (joined.empty() ? "" : separator) + part;
  return joined;
}

}  // namespace

std::vector<std::string> run_files_in(const std::string& out_dir) {
  std::vector<std::string> found;
  std::error_code error;
  for (const char* entry : kRunEntries)
    if (fs::exists(fs::path(out_dir) / entry, error))
      found.push_back(std::string(entry) + (fs::is_directory(fs::path(out_dir) / entry, error) ? "/" : ""));
  return found;
}

void prepare_run_folder(const std::string& out_dir, const std::string& resume, bool overwrite) {
  if (overwrite && !resume.empty())
    throw UserError("--overwrite and --resume contradict each other",
                    "--resume continues the run in --out, --overwrite replaces it: pass one of them");
  probe_writable(out_dir);
  const auto existing = run_files_in(out_dir);
  if (existing.empty() || !resume.empty()) return;
  if (!overwrite)
    throw UserError("--out " + out_dir + " already holds another run (" + join(existing, ", ") + ")",
                    "continue it with --resume auto, replace it with --overwrite (removes its checkpoints, final "
                    "adapter and metrics), or choose another --out");
  std::error_code error;
  for (const char* entry : kRunEntries) {
    fs::remove_all(fs::path(out_dir) / entry, error);
    if (error)
      throw UserError("--overwrite: cannot remove " + (fs::path(out_dir) / entry).string() + ": " + error.message(),
                      "remove it yourself or choose another --out");
  }
  log::banner("--overwrite: removed the previous run's " + join(existing, ", ") + " from " + out_dir);
}

std::string reconcile_metrics(const std::string& out_dir, int64_t start_step) {
  const std::string path = out_dir + "/metrics.jsonl";
  std::ifstream file(path, std::ios::binary);
  if (!file) return "";
  std::string kept_lines;
  std::string line;
  bool has_later = false;
  bool any = false;
  while (std::getline(file, line)) {
    if (line.empty()) continue;
    any = true;
    const int64_t step = step_of_line(line);
    if (step >= 0 && step <= start_step) kept_lines += line + "\n";
    else has_later = true;
  }
  file.close();
  if (!any || (!has_later && start_step > 0)) return "";
  std::string saved = out_dir + "/metrics.before-step-" + std::to_string(start_step) + ".jsonl";
  std::error_code error;
  for (int copy = 1; fs::exists(saved, error); ++copy)
    saved = out_dir + "/metrics.before-step-" + std::to_string(start_step) + "." + std::to_string(copy) + ".jsonl";
  fs::copy_file(path, saved, error);
  if (error) throw UserError("cannot keep a copy of " + path + " as " + saved + ": " + error.message(),
                             "check free space and permissions of --out");
  write_file_atomically(path, kept_lines);
  log::banner("metrics.jsonl: lines after step " + std::to_string(start_step) +
              " belong to steps this run repeats; the previous file is kept as " + saved);
  return saved;
}

RunIdentity run_identity(const TrainOptions& options, const shard::ModelStore& store, int64_t data_tokens) {
  RunIdentity identity;
  const std::string& checksum = store.header().source_checksum;
  if (checksum.empty()) identity["model"] = options.model_path;
  else identity["model checksum"] = checksum;
  identity["data"] = options.data_path.empty() ? "(embedded excerpt)" : options.data_path;
  identity["data tokens"] = std::to_string(data_tokens);
  const model::LoraConfig& lora = options.lora;
  identity["lora r"] = std::to_string(lora.r);
  std::ostringstream alpha;
  alpha << lora.alpha;
  identity["lora alpha"] = alpha.str();
  identity["lora targets"] = join(lora.resolved_targets(), ",");
  std::string ranks;
  for (const auto& [key, rank] : lora.rank_pattern) ranks += (ranks.empty() ? "" : ",") + key + "=" + std::to_string(rank);
  identity["lora rank pattern"] = ranks;
  std::ostringstream alphas;
  for (const auto& [key, value] : lora.alpha_pattern) alphas << (alphas.tellp() > 0 ? "," : "") << key << "=" << value;
  identity["lora alpha pattern"] = alphas.str();
  identity["lora rslora"] = lora.use_rslora ? "true" : "false";
  identity["seed"] = std::to_string(options.seed);
  return identity;
}

ResumeMismatch parse_resume_mismatch(const std::string& value) {
  if (value == "refuse") return ResumeMismatch::refuse;
  if (value == "warn") return ResumeMismatch::warn;
  throw UserError("--resume-mismatch must be refuse or warn", "warn resumes a checkpoint of a different run anyway");
}

}  // namespace qlora::launcher
