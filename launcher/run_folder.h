// The run folder (--out) as a thing a user can get wrong: checked writable before anything is
// loaded, never silently reused by another run, its metrics.jsonl never silently truncated; and the
// identity a run records in its checkpoints so that a resume can tell whether it continues the same run.
#pragma once

#include <cstdint>
#include <string>

#include "launcher/checkpoint.h"
#include "launcher/train.h"
#include "shard/model_store.h"

namespace qlora::launcher {

// Rank 0, before the model is loaded. Throws UserError (exit 2) when --out cannot be created or
// written (a probe file is created and removed; folders it had to create are removed again), or
// when it holds another run (metrics.jsonl, checkpoints/, final/, config.json) and this one neither
// resumes it nor overwrites it. With `overwrite`, removes that run's files (only the files a qlora
// run writes; anything else in the folder stays) and says what it removed.
void prepare_run_folder(const std::string& out_dir, const std::string& resume, bool overwrite);

// The entries of a qlora run found in out_dir ("metrics.jsonl", "checkpoints/", ...); empty when none.
std::vector<std::string> run_files_in(const std::string& out_dir);

// Rank 0, once the start step is known: metrics.jsonl keeps only lines up to `start_step`; when it
// held later lines (or any line, for a fresh start), the whole previous file is first kept as
// metrics.before-step-K[.N].jsonl and a banner says so. Returns the path kept ("" when none was).
std::string reconcile_metrics(const std::string& out_dir, int64_t start_step);

// This run's identity for its checkpoints: the model (its source checksum, else its path), the data
// (path and token count), the LoRA shape (r, alpha, targets, patterns, rsLoRA) and the seed.
RunIdentity run_identity(const TrainOptions& options, const shard::ModelStore& store, int64_t data_tokens);

// --resume-mismatch's value: "refuse" (default) or "warn". Throws UserError for anything else.
ResumeMismatch parse_resume_mismatch(const std::string& value);

}  // namespace qlora::launcher
