// The MPI backend of Communicator (run under mpirun -np 2, 3 and 4) on known per-rank inputs: every
// collective's result is computed independently here and compared exactly (bytes, integer-valued
// sums, maxima) or within a stated float tolerance (averages of arbitrary floats). Covers uneven and
// zero-length contributions, buffers of a MiB and more (past MPI's eager limits; the backend does not
// split buffers, it asserts counts below 2^31), non-blocking handles completed by polling, waiting or
// destruction, and a one-rank communicator over MPI_COMM_SELF.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cluster/mpi_communicator.h"
#include "support/world_communicator_test.h"

namespace qlora::cluster {
namespace {

// Bytes every rank can regenerate for any other rank: the expected result of a gather is built from
// them. Eight bytes per step of a 64-bit mixer (SplitMix64), as megabytes are made per rank and test.
std::vector<uint8_t> rank_bytes(int rank, int64_t count, uint32_t salt) {
  uint64_t state = (uint64_t{salt} << 32) ^ static_cast<uint64_t>(rank);
  std::vector<uint8_t> bytes(static_cast<size_t>(count));
  for (int64_t offset = 0; offset < count; offset += 8) {
    state += 0x9e3779b97f4a7c15ull;
    uint64_t mixed = (state ^ (state >> 30)) * 0xbf58476d1ce4e5b9ull;
    mixed = (mixed ^ (mixed >> 27)) * 0x94d049bb133111ebull;
    mixed ^= mixed >> 31;
    std::memcpy(bytes.data() + offset, &mixed, static_cast<size_t>(std::min<int64_t>(8, count - offset)));
  }
  return bytes;
}

// Floats in [-1, 1) from the top 24 bits of the generator: the same on every rank and every library.
std::vector<float> rank_floats(int rank, int64_t count, uint32_t salt) {
  std::mt19937 generator(salt * 104729u + static_cast<uint32_t>(rank));
  std::vector<float> values(static_cast<size_t>(count));
  for (auto& value : values) value = static_cast<float>(generator() >> 8) / 8388608.0f - 1.0f;
  return values;
}

// Small integers, so sums over four ranks are exact in float whatever order MPI adds them in.
std::vector<float> rank_integers(int rank, int64_t count) {
  std::vector<float> values(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) values[i] = static_cast<float>((rank + 1) * (i % 97) - 3 * rank);
  return values;
}

// Every rank's copy of `values`, rank-major, through plain MPI (independent of the code under test).
std::vector<float> every_rank_copy(const std::vector<float>& values) {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  std::vector<float> all(values.size() * static_cast<size_t>(world));
  MPI_Allgather(values.data(), static_cast<int>(values.size()), MPI_FLOAT, all.data(), static_cast<int>(values.size()),
                MPI_FLOAT, MPI_COMM_WORLD);
  return all;
}

// One communicator (and so one fault watchdog) for the whole suite: its construction is collective.
class MpiCommunicatorTest : public WorldCommunicatorTest {
 protected:
  // Gathers with the blocking or the non-blocking form; each rank sends rank_bytes(rank, counts[rank], salt).
  static std::vector<uint8_t> gather(const std::vector<int64_t>& counts, uint32_t salt, bool non_blocking) {
    const auto mine = rank_bytes(world().rank(), counts[world().rank()], salt);
    int64_t total = 0;
    for (int64_t count : counts) total += count;
    // One sentinel byte past the end shows nothing is written beyond the gathered bytes.
    std::vector<uint8_t> received(static_cast<size_t>(total) + 1, 0xA5);
    if (non_blocking)
      world().all_gather_async(mine.data(), received.data(), counts)->wait();
    else
      world().all_gather(mine.data(), received.data(), counts);
    return received;
  }

  static std::vector<uint8_t> expected_gather(const std::vector<int64_t>& counts, uint32_t salt) {
    std::vector<uint8_t> expected;
    for (int r = 0; r < static_cast<int>(counts.size()); ++r) {
      const auto part = rank_bytes(r, counts[r], salt);
      expected.insert(expected.end(), part.begin(), part.end());
    }
    expected.push_back(0xA5);
    return expected;
  }
};

TEST_F(MpiCommunicatorTest, ReportsTheRankAndSizeOfItsMpiCommunicator) {
  int rank = -1;
  int size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(world().rank(), rank);
  EXPECT_EQ(world().size(), size);
  EXPECT_EQ(world().backend(), "mpi");
  EXPECT_GE(world().size(), 2) << "this suite is meant to run under mpirun -np 2 or more";
}

TEST_F(MpiCommunicatorTest, AllGatherOfEqualCountsConcatenatesTheRanksInOrder) {
  const std::vector<int64_t> counts(world().size(), 1000);
  for (const bool non_blocking : {false, true}) {
    const auto received = gather(counts, 1, non_blocking);
    EXPECT_EQ(received, expected_gather(counts, 1)) << (non_blocking ? "all_gather_async" : "all_gather");
  }
}

TEST_F(MpiCommunicatorTest, AllGatherOfUnevenAndZeroLengthContributionsIsByteExact) {
  const int world_size = world().size();
  std::vector<std::vector<int64_t>> patterns;
  std::vector<int64_t> rank_one_empty(world_size);
  std::vector<int64_t> rank_zero_empty(world_size);
  std::vector<int64_t> growing(world_size);
  for (int r = 0; r < world_size; ++r) {
    rank_one_empty[r] = r == 1 ? 0 : 37 * r + 3;
    rank_zero_empty[r] = r == 0 ? 0 : 1001 * r + 1;
    growing[r] = r + 1;
  }
  patterns.push_back(rank_one_empty);
  patterns.push_back(rank_zero_empty);
  patterns.push_back(growing);
  patterns.push_back(std::vector<int64_t>(world_size, 0));
  uint32_t salt = 10;
  for (const auto& counts : patterns) {
    ++salt;
    for (const bool non_blocking : {false, true}) {
      const auto received = gather(counts, salt, non_blocking);
      EXPECT_EQ(received, expected_gather(counts, salt))
          << (non_blocking ? "all_gather_async" : "all_gather") << ", pattern " << salt - 10;
    }
  }
}

TEST_F(MpiCommunicatorTest, AllGatherOfAMebibytePerRankIsByteExact) {
  const int world_size = world().size();
  std::vector<int64_t> equal(world_size, int64_t{1} << 20);
  std::vector<int64_t> uneven(world_size);
  for (int r = 0; r < world_size; ++r) uneven[r] = (int64_t{1} << 20) + 4097 * r;
  for (const auto& counts : {equal, uneven}) {
    for (const bool non_blocking : {false, true}) {
      const auto received = gather(counts, 40, non_blocking);
      const auto expected = expected_gather(counts, 40);
      ASSERT_EQ(received.size(), expected.size());
      EXPECT_EQ(std::memcmp(received.data(), expected.data(), expected.size()), 0)
          << (non_blocking ? "all_gather_async" : "all_gather") << " of " << counts[world_size - 1] << " bytes";
    }
  }
}

// Sums of integers are exact, so the result is compared bit for bit; 512 Ki floats (2 MiB) take MPI's
// large-message algorithms.
TEST_F(MpiCommunicatorTest, AllReduceSumOfIntegerValuesIsExactForSmallAndLargeBuffers) {
  const int world_size = world().size();
  for (const int64_t count : {int64_t{1}, int64_t{1000}, int64_t{512} << 10}) {
    std::vector<float> expected(static_cast<size_t>(count), 0.0f);
    for (int r = 0; r < world_size; ++r) {
      const auto values = rank_integers(r, count);
      for (int64_t i = 0; i < count; ++i) expected[i] += values[i];
    }
    for (const bool non_blocking : {false, true}) {
      auto data = rank_integers(world().rank(), count);
      if (non_blocking)
        world().all_reduce_async(data.data(), count, ReduceOp::sum)->wait();
      else
        world().all_reduce(data.data(), count, ReduceOp::sum);
      EXPECT_EQ(data, expected) << (non_blocking ? "all_reduce_async" : "all_reduce") << " of " << count;
    }
  }
}

// Averages of arbitrary floats: within 1e-6 of the double-precision mean (inputs in [-1, 1), so the
// float sum over four ranks is off by a few 1e-7 at most), and the same bits on every rank.
TEST_F(MpiCommunicatorTest, AllReduceAverageIsTheMeanOverRanksAndIdenticalOnEveryRank) {
  const int world_size = world().size();
  const int64_t count = 4099;
  std::vector<double> mean(static_cast<size_t>(count), 0.0);
  for (int r = 0; r < world_size; ++r) {
    const auto values = rank_floats(r, count, 3);
    for (int64_t i = 0; i < count; ++i) mean[i] += values[i] / world_size;
  }
  for (const bool non_blocking : {false, true}) {
    auto data = rank_floats(world().rank(), count, 3);
    if (non_blocking)
      world().all_reduce_async(data.data(), count, ReduceOp::average)->wait();
    else
      world().all_reduce(data.data(), count, ReduceOp::average);
    double largest_error = 0.0;
    for (int64_t i = 0; i < count; ++i) largest_error = std::max(largest_error, std::abs(data[i] - mean[i]));
    EXPECT_LT(largest_error, 1e-6) << (non_blocking ? "all_reduce_async" : "all_reduce");
    const auto copies = every_rank_copy(data);
    for (int r = 0; r < world_size; ++r)
      EXPECT_EQ(std::memcmp(copies.data() + r * count, data.data(), count * sizeof(float)), 0)
          << "rank " << r << " holds other bits than rank " << world().rank()
          << (non_blocking ? " after all_reduce_async" : " after all_reduce");
  }
}

TEST_F(MpiCommunicatorTest, AllReduceMaxTakesEachElementsLargestValueOverRanks) {
  const int world_size = world().size();
  const int64_t count = 2003;
  std::vector<float> expected(static_cast<size_t>(count), -INFINITY);
  for (int r = 0; r < world_size; ++r) {
    const auto values = rank_floats(r, count, 5);
    for (int64_t i = 0; i < count; ++i) expected[i] = std::max(expected[i], values[i]);
  }
  for (const bool non_blocking : {false, true}) {
    auto data = rank_floats(world().rank(), count, 5);
    if (non_blocking)
      world().all_reduce_async(data.data(), count, ReduceOp::max)->wait();
    else
      world().all_reduce(data.data(), count, ReduceOp::max);
    EXPECT_EQ(data, expected) << (non_blocking ? "all_reduce_async" : "all_reduce");
  }
}

TEST_F(MpiCommunicatorTest, ZeroLengthAllReduceLeavesTheBufferAlone) {
  for (const ReduceOp op : {ReduceOp::sum, ReduceOp::average, ReduceOp::max}) {
    float sentinel[2] = {41.5f, -7.25f};
    world().all_reduce(sentinel, 0, op);
    world().all_reduce_async(sentinel, 0, op)->wait();
    EXPECT_EQ(sentinel[0], 41.5f);
    EXPECT_EQ(sentinel[1], -7.25f);
  }
}

// The scalar form keeps double precision whatever the values: 1/3 + 0.0123 r does not sum exactly in
// float (the old float head + residual form was off by 3e-8 relative here), and the max of values
// 3e-8 apart must be one of them, bit for bit (the old form could return more than every input).
TEST_F(MpiCommunicatorTest, ScalarAllReduceKeepsDoublePrecisionAndAnExactMax) {
  const int world_size = world().size();
  const auto value_of = [](int rank) { return 1.0 / 3.0 + 0.0123 * rank; };
  double sum = 0.0;
  for (int r = 0; r < world_size; ++r) sum += value_of(r);
  const double mine = value_of(world().rank());
  EXPECT_NEAR(world().all_reduce_scalar(mine, ReduceOp::sum), sum, 1e-15);
  EXPECT_NEAR(world().all_reduce_scalar(mine, ReduceOp::average), sum / world_size, 1e-15);
  const auto close_of = [](int rank) { return 1.0 + 4e-8 + 3e-8 * rank; };
  EXPECT_EQ(world().all_reduce_scalar(close_of(world().rank()), ReduceOp::max), close_of(world_size - 1));
}

TEST_F(MpiCommunicatorTest, BroadcastDeliversTheRootsBytesFromEveryRoot) {
  const int world_size = world().size();
  for (int root = 0; root < world_size; ++root) {
    for (const int64_t bytes : {int64_t{0}, int64_t{1000} + 13 * root, int64_t{1} << 20}) {
      const auto payload = rank_bytes(root, bytes, 60 + static_cast<uint32_t>(bytes % 7));
      std::vector<uint8_t> buffer(static_cast<size_t>(bytes) + 1, 0xEE);
      if (world().rank() == root) std::memcpy(buffer.data(), payload.data(), payload.size());
      world().broadcast(buffer.data(), bytes, root);
      EXPECT_EQ(std::memcmp(buffer.data(), payload.data(), payload.size()), 0) << bytes << " bytes from root " << root;
      EXPECT_EQ(buffer.back(), 0xEE) << "bytes written past the broadcast, root " << root;
    }
  }
}

// Records of different lengths, one empty, one carrying NUL bytes, one of 256 KiB.
TEST_F(MpiCommunicatorTest, GatherToRootHandsRankZeroEveryRecordInRankOrder) {
  const int world_size = world().size();
  const auto record_of = [](int rank) {
    if (rank == 1) return std::string();
    const auto bytes = rank_bytes(rank, rank == 2 ? (int64_t{256} << 10) : 5 + 11 * rank, 70);
    std::string record(bytes.begin(), bytes.end());
    record[0] = '\0';
    return record;
  };
  const auto records = world().gather_to_root(record_of(world().rank()));
  if (world().rank() != 0) {
    EXPECT_TRUE(records.empty());
    return;
  }
  ASSERT_EQ(static_cast<int>(records.size()), world_size);
  for (int r = 0; r < world_size; ++r) EXPECT_EQ(records[r], record_of(r)) << "record of rank " << r;
}

TEST_F(MpiCommunicatorTest, BarrierHoldsEveryRankUntilTheLastOneArrives) {
  world().barrier();
  const bool late = world().rank() == world().size() - 1;
  const auto start = std::chrono::steady_clock::now();
  if (late) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  world().barrier();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!late) {
    EXPECT_GT(waited, 0.2) << "left the barrier before the late rank reached it";
  }
}

// Several collectives in flight at once, completed in the reverse of their launch order.
TEST_F(MpiCommunicatorTest, NonBlockingCollectivesInFlightTogetherCompleteInAnyOrder) {
  const int world_size = world().size();
  const int rank = world().rank();
  const int64_t count = 777;
  auto sums = rank_integers(rank, count);
  auto maxima = rank_floats(rank, count, 9);
  const std::vector<int64_t> counts(world_size, 333);
  const auto sent = rank_bytes(rank, 333, 8);
  std::vector<uint8_t> gathered(333 * static_cast<size_t>(world_size) + 1, 0xA5);
  auto first = world().all_reduce_async(sums.data(), count, ReduceOp::sum);
  auto second = world().all_gather_async(sent.data(), gathered.data(), counts);
  auto third = world().all_reduce_async(maxima.data(), count, ReduceOp::max);
  third->wait();
  second->wait();
  first->wait();

  std::vector<float> expected_sums(static_cast<size_t>(count), 0.0f);
  std::vector<float> expected_maxima(static_cast<size_t>(count), -INFINITY);
  for (int r = 0; r < world_size; ++r) {
    const auto integers = rank_integers(r, count);
    const auto floats = rank_floats(r, count, 9);
    for (int64_t i = 0; i < count; ++i) {
      expected_sums[i] += integers[i];
      expected_maxima[i] = std::max(expected_maxima[i], floats[i]);
    }
  }
  EXPECT_EQ(sums, expected_sums);
  EXPECT_EQ(maxima, expected_maxima);
  EXPECT_EQ(gathered, expected_gather(counts, 8));
}

// test() drives a collective to completion without wait(); the average's scale is applied exactly
// once however often wait() is called afterwards; a handle destroyed unwaited still completes.
TEST_F(MpiCommunicatorTest, NonBlockingHandlesCompleteByPollingWaitingOrDestruction) {
  const int world_size = world().size();
  const int64_t count = 513;
  std::vector<float> expected_sum(static_cast<size_t>(count), 0.0f);
  for (int r = 0; r < world_size; ++r) {
    const auto integers = rank_integers(r, count);
    for (int64_t i = 0; i < count; ++i) expected_sum[i] += integers[i];
  }

  auto polled = rank_integers(world().rank(), count);
  auto pending = world().all_reduce_async(polled.data(), count, ReduceOp::average);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  bool complete = false;
  while (!complete && std::chrono::steady_clock::now() < deadline) complete = pending->test();
  ASSERT_TRUE(complete) << "test() never reported completion";
  EXPECT_TRUE(pending->test()) << "a completed handle must keep reporting completion";
  pending->wait();
  pending->wait();
  const float scale = 1.0f / static_cast<float>(world_size);
  for (int64_t i = 0; i < count; ++i)
    ASSERT_NEAR(polled[i], expected_sum[i] * scale, 1e-6 * std::abs(expected_sum[i]) + 1e-6) << "element " << i;

  auto dropped = rank_integers(world().rank(), count);
  world().all_reduce_async(dropped.data(), count, ReduceOp::sum).reset();
  EXPECT_EQ(dropped, expected_sum) << "destroying an unwaited handle must complete its collective";
}

// A communicator of one rank: nothing to exchange, averages unchanged (no scale), no watchdog needed.
TEST_F(MpiCommunicatorTest, OneRankCommunicatorReturnsItsOwnDataUnchanged) {
  auto self = make_mpi_communicator(MPI_COMM_SELF);
  EXPECT_EQ(self->size(), 1);
  EXPECT_EQ(self->rank(), 0);
  const auto values = rank_floats(world().rank(), 100, 11);
  for (const ReduceOp op : {ReduceOp::sum, ReduceOp::average, ReduceOp::max}) {
    auto data = values;
    self->all_reduce(data.data(), 100, op);
    EXPECT_EQ(data, values);
    self->all_reduce_async(data.data(), 100, op)->wait();
    EXPECT_EQ(data, values);
  }
  const auto bytes = rank_bytes(0, 64, 12);
  std::vector<uint8_t> gathered(64, 0);
  self->all_gather(bytes.data(), gathered.data(), {64});
  EXPECT_EQ(gathered, bytes);
  EXPECT_EQ(self->gather_to_root("only record"), std::vector<std::string>{"only record"});
  EXPECT_NEAR(self->all_reduce_scalar(2.0 / 3.0, ReduceOp::average), 2.0 / 3.0, 1e-14);
}

}  // namespace
}  // namespace qlora::cluster
