// Whole-file writes that are either complete under their final name or absent: checkpoints,
// adapters and reports must never be seen half-written after a crash or a full disk.
#pragma once

#include <string>
#include <string_view>

namespace qlora {

// Writes `bytes` to a fresh temporary beside `path` (created exclusively, never through a symlink),
// flushes it to disk, then renames it over `path` and flushes the folder. On any failure the
// temporary is removed and a UserError names the file, the system's reason and a hint.
void write_file_atomically(const std::string& path, std::string_view bytes);

// Flushes a finished file (or folder) to stable storage; a UserError names it on failure.
void sync_path(const std::string& path);

}  // namespace qlora
