// The thread policy: a rank's share of its node's cores, and that the share reaches the kernel pool
// and ATen (one ATen thread when OpenBLAS does the GEMMs with the share).
#include <gtest/gtest.h>
#include <dlfcn.h>
#include <torch/torch.h>

#include "kernels/parallel.h"
#include "launcher/threads.h"

namespace qlora::launcher {
namespace {

TEST(ThreadPolicy, CoresDividedAmongTheRanksOfANode) {
  EXPECT_EQ(threads_per_rank(0, 16, 1), 16);
  EXPECT_EQ(threads_per_rank(0, 16, 3), 5);    // rounds down
  EXPECT_EQ(threads_per_rank(0, 2, 4), 1);     // never below one
  EXPECT_EQ(threads_per_rank(0, 16, 0), 16);   // no ranks counted: the whole node
  EXPECT_EQ(threads_per_rank(6, 2, 4), 6);     // an explicit request wins, oversubscribed or not
  EXPECT_EQ(threads_per_rank(-1, 8, 2), 4);
}

TEST(ThreadPolicy, AssignReachesEveryPool) {
  const bool openblas = dlsym(RTLD_DEFAULT, "openblas_set_num_threads") != nullptr;
  cluster::RankLayout layout;
  layout.local_size = 1;
  EXPECT_EQ(assign_threads(layout, 3), 3);
  EXPECT_EQ(kernels::kernel_threads(), 3);
  EXPECT_EQ(torch::get_num_threads(), openblas ? 1 : 3);

  layout.local_size = 100000;   // more ranks than any machine has cores
  EXPECT_EQ(assign_threads(layout, 0), 1);
  EXPECT_EQ(kernels::kernel_threads(), 1);
  EXPECT_EQ(torch::get_num_threads(), 1);
}

}  // namespace
}  // namespace qlora::launcher
