// Implementation of the shared test helpers.
#include "support/test_support.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <vector>

#include "shard/converter.h"

namespace qlora::testing_support {

std::string shared_temp_dir(MPI_Comm comm) {
  static std::map<MPI_Comm, std::string> cache;
  auto found = cache.find(comm);
  if (found != cache.end()) return found->second;
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  std::array<char, 4096> path{};
  if (rank == 0) {
    std::string pattern = (std::filesystem::temp_directory_path() / "qlora-test-XXXXXX").string();
    std::vector<char> writable(pattern.begin(), pattern.end());
    writable.push_back('\0');
    if (mkdtemp(writable.data()) == nullptr) std::abort();
    std::snprintf(path.data(), path.size(), "%s", writable.data());
    static std::vector<std::string> to_remove;
    to_remove.push_back(path.data());
    std::atexit([] {
      for (const auto& folder : to_remove) std::filesystem::remove_all(folder);
    });
  }
  MPI_Bcast(path.data(), static_cast<int>(path.size()), MPI_CHAR, 0, comm);
  cache[comm] = path.data();
  return path.data();
}

std::string synthetic_store(const std::string& preset, int64_t blocksize, MPI_Comm comm) {
  const std::string path = shared_temp_dir(comm) + "/" + preset + "-b" + std::to_string(blocksize) + ".h5";
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  if (rank == 0 && !std::filesystem::exists(path)) {
    shard::ConvertOptions options;
    options.blocksize = blocksize;
    shard::convert_synthetic(preset, path, options);
  }
  MPI_Barrier(comm);
  return path;
}

std::string qlora_binary() {
  const char* binary = std::getenv("QLORA_BINARY");
  return binary != nullptr ? binary : "qlora";
}

int run_command(const std::string& command, std::string* output) {
  // This process is an MPI singleton: its OMPI_* / PMIX_* variables would make a child mpirun try to
  // join it. Start children with those removed (keeping the allow-root switches).
  std::string unset;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    const std::string variable(*entry);
    const std::string name = variable.substr(0, variable.find('='));
    const bool mpi_variable = name.rfind("OMPI_", 0) == 0 || name.rfind("PMIX_", 0) == 0 || name.rfind("OPAL_", 0) == 0;
    if (mpi_variable && name.rfind("OMPI_ALLOW_RUN_AS_ROOT", 0) != 0) unset += " -u " + name;
  }
  FILE* pipe = popen(("env" + unset + " " + command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return -1;
  std::array<char, 4096> buffer{};
  output->clear();
  size_t read = 0;
  while ((read = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0) output->append(buffer.data(), read);
  const int status = pclose(pipe);
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

std::string source_dir() {
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  return source != nullptr ? source : ".";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void write_file(const std::string& path, const std::string& text) {
  const auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  std::ofstream(path, std::ios::binary) << text;
}

}  // namespace qlora::testing_support
