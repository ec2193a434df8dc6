// Where this process sits in the job: rank, world, local rank and node, all from MPI (never from
// launcher environment variables, which mpirun-inside-sbatch gets wrong). How many threads a rank
// then uses is the launcher's policy (launcher/threads.h).
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

namespace qlora::cluster {

struct RankLayout {
  int rank = 0;
  int world = 1;
  int local_rank = 0;        // among the ranks sharing this node (MPI_COMM_TYPE_SHARED)
  int local_size = 1;
  int node = 0;              // index of this node, ordered by the lowest rank on it
  int nodes = 1;
  std::string hostname;
  std::string launcher;      // "mpirun", "srun", or "single process": informational only
};

// Collective over `comm`.
RankLayout discover_rank_layout(MPI_Comm comm);

// One line per node for the banner: "host (ranks 0-1, local 0..1)".
std::vector<std::string> describe_nodes(MPI_Comm comm, const RankLayout& layout);

}  // namespace qlora::cluster
