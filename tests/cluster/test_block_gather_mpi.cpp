// BlockGatherer (run under mpirun -np 2, 3 and 4): every rank owns one byte segment per block, of a
// length that differs between ranks (4-bit, int8 and double-quantized tensors whose blocks do not
// divide evenly); an acquired block must be the ranks' segments side by side, byte for byte, with
// prefetching on or off, after a slot was reused for a block of another size, and for as long as the
// contract says a block stays valid. The gather counters are checked against the expected sequence.
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/torch.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cluster/block_gather.h"
#include "cluster/mpi_communicator.h"
#include "support/world_communicator_test.h"

namespace qlora::cluster {
namespace {

QuantizedTensorSpec four_bit(const char* name, int64_t numel, int64_t blocksize) {
  return {name, shard::QuantGeometry{numel, blocksize, 4, false}, 0.0f};
}
QuantizedTensorSpec eight_bit(const char* name, int64_t rows, int64_t columns) {
  return {name, shard::QuantGeometry{rows * columns, columns, 8, false}, 0.0f};
}
QuantizedTensorSpec double_quantized(const char* name, int64_t numel, int64_t blocksize) {
  return {name, shard::QuantGeometry{numel, blocksize, 4, true}, 0.5f};
}

// Three blocks of different sizes (block 1 is the largest, block 2 the smallest), each sharded over at
// most 4 ranks with a remainder: 10 blocks of 64, 7 int8 rows, 1124 double-quantized blocks (5 cut units).
std::vector<std::vector<QuantizedTensorSpec>> block_specs() {
  return {
      {four_bit("block0.q", 64 * 9 + 10, 64), eight_bit("block0.down", 7, 48)},
      {double_quantized("block1.gate", 64 * 1124, 64), four_bit("block1.o", 32 * 13, 32), eight_bit("block1.up", 5, 40)},
      {four_bit("block2.k", 16 * 6 + 2, 16)},
  };
}

// The bytes of `rank`'s segment of `block`: any rank can rebuild any other rank's.
std::vector<uint8_t> segment_bytes_of(size_t block, int rank, int64_t length) {
  std::mt19937 generator(static_cast<uint32_t>(1000 * block + rank + 1));
  std::vector<uint8_t> bytes(static_cast<size_t>(length));
  for (auto& byte : bytes) byte = static_cast<uint8_t>(generator() >> 24);
  return bytes;
}

// The gathered block as it must be: every rank's whole segment, in rank order.
std::vector<uint8_t> expected_gathered(const FlatShardLayout& layout, size_t block) {
  std::vector<uint8_t> expected;
  for (int rank = 0; rank < layout.world(); ++rank) {
    const auto segment = segment_bytes_of(block, rank, layout.segment_bytes(rank));
    expected.insert(expected.end(), segment.begin(), segment.end());
  }
  return expected;
}

// The start of the gathered buffer: rank 0's first tensor has codes at offset 0 of the first segment.
const uint8_t* gathered_base(const GatheredBlock& block) { return block.pieces(0).front().codes; }

class BlockGatherTest : public WorldCommunicatorTest {
 protected:
  // A gatherer over the three blocks with this rank's segments, for a world of `communicator`'s size.
  static std::unique_ptr<BlockGatherer> make_gatherer(Communicator& communicator, int slots) {
    std::vector<FlatShardLayout> layouts;
    std::vector<torch::Tensor> segments;
    const auto specs = block_specs();
    for (size_t block = 0; block < specs.size(); ++block) {
      layouts.emplace_back(specs[block], communicator.size());
      const int64_t length = layouts.back().segment_bytes(communicator.rank());
      const auto bytes = segment_bytes_of(block, communicator.rank(), length);
      auto segment = torch::empty({length}, torch::kUInt8);
      std::memcpy(segment.data_ptr<uint8_t>(), bytes.data(), bytes.size());
      segments.push_back(segment);
    }
    return std::make_unique<BlockGatherer>(communicator, std::move(layouts), std::move(segments), slots);
  }

  // The whole gathered buffer equals the expected bytes, and every piece points where the layout says.
  static void expect_reassembled(const BlockGatherer& gatherer, const GatheredBlock& gathered, size_t block) {
    const FlatShardLayout& layout = gatherer.layout(block);
    const auto expected = expected_gathered(layout, block);
    ASSERT_EQ(static_cast<int64_t>(expected.size()), layout.gathered_bytes());
    const uint8_t* base = gathered_base(gathered);
    EXPECT_EQ(std::memcmp(base, expected.data(), expected.size()), 0) << "block " << block << " is not reassembled";
    for (size_t tensor = 0; tensor < layout.tensors().size(); ++tensor) {
      const auto pieces = gathered.pieces(tensor);
      ASSERT_EQ(static_cast<int>(pieces.size()), layout.world());
      const bool nested = layout.tensors()[tensor].geometry.double_quant;
      for (int rank = 0; rank < layout.world(); ++rank) {
        const uint8_t* segment = base + layout.segment_offset(rank);
        const auto& range = layout.range(rank, tensor);
        EXPECT_EQ(pieces[rank].codes, segment + layout.codes_offset(rank, tensor));
        EXPECT_EQ(pieces[rank].element_begin, range.element_begin);
        EXPECT_EQ(pieces[rank].elements, range.elements());
        EXPECT_EQ(pieces[rank].blocks, range.blocks());
        const uint8_t* absmax = segment + layout.absmax_offset(rank, tensor);
        EXPECT_EQ(reinterpret_cast<const uint8_t*>(pieces[rank].absmax), nested ? nullptr : absmax);
        EXPECT_EQ(pieces[rank].absmax_codes, nested ? absmax : nullptr);
        EXPECT_EQ(reinterpret_cast<const uint8_t*>(pieces[rank].nested_absmax),
                  nested ? segment + layout.nested_offset(rank, tensor) : nullptr);
      }
    }
  }

  static int64_t gathered_bytes_of(const BlockGatherer& gatherer, std::initializer_list<size_t> blocks) {
    int64_t total = 0;
    for (size_t block : blocks) total += gatherer.layout(block).gathered_bytes();
    return total;
  }
};


// The test is only worth its name if the ranks' segments really differ in length.
TEST_F(BlockGatherTest, TheTestBlocksHaveSegmentsOfUnevenLengths) {
  auto gatherer = make_gatherer(world(), 2);
  for (size_t block = 0; block < gatherer->blocks(); ++block) {
    const FlatShardLayout& layout = gatherer->layout(block);
    EXPECT_NE(layout.segment_bytes(0), layout.segment_bytes(layout.world() - 1)) << "block " << block;
    EXPECT_EQ(gatherer->local_segment(block).numel(), layout.segment_bytes(world().rank()));
  }
  // The pool is sized for the largest block, once per slot.
  EXPECT_EQ(gatherer->pool_bytes(), 2 * gatherer->layout(1).gathered_bytes());
  EXPECT_GT(gatherer->layout(1).gathered_bytes(), gatherer->layout(0).gathered_bytes());
}

TEST_F(BlockGatherTest, AcquireWithoutPrefetchReassemblesEveryBlockByteExactly) {
  auto gatherer = make_gatherer(world(), 2);
  gatherer->set_prefetch(false);
  for (size_t block = 0; block < gatherer->blocks(); ++block) {
    gatherer->prefetch(block + 1);  // disabled: must not gather
    expect_reassembled(*gatherer, gatherer->acquire(block), block);
  }
  EXPECT_EQ(gatherer->stats().gathers, 3);
  EXPECT_EQ(gatherer->stats().reuses, 0);
  EXPECT_EQ(gatherer->stats().bytes_received, gathered_bytes_of(*gatherer, {0, 1, 2}));
}

// The forward pattern: acquire block i, prefetch i + 1, use block i. The block in use survives the
// prefetch (its slot is pinned) and the acquire of the next block; it is evicted only by the prefetch
// after that, as the contract ("two acquires later") allows.
TEST_F(BlockGatherTest, PrefetchedBlocksAreByteExactAndTheBlockInUseSurvivesTheNextPrefetch) {
  auto gatherer = make_gatherer(world(), 2);
  const GatheredBlock first = gatherer->acquire(0);
  gatherer->prefetch(1);
  gatherer->poll();
  expect_reassembled(*gatherer, first, 0);
  const GatheredBlock second = gatherer->acquire(1);
  expect_reassembled(*gatherer, first, 0);
  expect_reassembled(*gatherer, second, 1);
  gatherer->prefetch(2);
  gatherer->poll();
  expect_reassembled(*gatherer, second, 1);
  expect_reassembled(*gatherer, gatherer->acquire(2), 2);
  gatherer->prefetch(3);  // past the last block: nothing to do
  EXPECT_EQ(gatherer->stats().gathers, 3);
  EXPECT_EQ(gatherer->stats().reuses, 0) << "an acquire that waits on its prefetch is not a reuse";
  EXPECT_EQ(gatherer->stats().bytes_received, gathered_bytes_of(*gatherer, {0, 1, 2}));
  EXPECT_GE(gatherer->stats().wait_seconds, 0.0);
}

// Two slots, least recently used eviction that never takes the block last acquired; the small block 2
// lands in a slot that held the largest block, and block 1 is gathered again after its eviction.
TEST_F(BlockGatherTest, SlotsAreReusedWhileTheBlockIsPooledAndEvictedLeastRecentlyUsedFirst) {
  auto gatherer = make_gatherer(world(), 2);
  gatherer->set_prefetch(false);
  expect_reassembled(*gatherer, gatherer->acquire(0), 0);
  expect_reassembled(*gatherer, gatherer->acquire(0), 0);
  EXPECT_EQ(gatherer->stats().gathers, 1);
  EXPECT_EQ(gatherer->stats().reuses, 1);
  expect_reassembled(*gatherer, gatherer->acquire(1), 1);
  expect_reassembled(*gatherer, gatherer->acquire(0), 0);
  EXPECT_EQ(gatherer->stats().gathers, 2);
  EXPECT_EQ(gatherer->stats().reuses, 2);
  expect_reassembled(*gatherer, gatherer->acquire(2), 2);  // evicts block 1 (least recently used)
  expect_reassembled(*gatherer, gatherer->acquire(0), 0);  // still pooled
  EXPECT_EQ(gatherer->stats().gathers, 3);
  EXPECT_EQ(gatherer->stats().reuses, 3);
  expect_reassembled(*gatherer, gatherer->acquire(1), 1);  // gathered again, evicting block 2
  expect_reassembled(*gatherer, gatherer->acquire(0), 0);
  expect_reassembled(*gatherer, gatherer->acquire(2), 2);  // gone: gathered again
  EXPECT_EQ(gatherer->stats().gathers, 5);
  EXPECT_EQ(gatherer->stats().reuses, 4);
  EXPECT_EQ(gatherer->stats().bytes_received, gathered_bytes_of(*gatherer, {0, 1, 2, 1, 2}));
}

// A prefetch of a pooled block, or with a single slot (it would evict the block in use), is a no-op.
TEST_F(BlockGatherTest, PrefetchDoesNothingForAPooledBlockOrWithOneSlot) {
  auto two_slots = make_gatherer(world(), 2);
  two_slots->acquire(0);
  two_slots->prefetch(0);
  EXPECT_EQ(two_slots->stats().gathers, 1);

  auto one_slot = make_gatherer(world(), 1);
  EXPECT_EQ(one_slot->pool_bytes(), one_slot->layout(1).gathered_bytes());
  for (size_t block : {0, 1, 2, 1}) {
    one_slot->prefetch(block + 1);
    expect_reassembled(*one_slot, one_slot->acquire(block), block);
  }
  EXPECT_EQ(one_slot->stats().gathers, 4);
  EXPECT_EQ(one_slot->stats().reuses, 0);
}

// Prefetching on and off deliver the same bytes for a longer, repeating schedule (two passes, as a
// forward and a recomputing backward would).
TEST_F(BlockGatherTest, PrefetchOnAndOffDeliverIdenticalBlocks) {
  const std::vector<size_t> schedule = {0, 1, 2, 2, 1, 0, 0, 1, 2};
  std::vector<std::vector<std::vector<uint8_t>>> delivered(2);
  for (const bool prefetch : {false, true}) {
    auto gatherer = make_gatherer(world(), 2);
    gatherer->set_prefetch(prefetch);
    for (size_t step = 0; step < schedule.size(); ++step) {
      const size_t block = schedule[step];
      const GatheredBlock gathered = gatherer->acquire(block);
      if (step + 1 < schedule.size()) gatherer->prefetch(schedule[step + 1]);
      const uint8_t* base = gathered_base(gathered);
      delivered[prefetch].emplace_back(base, base + gatherer->layout(block).gathered_bytes());
      EXPECT_EQ(delivered[prefetch].back(), expected_gathered(gatherer->layout(block), block))
          << "step " << step << (prefetch ? " with" : " without") << " prefetch";
    }
  }
  EXPECT_EQ(delivered[0], delivered[1]);
}

// On one rank the local segment is the whole block: no pool, no collective, no copy.
TEST_F(BlockGatherTest, OneRankReadsItsLocalSegmentsInPlace) {
  auto self = make_mpi_communicator(MPI_COMM_SELF);
  auto gatherer = make_gatherer(*self, 2);
  EXPECT_EQ(gatherer->pool_bytes(), 0);
  for (size_t block = 0; block < gatherer->blocks(); ++block) {
    const GatheredBlock gathered = gatherer->acquire(block);
    EXPECT_EQ(gathered_base(gathered), gatherer->local_segment(block).data_ptr<uint8_t>());
    expect_reassembled(*gatherer, gathered, block);
  }
  EXPECT_EQ(gatherer->stats().gathers, 0);
}

}  // namespace
}  // namespace qlora::cluster
