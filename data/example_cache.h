// Example files (HDF5): instruction data tokenized once, with its loss masks, kept next to its source
// (chats.jsonl -> chats.jsonl.examples.h5) or in the token-cache folder when that is not writable.
// Datasets: tokens int32 [T], counted uint8 [T], offsets int64 [E + 1] (example i is
// [offsets[i], offsets[i+1])). The root attribute `key` is a checksum of everything the result
// depends on: the data's bytes, --data-format, --train-on, the chat template's source and the
// tokenizer; a file whose key differs is rebuilt. Files are written to a .partial name, then renamed.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/examples.h"
#include "data/sft_dataset.h"
#include "data/sft_examples.h"
#include "data/tokenizer.h"

namespace qlora::data {

// What the examples of a data file are made with.
struct ExampleRecipe {
  DataFormat format = DataFormat::automatic;
  TrainOn train_on = TrainOn::automatic;
  const Tokenizer* tokenizer = nullptr;
  std::string tokenizer_checksum;
  std::string template_source;       // "" when there is no chat template
  ConversationRenderer render;       // empty when there is no chat template
};

struct ExampleCacheResult {
  std::string path;           // the example file to read
  bool built = false;         // false: an up-to-date file was reused
  double seconds = 0.0;       // checking (and reading, tokenizing, writing)
  std::string format;         // the data format, as detected or forced ("messages", ...)
  std::string train_on;       // the mask applied ("all", "completion", "assistant")
  int64_t examples = 0;
  int64_t tokens = 0;
  int64_t counted = 0;        // tokens the loss predicts
  uint64_t source_bytes = 0;
};

std::string example_cache_path(const std::string& data_path);
std::string fallback_example_cache_path(const std::string& data_path);

// Returns an up-to-date example file for the instruction data at `data_path`, building it when
// missing or stale (errors in the data or the template propagate; no file is left behind).
ExampleCacheResult ensure_example_cache(const std::string& data_path, const ExampleRecipe& recipe);

// Writes examples atomically (tests, and the cache above). `attributes` become string attributes.
void write_example_file(const std::string& path, const std::vector<TokenizedExample>& examples,
                        const std::vector<std::pair<std::string, std::string>>& attributes);

// Reads an example file; throws FormatError for a file that is not one or is damaged.
std::vector<TokenizedExample> read_example_file(const std::string& path);

}  // namespace qlora::data
