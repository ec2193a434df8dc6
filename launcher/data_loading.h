// Loading --data (or --eval-data) on every rank: the collective part of the data pipeline, on top
// of data/'s tokenizers, token caches and token streams.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cluster/communicator.h"
#include "data/examples.h"
#include "data/sft_dataset.h"
#include "data/sft_examples.h"
#include "data/token_stream.h"
#include "shard/model_store.h"

namespace qlora::launcher {

// The tokens of --data (or --eval-data) for the model in `store`, on every rank of `communicator`:
// an HDF5 token file is used as it is; text is tokenized by the store's tokenizer into a cached token
// file (see data/token_cache.h) by rank 0 while the others wait, then every rank opens it; an empty
// path tokenizes the embedded demo text in memory. Collective; user errors surface on every rank.
std::shared_ptr<data::TokenStream> load_data_tokens(const std::string& data_path, const shard::ModelStore& store,
                                                    cluster::Communicator& communicator, bool quiet = false);

// How instruction data (.jsonl / .json) becomes examples: --data-format, --train-on, --chat-template.
struct ExampleOptions {
  data::DataFormat format = data::DataFormat::automatic;
  data::TrainOn train_on = data::TrainOn::automatic;
  std::string chat_template_path;  // empty: the template stored in the model
};

// True when `data_path` is read as instruction data: a .jsonl or .json file, or any file once
// --data-format names a format. False for text, folders and HDF5 token files (load_data_tokens).
bool is_instruction_data(const std::string& data_path, const ExampleOptions& options);

// The tokenized examples of instruction data at `data_path` for the model in `store`, on every rank:
// rank 0 reads, renders (chat template: options.chat_template_path, else the model's), tokenizes and
// masks them into a cached example file (data/example_cache.h) while the others wait, then every rank
// reads it. std::nullopt for plain-text sources, which load_data_tokens reads. Collective; user errors
// (a malformed record, a missing template, --train-on that does not fit the data) surface on every rank.
std::optional<std::vector<data::TokenizedExample>> load_data_examples(const std::string& data_path,
                                                                     const ExampleOptions& options,
                                                                     const shard::ModelStore& store,
                                                                     cluster::Communicator& communicator,
                                                                     bool quiet = false);

}  // namespace qlora::launcher
