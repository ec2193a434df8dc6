// The collective loading of --data with the model's own tokenizer: rank 0 tokenizes into the token
// cache while the others wait, then every rank opens the same token file.
#include "launcher/data_loading.h"

#include <algorithm>
#include <cstdio>

#include "common/log.h"
#include "data/token_cache.h"
#include "data/tokenizer.h"
#include "launcher/demo.h"
#include "launcher/errors.h"

namespace qlora::launcher {

std::shared_ptr<data::TokenStream> load_data_tokens(const std::string& data_path, const shard::ModelStore& store,
                                                    cluster::Communicator& communicator, bool quiet) {
  const int64_t model_vocabulary = store.header().config.vocab_size;
  std::shared_ptr<data::TokenStream> stream;
  std::string token_file;
  // Rank 0 tokenizes (or checks the cache, or scans a foreign token file) while the others wait, for
  // as long as the corpus needs; everyone learns the file's path.
  const cluster::UnboundedWait tokenizing(communicator);
  run_collectively(communicator, [&] {
    if (!data_path.empty() && data::is_hdf5_file(data_path)) {
      token_file = data_path;
      return;
    }
    const bool tokenizes = data_path.empty() || communicator.rank() == 0;
    if (!tokenizes) return;
    const shard::TokenizerSource source = shard::store_tokenizer_source(store);
    const auto tokenizer = data::load_tokenizer(source, store.path() + ": /tokenizer");
    if (tokenizer->vocab_size() > model_vocabulary)
      throw UserError("the tokenizer of " + store.path() + " has " + std::to_string(tokenizer->vocab_size()) +
                      " tokens but the model's vocabulary only " + std::to_string(model_vocabulary));
    if (data_path.empty()) {
      stream = data::TokenStream::in_memory(tokenizer->encode(demo_text()));
      return;
    }
    const data::TokenCacheResult cache = data::ensure_token_cache(data_path, *tokenizer, source.checksum());
    token_file = cache.path;
    if (!quiet) {
      char line[512];
      std::snprintf(line, sizeof line, "data: %s %s %s (%lld tokens from %.1f MB of text, %s tokenizer, %.2f s, %.1f MB/s)",
                    data_path.c_str(), cache.built ? "tokenized into" : "reusing", cache.path.c_str(),
                    static_cast<long long>(cache.tokens), static_cast<double>(cache.source_bytes) / 1e6,
                    tokenizer->kind().c_str(), cache.seconds,
                    static_cast<double>(cache.source_bytes) / 1e6 / std::max(cache.seconds, 1e-9));
      log::banner(line);
    }
  });
  if (stream) return stream;
  int64_t length = static_cast<int64_t>(token_file.size());
  communicator.broadcast(&length, sizeof length, 0);
  token_file.resize(static_cast<size_t>(length));
  communicator.broadcast(token_file.data(), length, 0);
  run_collectively(communicator, [&] {
    stream = data::TokenStream::open_file(token_file);
    // Foreign token files are scanned once, by rank 0; qlora's own carry their largest id.
    int64_t largest = communicator.rank() == 0 ? stream->max_token() : 0;
    if (largest >= model_vocabulary)
      throw UserError(token_file + " holds token id " + std::to_string(largest) + ", outside the model's vocabulary of " +
                          std::to_string(model_vocabulary),
                      "tokenize the data with this model's tokenizer");
  });
  return stream;
}

}  // namespace qlora::launcher
