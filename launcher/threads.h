// The thread policy: how many compute threads each rank uses, and making every pool honour it. Ranks
// sharing a node divide its cores, so that co-located ranks do not oversubscribe each other.
#pragma once

#include "cluster/rank_layout.h"

namespace qlora::launcher {

// `requested` > 0 is taken as given; otherwise the node's `cores` divided among the ranks on it,
// at least 1.
int threads_per_rank(int requested, int cores, int ranks_on_node);

// Gives this process `threads` compute threads: the dequantization pool, OpenBLAS's threads when
// OpenBLAS is the BLAS (ATen's intra-op pool then stays at one thread), else ATen's intra-op pool.
void apply_thread_count(int threads);

// Both, for this rank: `requested` <= 0 means "this machine's cores / the ranks on this node".
// Returns the count applied.
int assign_threads(const cluster::RankLayout& layout, int requested);

}  // namespace qlora::launcher
