// Helpers shared by the suites: a temporary folder every rank of the test job agrees on, and
// synthetic model stores made once per job.
#pragma once

#include <mpi.h>

#include <string>

namespace qlora::testing_support {

// Created by rank 0 of `comm` and broadcast; removed at process exit by rank 0.
std::string shared_temp_dir(MPI_Comm comm = MPI_COMM_WORLD);

// A synthetic store ("micro", "tiny") in the shared temp folder, written once by rank 0.
std::string synthetic_store(const std::string& preset, int64_t blocksize = 64, MPI_Comm comm = MPI_COMM_WORLD);

// The built `qlora` binary (from the QLORA_BINARY environment variable CTest sets).
std::string qlora_binary();

// The source tree (QLORA_SOURCE_DIR, which CTest sets; "." otherwise), for fixtures and sample text.
std::string source_dir();
// Whole-file reads and writes for test inputs; write_file creates missing parent folders.
std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& text);

// Runs a shell command, capturing stdout+stderr; returns the exit code (not the wait status).
int run_command(const std::string& command, std::string* output);

}  // namespace qlora::testing_support
