// The counting, caching CPU allocator: live bytes are counted exactly, freed blocks of 64 KiB and more
// come back for the next request of their size, and the cache evicts the least recently freed blocks
// to keep live plus cached within 110% of the highest live total.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <thread>
#include <vector>

#include "cluster/memory.h"

namespace qlora::cluster {
namespace {

constexpr int64_t kMiB = 1 << 20;

torch::Tensor bytes_tensor(int64_t bytes) { return torch::empty({bytes}, torch::kUInt8); }

class AllocatorCache : public ::testing::Test {
 protected:
  void SetUp() override {
    MemoryCounter::install();
    MemoryCounter::release_cache();
  }
};

// Tests run in file order: this one reaches the highest live total of the file (about 96 MiB), so the
// bound the later tests see is fixed by it.
TEST_F(AllocatorCache, EvictsTheLeastRecentlyFreedBlocksToStayWithinTheBound) {
  const int64_t base = MemoryCounter::current_bytes();
  ASSERT_LT(base, kMiB) << "the test expects a nearly empty process";
  std::vector<int64_t> sizes = {32 * kMiB, 32 * kMiB + 4096, 32 * kMiB + 8192};
  {
    std::vector<torch::Tensor> blocks;
    for (const int64_t size : sizes) blocks.push_back(bytes_tensor(size));
    EXPECT_EQ(MemoryCounter::current_bytes(), base + sizes[0] + sizes[1] + sizes[2]);
    for (auto& block : blocks) block = torch::Tensor();  // freed oldest first: sizes[0], [1], [2]
  }
  EXPECT_EQ(MemoryCounter::cached_bytes(), sizes[0] + sizes[1] + sizes[2]);
  EXPECT_EQ(MemoryCounter::current_bytes(), base);
  // A 20 MiB miss: live after it is base + 20 MiB, the bound 1.1 x (base + ~96 MiB); keeping all three
  // cached blocks would exceed it, dropping the oldest one is enough.
  auto fresh = bytes_tensor(20 * kMiB);
  EXPECT_EQ(MemoryCounter::cached_bytes(), sizes[1] + sizes[2]);
  // The survivors are the two newer sizes: both are hits, taking them empties the cache.
  auto second = bytes_tensor(sizes[1]);
  auto third = bytes_tensor(sizes[2]);
  EXPECT_EQ(MemoryCounter::cached_bytes(), 0);
  EXPECT_EQ(MemoryCounter::current_bytes(), base + 20 * kMiB + sizes[1] + sizes[2]);
}

TEST_F(AllocatorCache, HandsAFreedBlockBackForTheSameSize) {
  const int64_t base = MemoryCounter::current_bytes();
  void* first_address = nullptr;
  {
    auto tensor = bytes_tensor(3 * kMiB);
    first_address = tensor.data_ptr();
    tensor.fill_(7);
  }
  EXPECT_EQ(MemoryCounter::current_bytes(), base);
  EXPECT_EQ(MemoryCounter::cached_bytes(), 3 * kMiB);
  auto again = bytes_tensor(3 * kMiB);
  EXPECT_EQ(again.data_ptr(), first_address);
  EXPECT_EQ(MemoryCounter::cached_bytes(), 0);
  EXPECT_EQ(MemoryCounter::current_bytes(), base + 3 * kMiB);
  // A different size never takes it.
  again = torch::Tensor();
  auto other = bytes_tensor(3 * kMiB + 64);
  EXPECT_NE(other.data_ptr(), first_address);
  EXPECT_EQ(MemoryCounter::cached_bytes(), 3 * kMiB);
}

TEST_F(AllocatorCache, LeavesSmallBlocksToTheSystemAllocator) {
  { auto small = bytes_tensor(64 * 1024 - 1); }
  EXPECT_EQ(MemoryCounter::cached_bytes(), 0);
  { auto smallest_cached = bytes_tensor(64 * 1024); }
  EXPECT_EQ(MemoryCounter::cached_bytes(), 64 * 1024);
}

TEST_F(AllocatorCache, ReleaseEmptiesTheCacheWithoutTouchingLiveBytes) {
  const int64_t base = MemoryCounter::current_bytes();
  auto kept = bytes_tensor(2 * kMiB);
  { auto freed = bytes_tensor(5 * kMiB); }
  EXPECT_EQ(MemoryCounter::cached_bytes(), 5 * kMiB);
  MemoryCounter::release_cache();
  EXPECT_EQ(MemoryCounter::cached_bytes(), 0);
  EXPECT_EQ(MemoryCounter::current_bytes(), base + 2 * kMiB);
}

// LibTorch frees tensors on whichever thread drops the last reference: the counts must stay exact.
TEST_F(AllocatorCache, CountsStayExactUnderConcurrentUse) {
  const int64_t base = MemoryCounter::current_bytes();
  auto churn = [](int seed) {
    for (int round = 0; round < 400; ++round) {
      const int64_t bytes = (64 + 16 * ((round * 7 + seed) % 9)) * 1024;
      auto tensor = bytes_tensor(bytes);
      tensor[0] = static_cast<uint8_t>(round);
      ASSERT_EQ(tensor[0].item<uint8_t>(), static_cast<uint8_t>(round));
    }
  };
  std::thread first(churn, 1);
  std::thread second(churn, 2);
  first.join();
  second.join();
  EXPECT_EQ(MemoryCounter::current_bytes(), base);
  EXPECT_GT(MemoryCounter::cached_bytes(), 0);
  EXPECT_LE(MemoryCounter::cached_bytes(), 2 * 9 * 192 * 1024);  // at most every size once per thread
}

}  // namespace
}  // namespace qlora::cluster
