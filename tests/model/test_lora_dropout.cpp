// LoRA dropout masks: inverted-dropout values at the configured rate, a function of each token's
// coordinates only (not of which sequences share the call, nor of the thread count), and different
// for every coordinate that should decorrelate them.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "model/lora.h"

namespace qlora::model {
namespace {

DropoutSource source_of(int64_t first_global_row, int64_t sequence_length) {
  DropoutSource source;
  source.seed = 1234;
  source.step = 7;
  source.first_global_row = first_global_row;
  source.sequence_length = sequence_length;
  source.layer = 1;
  source.projection = 4;
  return source;
}

// Fraction of elements where two masks differ.
double disagreement(const torch::Tensor& first, const torch::Tensor& second) {
  return first.ne(second).to(torch::kDouble).mean().item<double>();
}

TEST(LoraDropoutMask, HoldsZeroOrOneOverKeepAtTheKeepRate) {
  const double keep = 0.9;
  const auto mask = dropout_mask(source_of(0, 64), 256, 257, keep);
  ASSERT_EQ(mask.sizes(), torch::IntArrayRef({256, 257}));
  const auto kept = mask.ne(0);
  EXPECT_TRUE(torch::equal(mask.masked_select(kept), torch::full({kept.sum().item<int64_t>()}, static_cast<float>(1.0 / keep))));
  // 65792 draws: the kept share has a standard deviation of 0.0012 around 0.9.
  EXPECT_NEAR(kept.to(torch::kDouble).mean().item<double>(), keep, 0.006);
  // The odd last feature is drawn like the others.
  EXPECT_NEAR(kept.select(1, 256).to(torch::kDouble).mean().item<double>(), keep, 0.08);
}

TEST(LoraDropoutMask, EachSequenceDrawsTheSameMaskWhicheverCallHoldsIt) {
  const int64_t sequence_length = 16;
  const int64_t features = 33;
  const auto whole = dropout_mask(source_of(8, sequence_length), 4 * sequence_length, features, 0.7);
  for (int64_t sequence = 0; sequence < 4; ++sequence) {
    const auto alone = dropout_mask(source_of(8 + sequence, sequence_length), sequence_length, features, 0.7);
    EXPECT_TRUE(torch::equal(alone, whole.narrow(0, sequence * sequence_length, sequence_length)))
        << "global row " << 8 + sequence;
  }
}

TEST(LoraDropoutMask, DoesNotDependOnTheThreadCount) {
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const auto serial = dropout_mask(source_of(0, 128), 1024, 96, 0.5);
  at::set_num_threads(4);
  const auto parallel = dropout_mask(source_of(0, 128), 1024, 96, 0.5);
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(serial, parallel));
}

TEST(LoraDropoutMask, EveryCoordinateChangesTheMask) {
  const double keep = 0.5;  // independent masks then disagree on half their elements
  const auto reference = dropout_mask(source_of(0, 32), 64, 64, keep);
  std::vector<DropoutSource> changed(5, source_of(0, 32));
  changed[0].seed += 1;
  changed[1].step += 1;
  changed[2].first_global_row += 2;
  changed[3].layer += 1;
  changed[4].projection += 1;
  for (size_t i = 0; i < changed.size(); ++i)
    EXPECT_NEAR(disagreement(reference, dropout_mask(changed[i], 64, 64, keep)), 0.5, 0.03) << "coordinate " << i;
  // Positions and features within one mask are decorrelated too: row 0 against row 1, column 0
  // against 1 (64 elements each: a standard deviation of 0.0625 around 0.5).
  EXPECT_NEAR(disagreement(reference.select(0, 0), reference.select(0, 1)), 0.5, 0.2);
  EXPECT_NEAR(disagreement(reference.select(1, 0), reference.select(1, 1)), 0.5, 0.2);
}

}  // namespace
}  // namespace qlora::model
