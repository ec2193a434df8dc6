// The collective loading of --data with the model's own tokenizer: rank 0 tokenizes into the token
// cache while the others wait, then every rank opens the same token file.
#include "launcher/data_loading.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "common/log.h"
#include "data/chat_template.h"
#include "data/example_cache.h"
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

bool is_instruction_data(const std::string& data_path, const ExampleOptions& options) {
  if (data_path.empty()) return false;
  if (data::is_sft_data_path(data_path)) return true;
  if (options.format == data::DataFormat::automatic) return false;
  std::error_code error;
  if (std::filesystem::is_directory(data_path, error) || data::is_hdf5_file(data_path))
    throw UserError("--data-format " + data::data_format_name(options.format) + " applies to JSONL or JSON files, and " +
                        data_path + " is a " + (data::is_hdf5_file(data_path) ? "token file" : "folder"),
                    "drop --data-format to train on plain text or token files");
  return true;
}

namespace {

// Rank 0's part: the example file, built or reused, and its banner.
std::string prepare_example_file(const std::string& data_path, const ExampleOptions& options,
                                 const shard::ModelStore& store, bool quiet) {
  const shard::TokenizerSource source = shard::store_tokenizer_source(store);
  const auto tokenizer = data::load_tokenizer(source, store.path() + ": /tokenizer");
  const int64_t model_vocabulary = store.header().config.vocab_size;
  if (tokenizer->vocab_size() > model_vocabulary)
    throw UserError("the tokenizer of " + store.path() + " has " + std::to_string(tokenizer->vocab_size()) +
                    " tokens but the model's vocabulary only " + std::to_string(model_vocabulary));
  const std::optional<data::ChatTemplate> chat_template = data::chat_template_for(store, options.chat_template_path);
  data::ExampleRecipe recipe;
  recipe.format = options.format;
  recipe.train_on = options.train_on;
  recipe.tokenizer = tokenizer.get();
  recipe.tokenizer_checksum = source.checksum();
  if (chat_template) {
    recipe.template_source = chat_template->source();
    // transformers passes the tokenizer's special tokens to the template by name.
    Json variables = Json::object();
    variables["bos_token"] = tokenizer->bos_id() >= 0 ? tokenizer->decode({tokenizer->bos_id()}) : "";
    variables["eos_token"] = tokenizer->eos_id() >= 0 ? tokenizer->decode({tokenizer->eos_id()}) : "";
    recipe.render = [&chat_template, variables](const Json& messages, bool add_generation_prompt) {
      return chat_template->render(messages, add_generation_prompt, variables);
    };
  }
  const data::ExampleCacheResult cache = data::ensure_example_cache(data_path, recipe);
  if (!quiet) {
    char line[768];
    std::snprintf(line, sizeof line,
                  "data: %s (%s, train on %s%s%s) %s %s: %lld examples, %lld tokens, %lld counted in the loss (%.2f s)",
                  data_path.c_str(), cache.format.c_str(), cache.train_on.c_str(), chat_template ? ", template " : "",
                  chat_template ? chat_template->origin().c_str() : "", cache.built ? "tokenized into" : "reusing",
                  cache.path.c_str(), static_cast<long long>(cache.examples), static_cast<long long>(cache.tokens),
                  static_cast<long long>(cache.counted), cache.seconds);
    log::banner(line);
  }
  return cache.path;
}

}  // namespace

std::optional<std::vector<data::TokenizedExample>> load_data_examples(const std::string& data_path,
                                                                     const ExampleOptions& options,
                                                                     const shard::ModelStore& store,
                                                                     cluster::Communicator& communicator, bool quiet) {
  bool instruction = false;
  run_collectively(communicator, [&] {
    instruction = is_instruction_data(data_path, options);
    if (!instruction && (options.train_on == data::TrainOn::completion || options.train_on == data::TrainOn::assistant))
      throw UserError("--train-on " + data::train_on_name(options.train_on) +
                          " applies to instruction data (.jsonl or .json files), and " +
                          (data_path.empty() ? std::string("the embedded excerpt") : data_path) + " is plain text",
                      "drop --train-on, or give instruction data");
  });
  if (!instruction) return std::nullopt;
  std::string example_file;
  run_collectively(communicator, [&] {
    if (communicator.rank() == 0) example_file = prepare_example_file(data_path, options, store, quiet);
  });
  int64_t length = static_cast<int64_t>(example_file.size());
  communicator.broadcast(&length, sizeof length, 0);
  example_file.resize(static_cast<size_t>(length));
  communicator.broadcast(example_file.data(), length, 0);
  std::vector<data::TokenizedExample> examples;
  run_collectively(communicator, [&] { examples = data::read_example_file(example_file); });
  return examples;
}

}  // namespace qlora::launcher
