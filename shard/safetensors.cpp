// safetensors reader, sharded-checkpoint index reader and atomic writer. Checkpoints come from
// outside, so the reader trusts nothing in the header: every offset is checked against the mapping
// before a pointer into it is handed out, and every failure names the file and the tensor.
#include "shard/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>

#include "common/json.h"

namespace qlora::shard {

namespace {

using kernels::DType;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";
constexpr const char* kSingleFileName = "model.safetensors";
constexpr const char* kIndexFileName = "model.safetensors.index.json";

struct DtypeInfo {
  const char* code;
  int bits;  // sub-byte codes (F4, F6_*) exist, so sizes are kept in bits as the format defines
  bool known;
  DType dtype;  // meaningful only when known
};

// Every code the safetensors format defines; qlora computes with the first seven and carries the
// rest only far enough to bounds-check them.
constexpr DtypeInfo kDtypes[] = {
    {"F32", 32, true, DType::f32},       {"F16", 16, true, DType::f16},
    {"BF16", 16, true, DType::bf16},     {"U8", 8, true, DType::u8},
    {"I8", 8, true, DType::i8},          {"I32", 32, true, DType::i32},
    {"I64", 64, true, DType::i64},       {"BOOL", 8, false, DType::u8},
    {"F4", 4, false, DType::u8},         {"F6_E2M3", 6, false, DType::u8},
    {"F6_E3M2", 6, false, DType::u8},    {"F8_E5M2", 8, false, DType::u8},
    {"F8_E4M3", 8, false, DType::u8},    {"F8_E8M0", 8, false, DType::u8},
    {"I16", 16, false, DType::u8},       {"U16", 16, false, DType::u8},
    {"U32", 32, false, DType::u8},       {"U64", 64, false, DType::u8},
    {"F64", 64, false, DType::u8},       {"C64", 64, false, DType::u8},
};

const DtypeInfo* find_dtype_code(const std::string& code) {
  for (const DtypeInfo& info : kDtypes) {
    if (code == info.code) return &info;
  }
  return nullptr;
}

const char* code_of(DType dtype) {
  for (const DtypeInfo& info : kDtypes) {
    if (info.known && info.dtype == dtype) return info.code;
  }
  return "?";
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

std::string range_text(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

std::string tensor_label(const std::string& name) { return "tensor '" + name + "'"; }

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw FormatError(path + ": " + what);
}

[[noreturn]] void fail_tensor(const std::string& path, const std::string& name, const std::string& what) {
  throw FormatError(path + ": " + tensor_label(name) + ": " + what);
}

std::string errno_text(int error) { return std::strerror(error); }

std::string join_path(const std::string& directory, const std::string& name) {
  if (directory.empty()) return name;
  if (directory.back() == '/') return directory + name;
  return directory + "/" + name;
}

std::string parent_directory(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

bool is_regular_file(const std::string& path) {
  struct stat info;
  return ::stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

bool is_directory(const std::string& path) {
  struct stat info;
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

// An integer field's value, or nothing when the JSON value is not a number, is fractional or lies
// past int64: from the file's point of view all of those are simply not a valid count.
std::optional<int64_t> integer_of(const Json& value) {
  if (!value.is_number()) return std::nullopt;
  try {
    return json_as_int(value, "count");
  } catch (const FormatError&) {
    return std::nullopt;
  }
}

bool read_count(const Json& value, uint64_t* out) {
  const std::optional<int64_t> number = integer_of(value);
  if (!number || *number < 0) return false;
  *out = static_cast<uint64_t>(*number);
  return true;
}

// Everything the writer and reader agree on about one tensor's bytes: numel * bits / 8, with the
// overflow and whole-byte checks in one place.
bool tensor_bytes(const std::vector<int64_t>& shape, int bits, uint64_t* bytes, std::string* problem) {
  uint64_t numel = 1;
  for (const int64_t dim : shape) {
    if (dim < 0) {
      *problem = "negative dimension in shape " + shape_text(shape);
      return false;
    }
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dim), &numel) ||
        numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      *problem = "element count of shape " + shape_text(shape) + " overflows int64";
      return false;
    }
  }
  uint64_t total_bits;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(bits), &total_bits)) {
    *problem = "byte size of shape " + shape_text(shape) + " overflows 64 bits";
    return false;
  }
  if (total_bits % 8 != 0) {
    *problem = "shape " + shape_text(shape) + " holds " + std::to_string(total_bits) +
               " bits, not a whole number of bytes";
    return false;
  }
  *bytes = total_bits / 8;
  return true;
}

SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const Json& value,
                             uint64_t data_size) {
  if (!value.is_object()) fail_tensor(path, name, "header entry is not a JSON object");
  SafetensorsEntry entry;
  entry.name = name;

  if (!value.contains("dtype")) fail_tensor(path, name, "header entry has no 'dtype'");
  if (!value.at("dtype").is_string()) fail_tensor(path, name, "'dtype' is not a string");
  entry.dtype_code = value.at("dtype").get<std::string>();
  const DtypeInfo* info = find_dtype_code(entry.dtype_code);
  if (info == nullptr) fail_tensor(path, name, "unknown dtype '" + entry.dtype_code + "'");
  entry.dtype_known = info->known;
  entry.dtype = info->dtype;

  if (!value.contains("shape")) fail_tensor(path, name, "header entry has no 'shape'");
  const Json& shape = value.at("shape");
  if (!shape.is_array()) fail_tensor(path, name, "'shape' is not an array");
  for (const Json& dim : shape) {
    const std::optional<int64_t> number = integer_of(dim);
    if (!number) fail_tensor(path, name, "'shape' holds " + dump_json(dim) + ", not a non-negative integer");
    if (*number < 0) fail_tensor(path, name, "negative dimension " + std::to_string(*number) + " in 'shape'");
    entry.shape.push_back(*number);
  }

  if (!value.contains("data_offsets")) fail_tensor(path, name, "header entry has no 'data_offsets'");
  const Json& offsets = value.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2 || !read_count(offsets[0], &entry.begin) ||
      !read_count(offsets[1], &entry.end)) {
    fail_tensor(path, name, "'data_offsets' " + dump_json(offsets) + " is not a pair of non-negative integers");
  }

  uint64_t needed = 0;
  std::string problem;
  if (!tensor_bytes(entry.shape, info->bits, &needed, &problem)) {
    fail_tensor(path, name, entry.dtype_code + " " + problem);
  }
  if (entry.begin > entry.end) {
    fail_tensor(path, name, "data_offsets " + range_text(entry.begin, entry.end) + " begin after they end");
  }
  if (entry.end > data_size) {
    fail_tensor(path, name, "data_offsets " + range_text(entry.begin, entry.end) +
                                " lie outside the data section, which holds " + std::to_string(data_size) +
                                " bytes");
  }
  if (entry.end - entry.begin != needed) {
    fail_tensor(path, name, "data_offsets " + range_text(entry.begin, entry.end) + " hold " +
                                std::to_string(entry.end - entry.begin) + " bytes but " + entry.dtype_code +
                                " " + shape_text(entry.shape) + " needs " + std::to_string(needed));
  }
  return entry;
}

std::string read_whole_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: " + errno_text(errno));
  std::string text;
  char buffer[1 << 16];
  while (true) {
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got < 0) {
      if (errno == EINTR) continue;
      const int error = errno;
      ::close(fd);
      fail(path, "cannot read: " + errno_text(error));
    }
    if (got == 0) break;
    text.append(buffer, static_cast<size_t>(got));
  }
  ::close(fd);
  return text;
}

// Shard names come from a file we do not control; keep them inside the checkpoint directory.
bool is_safe_shard_name(const std::string& name) {
  if (name.empty() || name.front() == '/') return false;
  size_t start = 0;
  while (start <= name.size()) {
    size_t slash = name.find('/', start);
    if (slash == std::string::npos) slash = name.size();
    const std::string component = name.substr(start, slash - start);
    if (component == "..") return false;
    start = slash + 1;
  }
  return true;
}

}  // namespace

int64_t SafetensorsEntry::numel() const {
  int64_t count = 1;
  for (const int64_t dim : shape) count *= dim;
  return count;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: " + errno_text(errno));
  struct stat info;
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    ::close(fd);
    fail(path, "cannot stat: " + errno_text(error));
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(info.st_size);
  if (size < 8) {
    ::close(fd);
    fail(path, "file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  }
  void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_error = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (mapping == MAP_FAILED) fail(path, "cannot map: " + errno_text(map_error));
  file->mapping_ = static_cast<const uint8_t*>(mapping);
  file->file_size_ = size;
  file->owns_mapping_ = true;
  file->parse_image();
  return file;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::parse(const uint8_t* bytes, uint64_t size,
                                                        const std::string& label) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = label;
  if (size < 8) fail(label, "file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  file->mapping_ = bytes;
  file->file_size_ = size;
  file->parse_image();
  return file;
}

void SafetensorsFile::parse_image() {
  SafetensorsFile* file = this;
  const std::string& path = path_;
  const uint64_t size = file_size_;
  const uint8_t* bytes = file->mapping_;
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | bytes[i];
  if (header_length > kMaxHeaderBytes) {
    fail(path, "header length " + std::to_string(header_length) + " exceeds the limit of " +
                   std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (header_length > size - 8) {
    fail(path, "header length " + std::to_string(header_length) + " runs past the end of the " +
                   std::to_string(size) + "-byte file");
  }
  const char* header = reinterpret_cast<const char*>(bytes + 8);
  if (header_length == 0 || header[0] != '{') fail(path, "header is not a JSON object (it must start with '{')");
  const Json root = parse_json(std::string_view(header, header_length), path + ": header");
  if (!root.is_object()) fail(path, "header is not a JSON object");

  file->data_offset_ = 8 + header_length;
  const uint64_t data_size = size - file->data_offset_;

  for (const auto& [name, value] : root.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) fail(path, "__metadata__ is not a JSON object");
      for (const auto& [key, item] : value.items()) {
        if (!item.is_string()) {
          fail(path, "__metadata__ value for '" + key + "' is " + dump_json(item) + ", not a string");
        }
        file->metadata_.emplace(key, item.get<std::string>());
      }
      continue;
    }
    file->entries_.push_back(parse_entry(path, name, value, data_size));
  }

  // Checking layout in offset order turns "no overlaps, no holes, nothing trailing" into one walk.
  std::sort(file->entries_.begin(), file->entries_.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              if (a.begin != b.begin) return a.begin < b.begin;
              if (a.end != b.end) return a.end < b.end;
              return a.name < b.name;
            });
  uint64_t covered = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry& entry : file->entries_) {
    if (entry.begin < covered) {
      fail_tensor(path, entry.name, "data_offsets " + range_text(entry.begin, entry.end) + " overlap " +
                                        tensor_label(previous->name) + " at " +
                                        range_text(previous->begin, previous->end));
    }
    if (entry.begin > covered) {
      fail_tensor(path, entry.name, "data_offsets " + range_text(entry.begin, entry.end) +
                                        " leave a hole: bytes " + range_text(covered, entry.begin) +
                                        " of the data section belong to no tensor");
    }
    covered = entry.end;
    previous = &entry;
  }
  if (covered != data_size) {
    fail(path, "tensor data ends at byte " + std::to_string(covered) + " of the data section but the file holds " +
                   std::to_string(data_size) + " bytes after the header");
  }

  for (size_t i = 0; i < file->entries_.size(); ++i) file->index_.emplace(file->entries_[i].name, i);
}

SafetensorsFile::~SafetensorsFile() {
  if (owns_mapping_ && mapping_ != nullptr) ::munmap(const_cast<uint8_t*>(mapping_), file_size_);
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  const auto found = index_.find(name);
  return found == index_.end() ? nullptr : &entries_[found->second];
}

const SafetensorsEntry& SafetensorsFile::at(const std::string& name) const {
  const SafetensorsEntry* entry = find(name);
  if (entry == nullptr) fail(path_, "no " + tensor_label(name));
  return *entry;
}

const uint8_t* SafetensorsFile::data(const SafetensorsEntry& entry) const {
  // A caller could pass an entry from another file; never point outside this mapping.
  if (entry.begin > entry.end || entry.end > file_size_ - data_offset_) {
    fail_tensor(path_, entry.name, "data_offsets " + range_text(entry.begin, entry.end) +
                                       " lie outside this file's data section");
  }
  return mapping_ + data_offset_ + entry.begin;
}

std::unique_ptr<SafetensorsCheckpoint> SafetensorsCheckpoint::open_directory(const std::string& directory) {
  auto checkpoint = std::make_unique<SafetensorsCheckpoint>();
  const std::string single_path = join_path(directory, kSingleFileName);
  const std::string index_path = join_path(directory, kIndexFileName);

  // transformers prefers model.safetensors when both exist; do the same so both load one model.
  if (is_regular_file(single_path)) {
    checkpoint->files_.push_back(SafetensorsFile::open(single_path));
    for (const SafetensorsEntry& entry : checkpoint->files_.back()->entries()) {
      checkpoint->file_of_tensor_.emplace(entry.name, 0);
    }
    return checkpoint;
  }
  if (!is_regular_file(index_path)) {
    if (!is_directory(directory)) fail(directory, "not a directory");
    fail(directory, std::string("holds neither ") + kSingleFileName + " nor " + kIndexFileName);
  }

  const std::string text = read_whole_file(index_path);
  const Json index = parse_json(text, index_path);
  if (!index.is_object()) fail(index_path, "not a JSON object");
  if (!index.contains("weight_map")) fail(index_path, "has no 'weight_map'");
  const Json& weight_map = index.at("weight_map");
  if (!weight_map.is_object()) fail(index_path, "'weight_map' is not a JSON object");

  std::map<std::string, size_t> file_index_of_shard;
  for (const auto& [tensor, shard_value] : weight_map.items()) {
    if (!shard_value.is_string()) {
      fail(index_path, "weight_map entry for " + tensor_label(tensor) + " is " + dump_json(shard_value) +
                           ", not a file name");
    }
    const std::string& shard = shard_value.get_ref<const std::string&>();
    if (!is_safe_shard_name(shard)) {
      fail(index_path, "weight_map names shard '" + shard + "' for " + tensor_label(tensor) +
                           ", which is not a relative path inside the checkpoint");
    }
    auto found = file_index_of_shard.find(shard);
    if (found == file_index_of_shard.end()) {
      const std::string shard_path = join_path(directory, shard);
      if (!is_regular_file(shard_path)) {
        fail(index_path, "shard file '" + shard + "' (for " + tensor_label(tensor) + ") is missing: " +
                             shard_path + " does not exist");
      }
      checkpoint->files_.push_back(SafetensorsFile::open(shard_path));
      found = file_index_of_shard.emplace(shard, checkpoint->files_.size() - 1).first;
    }
    const SafetensorsFile& file = *checkpoint->files_[found->second];
    if (file.find(tensor) == nullptr) {
      fail(index_path, tensor_label(tensor) + " is listed in weight_map under '" + shard + "' but " +
                           file.path() + " does not contain it");
    }
    checkpoint->file_of_tensor_.emplace(tensor, found->second);
  }
  return checkpoint;
}

std::vector<std::string> SafetensorsCheckpoint::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(file_of_tensor_.size());
  for (const auto& [name, file] : file_of_tensor_) names.push_back(name);
  return names;
}

bool SafetensorsCheckpoint::contains(const std::string& name) const { return file_of_tensor_.count(name) != 0; }

const SafetensorsFile& SafetensorsCheckpoint::file_of(const std::string& name) const {
  const auto found = file_of_tensor_.find(name);
  if (found == file_of_tensor_.end()) {
    const std::string where = files_.empty() ? std::string("checkpoint") : parent_directory(files_[0]->path());
    fail(where, "no " + tensor_label(name) + " in the checkpoint");
  }
  return *files_[found->second];
}

const SafetensorsEntry& SafetensorsCheckpoint::entry(const std::string& name) const {
  return file_of(name).at(name);
}

const uint8_t* SafetensorsCheckpoint::data(const std::string& name) const {
  const SafetensorsFile& file = file_of(name);
  return file.data(file.at(name));
}

void SafetensorsWriter::add(const std::string& name, kernels::DType dtype, std::vector<int64_t> shape,
                            const void* data, size_t bytes) {
  // Misuse here is a bug in the caller, not bad input, hence invalid_argument rather than FormatError.
  if (name == kMetadataKey) throw std::invalid_argument("SafetensorsWriter: '__metadata__' is not a tensor name");
  if (tensors_.count(name) != 0) {
    throw std::invalid_argument("SafetensorsWriter: " + tensor_label(name) + " was added twice");
  }
  uint64_t needed = 0;
  std::string problem;
  if (!tensor_bytes(shape, kernels::dtype_size(dtype) * 8, &needed, &problem)) {
    throw std::invalid_argument("SafetensorsWriter: " + tensor_label(name) + ": " + problem);
  }
  if (needed != bytes) {
    throw std::invalid_argument("SafetensorsWriter: " + tensor_label(name) + ": " + std::to_string(bytes) +
                                " bytes given but " + code_of(dtype) + " " + shape_text(shape) + " needs " +
                                std::to_string(needed));
  }
  if (bytes > 0 && data == nullptr) {
    throw std::invalid_argument("SafetensorsWriter: " + tensor_label(name) + ": null data");
  }
  Pending pending{dtype, std::move(shape), {}};
  if (bytes > 0) {
    const uint8_t* first = static_cast<const uint8_t*>(data);
    pending.bytes.assign(first, first + bytes);
  }
  tensors_.emplace(name, std::move(pending));
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

namespace {

bool write_all(int fd, const void* data, size_t size) {
  const uint8_t* cursor = static_cast<const uint8_t*>(data);
  while (size > 0) {
    // Bounded chunks: some kernels cap a single write near 2 GiB.
    const size_t chunk = std::min<size_t>(size, size_t{1} << 30);
    const ssize_t written = ::write(fd, cursor, chunk);
    if (written < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    cursor += written;
    size -= static_cast<size_t>(written);
  }
  return true;
}

}  // namespace

void SafetensorsWriter::write(const std::string& path) const {
  Json header = Json::object();
  if (!metadata_.empty()) header[kMetadataKey] = metadata_;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors_) {
    const uint64_t end = offset + tensor.bytes.size();
    Json& entry = header[name];
    entry["dtype"] = code_of(tensor.dtype);
    entry["shape"] = tensor.shape;
    entry["data_offsets"] = Json::array({offset, end});
    offset = end;
  }
  std::string header_text = dump_json(header);
  // Padding to 8 keeps the data section, and so every 8-byte-multiple tensor, 8-byte aligned.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  if (header_text.size() > kMaxHeaderBytes) {
    fail(path, "header of " + std::to_string(header_text.size()) + " bytes exceeds the format's limit");
  }
  std::string prefix(8, '\0');
  uint64_t length = header_text.size();
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  prefix += header_text;

  // Write beside the target and rename, so readers see the old file or the whole new one.
  static std::atomic<unsigned> sequence{0};
  std::string temporary;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    temporary = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(sequence++);
    fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) fail(path, "cannot create temporary file " + temporary + ": " + errno_text(errno));

  auto abandon = [&](const std::string& what) {
    const int error = errno;
    ::close(fd);
    ::unlink(temporary.c_str());
    fail(path, what + ": " + errno_text(error));
  };
  if (!write_all(fd, prefix.data(), prefix.size())) abandon("cannot write");
  for (const auto& [name, tensor] : tensors_) {
    if (!tensor.bytes.empty() && !write_all(fd, tensor.bytes.data(), tensor.bytes.size())) abandon("cannot write");
  }
  if (::fsync(fd) != 0) abandon("cannot flush");
  if (::close(fd) != 0) {
    const int error = errno;
    ::unlink(temporary.c_str());
    fail(path, "cannot close: " + errno_text(error));
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(temporary.c_str());
    fail(path, "cannot rename " + temporary + " into place: " + errno_text(error));
  }
  // Persist the rename itself; failure here leaves a complete file either way, so it is not fatal.
  const int directory_fd = ::open(parent_directory(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (directory_fd >= 0) {
    ::fsync(directory_fd);
    ::close(directory_fd);
  }
}

SafetensorsLayout plan_safetensors(const std::vector<SafetensorsTensorSpec>& tensors,
                                   const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  SafetensorsLayout layout;
  uint64_t offset = 0;
  for (const auto& tensor : tensors) {
    if (tensor.name == kMetadataKey || header.contains(tensor.name))
      throw std::invalid_argument("plan_safetensors: " + tensor_label(tensor.name) + " is reserved or given twice");
    uint64_t bytes = 0;
    std::string problem;
    if (!tensor_bytes(tensor.shape, kernels::dtype_size(tensor.dtype) * 8, &bytes, &problem))
      throw std::invalid_argument("plan_safetensors: " + tensor_label(tensor.name) + ": " + problem);
    Json& entry = header[tensor.name];
    entry["dtype"] = code_of(tensor.dtype);
    entry["shape"] = tensor.shape;
    entry["data_offsets"] = Json::array({offset, offset + bytes});
    layout.file_offsets.push_back(offset);
    layout.tensor_bytes.push_back(bytes);
    offset += bytes;
  }
  std::string header_text = dump_json(header);
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  if (header_text.size() > kMaxHeaderBytes)
    throw FormatError("safetensors header of " + std::to_string(header_text.size()) +
                      " bytes exceeds the format's limit", "write smaller shards (--max-shard-size)");
  layout.header.assign(8, '\0');
  const uint64_t length = header_text.size();
  for (int i = 0; i < 8; ++i) layout.header[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  layout.header += header_text;
  for (auto& file_offset : layout.file_offsets) file_offset += layout.header.size();
  layout.file_size = layout.header.size() + offset;
  return layout;
}

}  // namespace qlora::shard
