// common/format.h: byte counts as banners, tables and error messages print them - binary units,
// whole bytes below 1 KiB, two decimals above, TiB as the largest unit.
#include <gtest/gtest.h>

#include <string>

#include "common/format.h"

namespace qlora {
namespace {

TEST(FormatBytes, WholeBytesBelowOneKibibyte) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(1), "1 B");
  EXPECT_EQ(format_bytes(512), "512 B");
  EXPECT_EQ(format_bytes(1023), "1023 B");
  EXPECT_EQ(format_bytes(1000.4), "1000 B");
}

TEST(FormatBytes, TwoDecimalsInTheLargestFittingBinaryUnit) {
  EXPECT_EQ(format_bytes(1024), "1.00 KiB");
  EXPECT_EQ(format_bytes(1536), "1.50 KiB");
  EXPECT_EQ(format_bytes(1000 * 1024), "1000.00 KiB");  // 1000 KiB is not yet 1 MiB
  EXPECT_EQ(format_bytes(12.34 * 1048576), "12.34 MiB");
  EXPECT_EQ(format_bytes(1048576), "1.00 MiB");
  EXPECT_EQ(format_bytes(3.0 * 1073741824), "3.00 GiB");
  EXPECT_EQ(format_bytes(135.0 * 1073741824), "135.00 GiB");
  EXPECT_EQ(format_bytes(2.5 * 1099511627776.0), "2.50 TiB");
}

TEST(FormatBytes, RoundsToTwoDecimalsWithinTheUnit) {
  EXPECT_EQ(format_bytes(1048575), "1024.00 KiB");  // one byte short of 1 MiB stays in KiB
  EXPECT_EQ(format_bytes(1024 + 5), "1.00 KiB");
  EXPECT_EQ(format_bytes(1024 + 6), "1.01 KiB");
}

TEST(FormatBytes, TebibytesAreTheLargestUnit) {
  EXPECT_EQ(format_bytes(2048.0 * 1099511627776.0), "2048.00 TiB");
}

TEST(FormatBytes, NegativeAmountsKeepTheirSign) {
  // Memory deltas can be negative; they scale like positive ones.
  EXPECT_EQ(format_bytes(-100), "-100 B");
  EXPECT_EQ(format_bytes(-2048), "-2.00 KiB");
  EXPECT_EQ(format_bytes(-1.5 * 1048576), "-1.50 MiB");
}

}  // namespace
}  // namespace qlora
