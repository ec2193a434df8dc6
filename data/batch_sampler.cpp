// The packed-window sampler: a seeded permutation of windows per epoch, each rank reading only its
// rows of the global batch.
#include "data/batch_sampler.h"

#include <algorithm>

namespace qlora::data {
namespace {

uint64_t splitmix64(uint64_t value) {
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

}  // namespace

uint64_t permuted_index(uint64_t index, uint64_t count, uint64_t key) {
  if (count <= 1) return 0;
  int bits = 1;
  while ((uint64_t{1} << bits) < count) ++bits;
  const int half = (bits + 1) / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  // A balanced Feistel network permutes [0, 4^half), at most 4 x count; walking the cycle until
  // the value falls inside [0, count) restricts it to a permutation of [0, count).
  do {
    uint64_t left = index >> half, right = index & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      const uint64_t mixed = left ^ (splitmix64(right ^ key ^ (round * 0x632be59bd9b4e019ull)) & mask);
      left = right;
      right = mixed;
    }
    index = (left << half) | right;
  } while (index >= count);
  return index;
}

BatchSampler::BatchSampler(std::shared_ptr<const TokenStream> stream, int64_t begin, int64_t end,
                           int64_t sequence_length, int64_t global_batch, uint64_t seed)
    : stream_(std::move(stream)), begin_(begin), end_(end), sequence_length_(sequence_length),
      global_batch_(global_batch), seed_(seed) {}

BatchSampler::BatchSampler(std::vector<int64_t> tokens, int64_t sequence_length, int64_t global_batch, uint64_t seed)
    : BatchSampler(TokenStream::in_memory(std::vector<int32_t>(tokens.begin(), tokens.end())), 0,
                   static_cast<int64_t>(tokens.size()), sequence_length, global_batch, seed) {}

int64_t BatchSampler::window_count() const { return std::max<int64_t>(0, (token_count() - 1) / sequence_length_); }

void BatchSampler::fill_row(int64_t window, int64_t row, int64_t* inputs, int64_t* targets,
                            std::vector<int64_t>& buffer) const {
  buffer.resize(static_cast<size_t>(sequence_length_ + 1));
  const int64_t start = begin_ + window * sequence_length_;
  stream_->read(start, start + sequence_length_ + 1, buffer.data());
  std::copy(buffer.begin(), buffer.end() - 1, inputs + row * sequence_length_);
  std::copy(buffer.begin() + 1, buffer.end(), targets + row * sequence_length_);
}

std::pair<torch::Tensor, torch::Tensor> BatchSampler::batch(int64_t step, int rank, int world) const {
  const int64_t rows = global_batch_ / world;
  const int64_t first_row = rows * rank;
  const uint64_t windows = static_cast<uint64_t>(window_count());
  auto inputs = torch::empty({rows, sequence_length_}, torch::kLong);
  auto targets = torch::empty({rows, sequence_length_}, torch::kLong);
  std::vector<int64_t> buffer;
  for (int64_t row = 0; row < rows; ++row) {
    // Global row g of the endless sample order: epoch g / windows, position g % windows in that
    // epoch's permutation.
    const uint64_t global_row = static_cast<uint64_t>(step) * static_cast<uint64_t>(global_batch_) +
                                static_cast<uint64_t>(first_row + row);
    const uint64_t epoch = global_row / windows;
    const uint64_t key = splitmix64(seed_ ^ splitmix64(epoch + 0x5eed));
    const auto window = static_cast<int64_t>(permuted_index(global_row % windows, windows, key));
    fill_row(window, row, inputs.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), buffer);
  }
  return {inputs, targets};
}

std::pair<torch::Tensor, torch::Tensor> BatchSampler::sequential(int64_t count, int rank, int world) const {
  const int64_t rows = count / world;
  const int64_t first_window = rows * rank;
  auto inputs = torch::empty({rows, sequence_length_}, torch::kLong);
  auto targets = torch::empty({rows, sequence_length_}, torch::kLong);
  std::vector<int64_t> buffer;
  for (int64_t row = 0; row < rows; ++row)
    fill_row(first_window + row, row, inputs.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), buffer);
  return {inputs, targets};
}

}  // namespace qlora::data
