// Checkpoints of a run: runs/NAME/checkpoints/step-K/ holds the adapter in PEFT's format and
// trainer_state.h5 (AdamW moments, step, seed, data cursor). Rank 0 writes into step-K.partial/ and
// renames it, so a directory named step-K is always complete; resume reads on rank 0 and broadcasts,
// so other nodes need not see the run folder.
#pragma once

#include <cstdint>
#include <string>

#include "cluster/communicator.h"
#include "launcher/optimizer.h"
#include "model/llama.h"

namespace qlora::launcher {

struct CheckpointInfo {
  int64_t step = 0;
  uint64_t seed = 0;
  int64_t global_batch = 0;
  int64_t sequence_length = 0;
};

// out_dir/checkpoints/step-K: where a run keeps the checkpoint of step K.
std::string checkpoint_directory(const std::string& out_dir, int64_t step);

// Rank 0 only. Writes directory/ atomically (through directory.partial/).
void save_checkpoint(const std::string& directory, model::LlamaModelImpl& model, const AdamW& optimizer,
                     const CheckpointInfo& info, const std::string& base_model);

// The newest complete checkpoints/step-K under out_dir, or "" when there is none.
std::string latest_checkpoint(const std::string& out_dir);

// Removes all but the newest `keep` checkpoints (keep <= 0 keeps everything).
void prune_checkpoints(const std::string& out_dir, int keep);

// Collective: rank 0 reads `directory`, every rank receives the adapters and optimizer state.
// Throws UserError when the checkpoint does not fit this model and adapter configuration.
CheckpointInfo load_checkpoint(const std::string& directory, cluster::Communicator& communicator,
                               model::LlamaModelImpl& model, AdamW& optimizer);

// Collective. Where a run starts: 0 when `resume` is "" (or "auto" finds no checkpoint under
// out_dir), else the step of the checkpoint it names ("auto": the newest complete one, chosen by
// rank 0), whose adapters and optimizer state are then loaded. Says on rank 0 what it did, and warns
// when `run` (this run's seed, global batch and sequence length) differs from the checkpoint's.
int64_t resume_training(const std::string& resume, const std::string& out_dir, const CheckpointInfo& run,
                        cluster::Communicator& communicator, model::LlamaModelImpl& model, AdamW& optimizer);

}  // namespace qlora::launcher
