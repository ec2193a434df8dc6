// Loading --data for a model on every rank: the store's own tokenizer (refused when it outgrows the
// model's vocabulary), pre-tokenized HDF5 files used as they are, and byte tokens for synthetic stores.
#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>
#include <fstream>

#include "cluster/mpi_communicator.h"
#include "common/errors.h"
#include "data/token_cache.h"
#include "data/token_stream.h"
#include "launcher/data_loading.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

namespace fs = std::filesystem;
using testing_support::source_dir;
using testing_support::write_file;

std::vector<int64_t> all_tokens(const data::TokenStream& stream) {
  std::vector<int64_t> tokens(static_cast<size_t>(stream.size()));
  stream.read(0, stream.size(), tokens.data());
  return tokens;
}

TEST(LoadDataTokens, UsesTheStoresTokenizerAndAcceptsPreTokenizedFiles) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "load";
  fs::create_directories(folder);
  // A store with an embedded tokenizer.json: the Llama model fixture plus the fixture tokenizer.
  const fs::path hf = folder / "hf";
  fs::create_directories(hf);
  for (const auto& entry : fs::directory_iterator(source_dir() + "/tests/fixtures/model/llama/hf"))
    fs::copy_file(entry.path(), hf / entry.path().filename(), fs::copy_options::overwrite_existing);
  fs::copy_file(source_dir() + "/tests/fixtures/tokenizers/austen_bpe.json", hf / "tokenizer.json");
  const std::string store_path = (folder / "model.h5").string();
  shard::convert_hf_directory(hf.string(), store_path, shard::ConvertOptions{});
  const auto store = shard::ModelStore::open(store_path);
  const std::string text = "It is a truth universally acknowledged. 1811!\n";
  write_file(folder / "data.txt", text);

  // The fixture model has 300 embedding rows, the tokenizer 1024 ids: refused before any training.
  ASSERT_EQ(store->header().tokenizer, "tokenizer.json");
  try {
    load_data_tokens((folder / "data.txt").string(), *store, *communicator, true);
    ADD_FAILURE() << "a tokenizer larger than the model's vocabulary was accepted";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find("has 1024 tokens but the model's vocabulary only 300"), std::string::npos)
        << error.what();
  }

  // Pre-tokenized input is used as it is; ids outside the vocabulary are refused.
  const std::string synthetic = testing_support::synthetic_store("micro", 64, MPI_COMM_SELF);
  const auto micro = shard::ModelStore::open(synthetic);
  const std::string good = (folder / "good.h5").string();
  data::write_token_file(good, {1, 2, 3, 511}, "x", "bytes", "x");
  EXPECT_EQ(all_tokens(*load_data_tokens(good, *micro, *communicator, true)), (std::vector<int64_t>{1, 2, 3, 511}));
  const std::string bad = (folder / "bad.h5").string();
  data::write_token_file(bad, {1, 2, 512}, "x", "bytes", "x");
  try {
    load_data_tokens(bad, *micro, *communicator, true);
    ADD_FAILURE() << "token id 512 accepted for a 512-token vocabulary";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find(bad + " holds token id 512"), std::string::npos) << error.what();
  }
  // A synthetic store tokenizes text as bytes, with no end-of-text token.
  EXPECT_EQ(all_tokens(*load_data_tokens((folder / "data.txt").string(), *micro, *communicator, true)),
            data::byte_tokens(text));
}

}  // namespace
}  // namespace qlora::launcher
