// Loading and training every store layout across ranks (run under mpirun -np 2 and 4): each rank
// reads only its shard and its vocabulary rows (bytes counted), holds no more than replicated
// tensors + its shard + its rows + the gather pool while loading (allocator peak, and RSS as a cross-check), and double-quantized and
// int8 stores train to the same losses as one rank over the same global batches.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "cluster/memory.h"
#include "cluster/mpi_communicator.h"
#include "launcher/train.h"
#include "model/llama.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

// A store written once per job by rank 0 of MPI_COMM_WORLD.
std::string store_for(const std::string& preset, const std::string& label, const shard::ConvertOptions& options) {
  const std::string path = testing_support::shared_temp_dir() + "/" + preset + "-" + label + ".h5";
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0 && !std::filesystem::exists(path)) shard::convert_synthetic(preset, path, options);
  MPI_Barrier(MPI_COMM_WORLD);
  return path;
}

std::vector<std::pair<std::string, shard::ConvertOptions>> layouts() {
  shard::ConvertOptions nf4;
  shard::ConvertOptions double_quant;
  double_quant.double_quant = true;
  double_quant.blocksize = 32;   // tiny/small have at least 4 second-level blocks per tensor then
  shard::ConvertOptions int8;
  int8.int8 = true;
  return {{"nf4", nf4}, {"double-quant", double_quant}, {"int8", int8}};
}

int64_t resident_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return -1;
}

TEST(StoreLoading, EachRankReadsItsShardAndPeaksAtReplicatedPlusShardPlusGatherPool) {
  cluster::MemoryCounter::install();
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const int rank = communicator->rank();
  const int world = communicator->size();
  for (const auto& [label, options] : layouts()) {
    SCOPED_TRACE(label);
    const std::string path = store_for("small", label, options);
    auto store = shard::ModelStore::open(path);
    int64_t dense_bytes = 0;
    int64_t quantized_total = 0;
    int64_t own_quantized = 0;
    int64_t one_unit_per_tensor = 0;   // how far a balanced cut can stray from total / N
    int64_t own_vocabulary_bytes = 0;  // this rank's rows of the embedding and LM head
    int64_t vocabulary_total = 0;
    const auto vocabulary = shard::vocab_range(store->header().config.vocab_size, rank, world);
    for (const auto& tensor : store->tensors()) {
      if (tensor.name == "model.embed_tokens.weight" || tensor.name == "lm_head.weight") {
        const int64_t row_bytes = tensor.numel / tensor.shape[0] * kernels::dtype_size(tensor.dtype);
        own_vocabulary_bytes += vocabulary.rows() * row_bytes;
        vocabulary_total += tensor.numel * kernels::dtype_size(tensor.dtype);
        continue;
      }
      if (!tensor.quantized) {
        dense_bytes += tensor.numel * kernels::dtype_size(tensor.dtype);
        continue;
      }
      quantized_total += tensor.geometry.stored_bytes();
      own_quantized += shard::shard_bytes(tensor.geometry, shard::shard_range(tensor.geometry, rank, world));
      one_unit_per_tensor += shard::shard_bytes(
          tensor.geometry, shard::shard_range(tensor.geometry, 0, static_cast<int>(shard::max_world_for(tensor.geometry))));
    }
    const int64_t resident_before = resident_bytes();
    const int64_t counted_before = cluster::MemoryCounter::current_bytes();
    cluster::MemoryCounter::reset_peak();
    int64_t counted_peak = 0;
    int64_t resident_growth = 0;
    {
      model::LlamaModel model(*store, *communicator);
      counted_peak = cluster::MemoryCounter::peak_bytes() - counted_before;
      resident_growth = resident_bytes() - resident_before;
      const auto& loaded = model->load_memory();
      // Bytes read: the replicated tensors whole plus exactly this rank's slices (quantized tensors,
      // and its vocabulary rows of the embedding and LM head, about 1/N of them).
      EXPECT_EQ(static_cast<int64_t>(store->bytes_read()), dense_bytes + own_quantized + own_vocabulary_bytes);
      EXPECT_EQ(loaded.embeddings, own_vocabulary_bytes);
      EXPECT_NEAR(static_cast<double>(own_vocabulary_bytes), static_cast<double>(vocabulary_total) / world,
                  static_cast<double>(vocabulary_total) / store->header().config.vocab_size);
      EXPECT_NEAR(static_cast<double>(own_quantized), static_cast<double>(quantized_total) / world,
                  static_cast<double>(one_unit_per_tensor));
      // The shard segments hold the rank's slices plus at most 7 bytes of alignment per dataset.
      const int64_t datasets = 7 * 3 * 8;  // 8 layers x 7 projections x (codes, absmax, nested)
      EXPECT_GE(loaded.quantized, own_quantized);
      EXPECT_LE(loaded.quantized, own_quantized + 7 * datasets);
      // No staging copies: the peak while loading is what stays resident afterwards.
      const int64_t resident_state = loaded.replicated + loaded.quantized + loaded.gather_pool;
      EXPECT_LE(counted_peak, resident_state);
      EXPECT_LE(resident_growth, resident_state + (16 << 20)) << "RSS grew past the counted state + 16 MiB";
      if (rank == 0)
        std::printf("%-12s world %d rank 0: shard %.2f MiB of %.2f MiB quantized (1/N = %.2f), replicated %.2f MiB "
                    "(of which embedding rows %.2f MiB), gather pool %.2f MiB, allocator peak while loading %.2f MiB, "
                    "RSS growth %.2f MiB, read %.2f MiB\n",
                    label.c_str(), world, loaded.quantized / 1048576.0, quantized_total / 1048576.0,
                    quantized_total / 1048576.0 / world, loaded.replicated / 1048576.0, loaded.embeddings / 1048576.0,
                    loaded.gather_pool / 1048576.0, counted_peak / 1048576.0, resident_growth / 1048576.0, store->bytes_read() / 1048576.0);
    }
  }
}

TEST(StoreLoading, DoubleQuantizedAndInt8StoresTrainLikeOneRank) {
  auto world_communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  for (const auto& [label, options] : layouts()) {
    if (label == "nf4") continue;  // tests/launcher/test_training_mpi.cpp covers it
    SCOPED_TRACE(label);
    TrainOptions run;
    run.model_path = store_for("tiny", label, options);
    run.steps = 3;
    run.global_batch = 4;
    run.sequence_length = 32;
    run.learning_rate = 2e-3;
    run.write_outputs = false;
    run.quiet = true;
    run.threads = 1;
    const auto distributed = run_training(run, *world_communicator);
    if (rank == 0) {
      auto self_communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
      const auto single = run_training(run, *self_communicator);
      ASSERT_EQ(distributed.losses.size(), 3u);
      for (size_t step = 0; step < 3; ++step)
        EXPECT_NEAR(distributed.losses[step], single.losses[step], 1e-5) << "step " << step + 1;
      EXPECT_EQ(single.preparation.method,
                label == "int8" ? prepare::QuantizationMethod::bnb_8bit : prepare::QuantizationMethod::bnb_4bit);
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
}

}  // namespace
}  // namespace qlora::launcher
