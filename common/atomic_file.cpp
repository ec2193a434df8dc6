// Atomic whole-file writes with POSIX calls, so every failure (ENOSPC included) is seen and reported.
#include "common/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "common/errors.h"

namespace qlora {
namespace {

std::string hint_for(int error_number) {
  if (error_number == ENOSPC || error_number == EDQUOT) return "the file system is full: free space or choose another folder";
  if (error_number == EFBIG) return "the file exceeds the file-size limit (ulimit -f) or the file system's largest file";
  if (error_number == EACCES || error_number == EPERM || error_number == EROFS)
    return "check the permissions of the folder";
  return "";
}

[[noreturn]] void fail(const std::string& what, const std::string& path, int error_number) {
  throw UserError("cannot " + what + " " + path + ": " + std::strerror(error_number), hint_for(error_number));
}

std::string parent_of(const std::string& path) {
  const auto parent = std::filesystem::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

}  // namespace

void sync_path(const std::string& path) {
  const int descriptor = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (descriptor < 0) fail("open", path, errno);
  const int result = ::fsync(descriptor);
  const int error_number = errno;
  ::close(descriptor);
  // Some file systems (and folders on them) do not support fsync; that is not a lost write.
  if (result != 0 && error_number != EINVAL && error_number != ENOTSUP) fail("flush", path, error_number);
}

void write_file_atomically(const std::string& path, std::string_view bytes) {
  const std::string temporary = path + ".tmp." + std::to_string(::getpid());
  ::unlink(temporary.c_str());  // a leftover of an earlier crash of a process with our pid
  const int descriptor = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (descriptor < 0) fail("create", temporary, errno);
  auto abandon = [&](const std::string& what, int error_number) {
    ::close(descriptor);
    ::unlink(temporary.c_str());
    fail(what, temporary, error_number);
  };
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t result = ::write(descriptor, bytes.data() + written, bytes.size() - written);
    if (result < 0 && errno == EINTR) continue;
    if (result < 0) abandon("write", errno);
    written += static_cast<size_t>(result);
  }
  if (::fsync(descriptor) != 0) abandon("flush", errno);
  if (::close(descriptor) != 0) {
    const int error_number = errno;
    ::unlink(temporary.c_str());
    fail("close", temporary, error_number);
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    const int error_number = errno;
    ::unlink(temporary.c_str());
    fail("rename " + temporary + " to", path, error_number);
  }
  sync_path(parent_of(path));
}

}  // namespace qlora
