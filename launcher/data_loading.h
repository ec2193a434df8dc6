// Loading --data (or --eval-data) on every rank: the collective part of the data pipeline, on top
// of data/'s tokenizers, token caches and token streams.
#pragma once

#include <memory>
#include <string>

#include "cluster/communicator.h"
#include "data/token_stream.h"
#include "shard/model_store.h"

namespace qlora::launcher {

// The tokens of --data (or --eval-data) for the model in `store`, on every rank of `communicator`:
// an HDF5 token file is used as it is; text is tokenized by the store's tokenizer into a cached token
// file (see data/token_cache.h) by rank 0 while the others wait, then every rank opens it; an empty
// path tokenizes the embedded demo text in memory. Collective; user errors surface on every rank.
std::shared_ptr<data::TokenStream> load_data_tokens(const std::string& data_path, const shard::ModelStore& store,
                                                    cluster::Communicator& communicator, bool quiet = false);

}  // namespace qlora::launcher
