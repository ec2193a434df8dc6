// common/atomic_file.h: a written file is complete under its final name or not there at all. Writes
// and replacements land whole; every failure leaves no temporary behind and names the file; a symlink
// planted at the temporary name is never written through.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common/atomic_file.h"
#include "common/errors.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

class AtomicFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "qlora_atomic_file_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    folder_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(folder_, ignored);
  }

  std::string path(const std::string& name) const { return folder_ + "/" + name; }

  // The name write_file_atomically uses for its temporary beside `target`.
  static std::string temporary_for(const std::string& target) { return target + ".tmp." + std::to_string(::getpid()); }

  static std::string contents(const std::string& file) {
    std::ifstream in(file, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }

  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(folder_)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  // The UserError `write` must throw.
  template <typename Write>
  static std::string refusal(Write write) {
    try {
      write();
    } catch (const UserError& error) {
      return error.what();
    }
    ADD_FAILURE() << "expected a UserError";
    return "";
  }

  std::string folder_;
};

TEST_F(AtomicFileTest, WritesANewFileWholeAndLeavesNothingElse) {
  const std::string file = path("adapter_config.json");
  std::string bytes = "{\"r\": 16}\n";
  bytes += std::string(1, '\0') + std::string(100000, 'x');  // binary and larger than one page
  write_file_atomically(file, bytes);
  EXPECT_EQ(contents(file), bytes);
  EXPECT_EQ(fs::file_size(file), 10u + 1u + 100000u);
  EXPECT_EQ(entries(), std::vector<std::string>{"adapter_config.json"});
}

TEST_F(AtomicFileTest, WritesAnEmptyFile) {
  const std::string file = path("empty");
  write_file_atomically(file, "");
  ASSERT_TRUE(fs::is_regular_file(file));
  EXPECT_EQ(fs::file_size(file), 0u);
}

TEST_F(AtomicFileTest, ReplacesAnExistingFileEntirely) {
  const std::string file = path("metrics.json");
  std::ofstream(file) << std::string(5000, 'o');
  write_file_atomically(file, "short");
  EXPECT_EQ(contents(file), "short");  // not "short" followed by the old file's remaining bytes
  write_file_atomically(file, "second");
  EXPECT_EQ(contents(file), "second");
  EXPECT_EQ(entries(), std::vector<std::string>{"metrics.json"});
}

TEST_F(AtomicFileTest, AMissingFolderIsAUserErrorNamingTheFile) {
  const std::string file = path("missing/deeper/out.json");
  const std::string message = refusal([&] { write_file_atomically(file, "data"); });
  EXPECT_NE(message.find("cannot create " + temporary_for(file)), std::string::npos) << message;
  EXPECT_NE(message.find("No such file or directory"), std::string::npos) << message;
  EXPECT_TRUE(entries().empty());
  EXPECT_FALSE(fs::exists(path("missing")));
}

TEST_F(AtomicFileTest, ATargetThatIsAFolderFailsAtTheRenameAndLeavesNoTemporary) {
  const std::string target = path("out");
  fs::create_directory(target);
  std::ofstream(target + "/inside") << "kept";
  const std::string message = refusal([&] { write_file_atomically(target, "data"); });
  EXPECT_NE(message.find("cannot rename " + temporary_for(target) + " to " + target), std::string::npos) << message;
  EXPECT_EQ(entries(), std::vector<std::string>{"out"});
  ASSERT_TRUE(fs::is_directory(target));
  EXPECT_EQ(contents(target + "/inside"), "kept");
}

TEST_F(AtomicFileTest, APlantedSymlinkAtTheTemporaryNameIsNotWrittenThrough) {
  const std::string victim = path("victim");
  std::ofstream(victim) << "original";
  const std::string file = path("report.json");
  fs::create_symlink(victim, temporary_for(file));
  write_file_atomically(file, "report");
  EXPECT_EQ(contents(victim), "original");
  EXPECT_EQ(contents(file), "report");
  EXPECT_FALSE(fs::is_symlink(file));
  EXPECT_EQ(entries(), (std::vector<std::string>{"report.json", "victim"}));
}

TEST_F(AtomicFileTest, ATemporaryNameItCannotClearIsRefusedAndTheTargetKept) {
  // A folder squats on the temporary name: unlink cannot remove it, and the exclusive create must
  // then fail rather than reuse whatever is there.
  const std::string file = path("model.bin");
  std::ofstream(file) << "previous";
  fs::create_directory(temporary_for(file));
  const std::string message = refusal([&] { write_file_atomically(file, "new"); });
  EXPECT_NE(message.find("cannot create " + temporary_for(file) + ": File exists"), std::string::npos) << message;
  EXPECT_EQ(contents(file), "previous");
  EXPECT_TRUE(fs::is_directory(temporary_for(file)));
}

TEST_F(AtomicFileTest, SyncPathFlushesFilesAndFoldersAndNamesAMissingOne) {
  const std::string file = path("synced");
  std::ofstream(file) << "x";
  EXPECT_NO_THROW(sync_path(file));
  EXPECT_NO_THROW(sync_path(folder_));
  const std::string missing = path("absent");
  const std::string message = refusal([&] { sync_path(missing); });
  EXPECT_EQ(message, "cannot open " + missing + ": No such file or directory");
}

}  // namespace
}  // namespace qlora
