// A GoogleTest fixture for multi-rank suites that need a Communicator over MPI_COMM_WORLD: building
// one (and its fault watchdog) is collective, so each suite builds it once and every test shares it.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include "cluster/mpi_communicator.h"

namespace qlora::cluster {

class WorldCommunicatorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { shared() = make_mpi_communicator(MPI_COMM_WORLD); }
  static void TearDownTestSuite() { shared().reset(); }
  static Communicator& world() { return *shared(); }

 private:
  static std::unique_ptr<Communicator>& shared() {
    static std::unique_ptr<Communicator> communicator;
    return communicator;
  }
};

}  // namespace qlora::cluster
