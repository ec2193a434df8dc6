// Checkpoints of a run: runs/NAME/checkpoints/step-K/ holds the adapter in PEFT's format,
// trainer_state.h5 (AdamW moments, step, seed, data cursor) and checkpoint.json, a manifest written
// last with each file's size and checksum and the run's identity (model, data, LoRA shape, seed).
// Rank 0 writes into step-K.partial/, reads every file back against its checksum, and only then
// renames it, so a directory named step-K with a manifest is complete; a failed save removes its
// partial folder. Resume reads on rank 0 and broadcasts, so other nodes need not see the run folder.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "cluster/communicator.h"
#include "launcher/optimizer.h"
#include "model/llama.h"

namespace qlora::launcher {

// What makes a checkpoint belong to a run: "model", "model checksum", "data", "data tokens",
// "lora r", "lora alpha", "lora targets", ..., "seed" -> their values as text. Resuming with any of
// them different is refused unless the user says otherwise.
using RunIdentity = std::map<std::string, std::string>;

struct CheckpointInfo {
  int64_t step = 0;
  uint64_t seed = 0;
  int64_t global_batch = 0;
  int64_t sequence_length = 0;
  RunIdentity identity;
};

// How resume treats a checkpoint whose identity differs from this run's.
enum class ResumeMismatch { refuse, warn };

// out_dir/checkpoints/step-K: where a run keeps the checkpoint of step K.
std::string checkpoint_directory(const std::string& out_dir, int64_t step);

// Rank 0 only. Writes directory/ atomically (through directory.partial/) and verifies it by reading
// it back. On any failure (full disk included) removes the partial folder and throws UserError
// naming the checkpoint, the reason and a hint; the checkpoints written before stay intact.
void save_checkpoint(const std::string& directory, model::LlamaModelImpl& model, const AdamW& optimizer,
                     const CheckpointInfo& info, const std::string& base_model);

// Rank 0 only: the run's final adapter, written to out_dir/final.partial, then renamed to final.
void save_final_adapter(const std::string& out_dir, model::LlamaModelImpl& model, const model::LoraConfig& lora,
                        const std::string& base_model);

// Why `directory` is not a usable checkpoint ("" when it is): a missing manifest or file, a size or
// checksum that differs from the manifest. Reads every file once.
std::string checkpoint_problem(const std::string& directory);

// The complete checkpoints/step-K folders under out_dir (manifest present), oldest first.
std::vector<std::pair<int64_t, std::string>> complete_checkpoints(const std::string& out_dir);

// The newest checkpoint under out_dir that verifies (checkpoint_problem), or "" when there is none;
// `skipped` receives one line per newer checkpoint passed over, with the reason.
std::string latest_checkpoint(const std::string& out_dir, std::vector<std::string>* skipped = nullptr);

// Removes all but the newest `keep` complete checkpoints (keep <= 0 keeps everything).
void prune_checkpoints(const std::string& out_dir, int keep);

// The differences between a checkpoint's identity and this run's, one "name: checkpoint X, this run
// Y" line each; empty when they match.
std::vector<std::string> identity_differences(const RunIdentity& checkpoint, const RunIdentity& run);

// Collective: rank 0 reads `directory`, every rank receives the adapters and optimizer state.
// Throws UserError when the checkpoint does not verify, does not fit this model and adapter
// configuration, or (with ResumeMismatch::refuse) was written by a run with another identity.
CheckpointInfo load_checkpoint(const std::string& directory, cluster::Communicator& communicator,
                               model::LlamaModelImpl& model, AdamW& optimizer, const CheckpointInfo& run,
                               ResumeMismatch mismatch);

// Collective. Where a run starts: 0 when `resume` is "" (or "auto" finds no checkpoint under
// out_dir), else the step of the checkpoint it names ("auto": the newest one that verifies, chosen
// by rank 0, which says which newer ones it skipped and why), whose adapters and optimizer state are
// then loaded. Warns when the seed-independent schedule (global batch, sequence length) differs.
int64_t resume_training(const std::string& resume, const std::string& out_dir, const CheckpointInfo& run,
                        cluster::Communicator& communicator, model::LlamaModelImpl& model, AdamW& optimizer,
                        ResumeMismatch mismatch = ResumeMismatch::refuse);

}  // namespace qlora::launcher
