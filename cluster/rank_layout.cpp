// Rank discovery: which rank, node and local rank this process is, and the node table.
#include "cluster/rank_layout.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "cluster/mpi_communicator.h"

namespace qlora::cluster {

RankLayout discover_rank_layout(MPI_Comm comm) {
  RankLayout layout;
  MPI_Comm_rank(comm, &layout.rank);
  MPI_Comm_size(comm, &layout.world);
  MPI_Comm local;
  MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, layout.rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &layout.local_rank);
  MPI_Comm_size(local, &layout.local_size);
  // Node index: the local-rank-0 processes, ordered by their world rank.
  MPI_Comm leaders;
  MPI_Comm_split(comm, layout.local_rank == 0 ? 0 : MPI_UNDEFINED, layout.rank, &leaders);
  int node = 0;
  int nodes = 1;
  if (leaders != MPI_COMM_NULL) {
    MPI_Comm_rank(leaders, &node);
    MPI_Comm_size(leaders, &nodes);
    MPI_Comm_free(&leaders);
  }
  MPI_Bcast(&node, 1, MPI_INT, 0, local);
  MPI_Bcast(&nodes, 1, MPI_INT, 0, local);
  MPI_Comm_free(&local);
  layout.node = node;
  layout.nodes = nodes;
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  layout.hostname = host;
  // Informational only: OpenMPI's singleton start sets PMIX_RANK too, so only SLURM_STEP_ID says srun.
  if (std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr)
    layout.launcher = "mpirun";
  else if (std::getenv("SLURM_STEP_ID") != nullptr)
    layout.launcher = "srun";
  else
    layout.launcher = "single process";
  return layout;
}

std::vector<std::string> describe_nodes(MPI_Comm comm, const RankLayout& layout) {
  const std::string record = std::to_string(layout.node) + " " + std::to_string(layout.rank) + " " +
                             std::to_string(layout.local_rank) + " " + layout.hostname;
  const auto records = gather_records_to_root(comm, record);
  std::map<int, std::pair<std::string, std::vector<int>>> by_node;
  for (const auto& line : records) {
    int node = 0, rank = 0, local_rank = 0;
    char host[256] = {0};
    if (std::sscanf(line.c_str(), "%d %d %d %255s", &node, &rank, &local_rank, host) == 4) {
      by_node[node].first = host;
      by_node[node].second.push_back(rank);
    }
  }
  std::vector<std::string> lines;
  for (auto& [node, entry] : by_node) {
    auto& ranks = entry.second;
    std::sort(ranks.begin(), ranks.end());
    std::string text = "node " + std::to_string(node) + " " + entry.first + ": ranks";
    for (int rank : ranks) text += " " + std::to_string(rank);
    lines.push_back(text);
  }
  return lines;
}

}  // namespace qlora::cluster
