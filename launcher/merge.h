// `qlora merge`: folds a LoRA adapter into its base model and writes a standalone model — a Hugging
// Face folder (config, generation config, tokenizer files, safetensors shards with an index) or a
// llama.cpp GGUF file — streaming one tensor at a time, the ranks of an mpirun job each writing their
// own tensors at precomputed offsets, atomically (a temporary name renamed at the end).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cluster/communicator.h"

namespace qlora::launcher {

struct MergeOptions {
  std::string model_path;        // model store (model.h5)
  std::string adapter_dir;       // PEFT adapter folder; empty: the base model alone (a dequantized export)
  std::string out;               // hf: a folder; gguf: a file
  std::string format = "hf";     // hf | gguf
  std::string dtype = "auto";    // hf output dtype: auto (the config's torch_dtype) | bf16 | fp16 | fp32
  int64_t max_shard_bytes = 5'000'000'000;   // hf: larger models are split into shards of at most this
  std::string gguf_type = "f16"; // gguf matrices: f16 | bf16 | q8_0 (norms are always F32)
  bool progress = true;          // a line redrawn on a terminal (rank 0)
};

struct MergeSummary {
  int64_t tensors = 0;            // tensors written
  int64_t parameters = 0;
  int64_t merged_modules = 0;     // linears the adapter changed
  uint64_t bytes = 0;             // bytes written, all files
  std::vector<std::string> files; // what the output holds (names inside the folder, or the file)
  double seconds = 0;
  int64_t peak_rss_bytes = 0;     // the largest peak resident set over the ranks
  std::string output_dtype;       // "bfloat16", ..., or the GGUF matrix type ("Q8_0")
};

// Collective: every rank of `communicator` calls it. UserError (exit 2) for a bad option, an
// unreadable or mismatched adapter, an existing output, or a failed write (disk full); nothing is
// then left under the final name.
MergeSummary run_merge(const MergeOptions& options, cluster::Communicator& communicator);

}  // namespace qlora::launcher
