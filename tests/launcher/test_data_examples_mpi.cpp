// Instruction data across ranks (run under mpirun -np 2 and 3): rank 0 tokenizes into the example
// cache while the others wait, every rank ends with the same examples, and a malformed record seen
// by rank 0 alone fails every rank with the record's FILE:LINE.
#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>
#include <string>

#include "cluster/mpi_communicator.h"
#include "common/errors.h"
#include "common/hash.h"
#include "data/example_cache.h"
#include "launcher/data_loading.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

namespace fs = std::filesystem;

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

std::string digest(const std::vector<data::TokenizedExample>& examples) {
  Fnv1a64 hash;
  for (const auto& example : examples) {
    const uint64_t size = example.tokens.size();
    hash.update(&size, sizeof size);
    hash.update(example.tokens.data(), example.tokens.size() * sizeof(int32_t));
    hash.update(example.counted.data(), example.counted.size());
  }
  return hash.hex();
}

TEST(LoadDataExamplesAcrossRanks, EveryRankGetsRankZerosExamples) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const auto store = shard::ModelStore::open(testing_support::synthetic_store("micro", 64));
  const fs::path folder = fs::path(testing_support::shared_temp_dir()) / "examples-mpi";
  const std::string data = (folder / "alpaca.json").string();
  if (world_rank() == 0) {
    fs::create_directories(folder);
    fs::copy_file(testing_support::source_dir() + "/tests/fixtures/sft/alpaca.json", data,
                  fs::copy_options::overwrite_existing);
    fs::remove(data::example_cache_path(data));
  }
  MPI_Barrier(MPI_COMM_WORLD);
  ExampleOptions options;
  options.chat_template_path = testing_support::source_dir() + "/tests/fixtures/sft/chatml.jinja";
  const auto examples = load_data_examples(data, options, *store, *communicator, true);
  ASSERT_TRUE(examples.has_value());
  ASSERT_EQ(examples->size(), 3u);
  // Alpaca trains on the completion by default: the prompt's bytes are not counted, the reply's are.
  EXPECT_EQ((*examples)[0].counted.front(), 0);
  EXPECT_EQ((*examples)[0].counted.back(), 1);
  const std::string mine = digest(*examples);
  std::string first = mine;
  first.resize(16);
  communicator->broadcast(first.data(), 16, 0);
  EXPECT_EQ(mine, first) << "rank " << world_rank();

  // A record only rank 0 reads is malformed: every rank fails, rank 0 with the location.
  const std::string bad = (folder / "bad.jsonl").string();
  if (world_rank() == 0) testing_support::write_file(bad, "{\"text\": \"a\"}\n{\"text\": null}\n");
  MPI_Barrier(MPI_COMM_WORLD);
  try {
    load_data_examples(bad, options, *store, *communicator, true);
    ADD_FAILURE() << "a malformed record was accepted on rank " << world_rank();
  } catch (const UserError& error) {
    if (world_rank() == 0)
      EXPECT_NE(std::string(error.what()).find("bad.jsonl:2: text: expected a string, got null"), std::string::npos)
          << error.what();
  }
}

}  // namespace
}  // namespace qlora::launcher
