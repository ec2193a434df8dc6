// MPI backend of Communicator: host buffers, any MPI launcher (mpirun, srun --mpi=pmix, singleton).
#pragma once

#include <mpi.h>

#include <memory>
#include <string>
#include <vector>

#include "cluster/communicator.h"

namespace qlora::cluster {

// Uses (does not own) `comm`; MPI must be initialised and outlive the communicator.
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm);

// Gather of variable-length control records to rank 0 over MPI (shared by every backend).
std::vector<std::string> gather_records_to_root(MPI_Comm comm, const std::string& record);

}  // namespace qlora::cluster
