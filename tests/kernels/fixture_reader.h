// Reads the golden fixture files written by scripts/make_kernel_fixtures.py (format described there):
// named entries of text or little-endian arrays, so the codec tests compare against bitsandbytes'
// own bytes without Python.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora::kernels::testing {

struct FixtureEntry {
  char kind = 0;         // 's', 'f', 'h', 'b', 'B', 'c'
  uint64_t count = 0;    // elements
  std::vector<uint8_t> bytes;

  template <typename T>
  std::vector<T> as() const {
    if (bytes.size() != count * sizeof(T)) throw std::runtime_error("fixture entry has another element size");
    std::vector<T> values(count);
    if (count > 0) std::memcpy(values.data(), bytes.data(), bytes.size());
    return values;
  }
  std::string text() const { return std::string(bytes.begin(), bytes.end()); }
};

class Fixture {
 public:
  explicit Fixture(const std::filesystem::path& path) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open fixture " + path.string());
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (data.size() < 4 || std::memcmp(data.data(), "QKF1", 4) != 0) {
      throw std::runtime_error("not a QKF1 fixture: " + path.string());
    }
    size_t at = 4;
    auto need = [&](size_t bytes) {
      if (at + bytes > data.size()) throw std::runtime_error("truncated fixture " + path.string());
    };
    while (at < data.size()) {
      need(2);
      const uint16_t name_length = static_cast<uint16_t>(data[at] | (data[at + 1] << 8));
      at += 2;
      need(name_length + 9u);
      std::string name(reinterpret_cast<const char*>(&data[at]), name_length);
      at += name_length;
      FixtureEntry entry;
      entry.kind = static_cast<char>(data[at++]);
      for (int byte = 0; byte < 8; ++byte) entry.count |= static_cast<uint64_t>(data[at + byte]) << (8 * byte);
      at += 8;
      const size_t element_size = element_size_of(entry.kind);
      need(entry.count * element_size);
      entry.bytes.assign(data.begin() + static_cast<std::ptrdiff_t>(at),
                         data.begin() + static_cast<std::ptrdiff_t>(at + entry.count * element_size));
      at += entry.count * element_size;
      entries_[name] = std::move(entry);
    }
    std::istringstream meta(entry("meta").text());
    std::string pair;
    while (meta >> pair) {
      const size_t equals = pair.find('=');
      if (equals != std::string::npos) meta_[pair.substr(0, equals)] = pair.substr(equals + 1);
    }
  }

  bool has(const std::string& name) const { return entries_.count(name) > 0; }
  const FixtureEntry& entry(const std::string& name) const {
    const auto found = entries_.find(name);
    if (found == entries_.end()) throw std::runtime_error(path_.string() + " has no entry " + name);
    return found->second;
  }
  std::string meta(const std::string& key) const {
    const auto found = meta_.find(key);
    return found == meta_.end() ? std::string() : found->second;
  }
  int64_t meta_int(const std::string& key) const { return std::stoll(meta(key)); }
  std::string name() const { return path_.stem().string(); }

 private:
  static size_t element_size_of(char kind) {
    switch (kind) {
      case 's': case 'B': case 'c': return 1;
      case 'h': case 'b': return 2;
      case 'f': return 4;
    }
    throw std::runtime_error(std::string("unknown fixture entry kind ") + kind);
  }

  std::filesystem::path path_;
  std::map<std::string, FixtureEntry> entries_;
  std::map<std::string, std::string> meta_;
};

// tests/fixtures/kernels (or a subfolder of it): QLORA_SOURCE_DIR when CTest sets it, else found
// from this header's own location.
inline std::filesystem::path fixture_directory(const std::string& subfolder = "") {
  std::filesystem::path root;
  if (const char* source = std::getenv("QLORA_SOURCE_DIR"); source != nullptr && *source != '\0') {
    root = std::filesystem::path(source) / "tests" / "fixtures" / "kernels";
  } else {
    root = std::filesystem::path(__FILE__).parent_path().parent_path() / "fixtures" / "kernels";
  }
  return subfolder.empty() ? root : root / subfolder;
}

// Every fixture of one kind ("4bit", "double_quant", "int8", "tables") in a folder, sorted by name.
inline std::vector<Fixture> load_fixtures(const std::string& kind, const std::string& subfolder = "") {
  std::vector<std::filesystem::path> paths;
  const auto directory = fixture_directory(subfolder);
  if (!std::filesystem::exists(directory)) return {};
  for (const auto& file : std::filesystem::directory_iterator(directory)) {
    if (file.path().extension() == ".qkf") paths.push_back(file.path());
  }
  std::sort(paths.begin(), paths.end());
  std::vector<Fixture> fixtures;
  for (const auto& path : paths) {
    Fixture fixture(path);
    if (fixture.meta("kind") == kind) fixtures.push_back(std::move(fixture));
  }
  return fixtures;
}

}  // namespace qlora::kernels::testing
