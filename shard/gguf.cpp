// GGUF reader and the Llama model config its metadata describes. A GGUF file comes from outside, so
// nothing in it is trusted: every length is checked against the bytes that remain before it is
// used, every count against the least space its entries could take (so a forged count cannot make
// us allocate or loop far past the file), and every tensor's extent against the data section,
// before any pointer into the mapping is handed out.
#include "shard/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "common/errors.h"

namespace qlora::shard {
namespace {

constexpr uint32_t kMinVersion = 2;   // v1 used 32-bit counts and lengths; llama.cpp dropped it too
constexpr uint32_t kMaxVersion = 3;
constexpr uint32_t kMaxDims = 4;      // GGML_MAX_DIMS
// ggml's own caps (GGUF_MAX_STRING_LENGTH); the file size bounds both long before this anyway.
constexpr uint64_t kMaxStringBytes = uint64_t{1} << 30;
// The specification's limits on names: keys below 2^16 bytes, tensor names at most 64 bytes.
constexpr uint64_t kMaxKeyBytes = 65535;
constexpr uint64_t kMaxTensorNameBytes = 64;
// Counts come from the file; reserve at most this many entries up front and let the rest grow as
// entries actually parse, so a forged count in a large file cannot demand a huge allocation.
constexpr uint64_t kMaxReserve = 4096;
constexpr const char* kAlignmentKey = "general.alignment";
constexpr double kPi = 3.14159265358979323846;

// Bytes of one scalar metadata value; 0 for string and array, whose size is in the file.
uint64_t fixed_value_bytes(GgufType type) {
  switch (type) {
    case GgufType::uint8: case GgufType::int8: case GgufType::boolean: return 1;
    case GgufType::uint16: case GgufType::int16: return 2;
    case GgufType::uint32: case GgufType::int32: case GgufType::float32: return 4;
    case GgufType::uint64: case GgufType::int64: case GgufType::float64: return 8;
    default: return 0;
  }
}

bool valid_value_type(uint32_t raw) { return raw <= static_cast<uint32_t>(GgufType::float64); }

bool is_integer_type(GgufType type) {
  switch (type) {
    case GgufType::uint8: case GgufType::int8: case GgufType::uint16: case GgufType::int16:
    case GgufType::uint32: case GgufType::int32: case GgufType::uint64: case GgufType::int64: return true;
    default: return false;
  }
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

template <typename T>
T load(const uint8_t* at) {
  T value;
  std::memcpy(&value, at, sizeof value);   // tensors and values need not be aligned in the file
  return value;
}

// A bounds-checked read position over the image. `what` in every call says what was being read, so
// a truncated file reports the field it ran out in.
class Cursor {
 public:
  Cursor(const uint8_t* bytes, uint64_t size, const std::string& path) : bytes_(bytes), size_(size), path_(path) {}

  uint64_t position() const { return position_; }
  const uint8_t* peek() const { return bytes_ + position_; }
  uint64_t remaining() const { return size_ - position_; }

  void need(uint64_t count, const std::string& what) const {
    if (count > remaining()) {
      throw FormatError(path_ + ": truncated: " + what + " needs " + std::to_string(count) + " bytes at offset " +
                        std::to_string(position_) + " but the file ends at " + std::to_string(size_));
    }
  }
  const uint8_t* take(uint64_t count, const std::string& what) {
    need(count, what);
    const uint8_t* at = bytes_ + position_;
    position_ += count;
    return at;
  }
  uint32_t u32(const std::string& what) { return load<uint32_t>(take(4, what)); }
  uint64_t u64(const std::string& what) { return load<uint64_t>(take(8, what)); }

  // A GGUF string: uint64 byte length, then the bytes (UTF-8, not NUL-terminated).
  std::string string(const std::string& what) {
    const uint64_t length = u64(what + " length");
    if (length > kMaxStringBytes)
      throw FormatError(path_ + ": " + what + " claims " + std::to_string(length) + " bytes, over the " +
                        std::to_string(kMaxStringBytes) + "-byte limit");
    if (length > remaining())
      throw FormatError(path_ + ": " + what + " claims " + std::to_string(length) + " bytes at offset " +
                        std::to_string(position_) + " but only " + std::to_string(remaining()) + " remain in the file");
    const uint8_t* at = take(length, what);
    return std::string(reinterpret_cast<const char*>(at), length);
  }

 private:
  const uint8_t* bytes_;
  uint64_t size_;
  uint64_t position_ = 0;
  const std::string& path_;
};

// Validates one metadata value of `type` at the cursor and moves past it. Arrays record their
// element type and count in `entry` at depth 0; deeper arrays are checked and skipped.
void read_value(Cursor& cursor, GgufType type, GgufMetadata* entry, int depth, const std::string& where,
                const std::string& path) {
  const uint64_t fixed = fixed_value_bytes(type);
  if (fixed != 0) {
    const uint8_t* at = cursor.take(fixed, where + " (" + gguf_type_name(type) + " value)");
    if (type == GgufType::boolean && *at > 1)
      throw FormatError(path + ": " + where + ": bool value " + std::to_string(*at) + " is neither 0 nor 1");
    return;
  }
  if (type == GgufType::string) {
    cursor.string(where + " (string value)");
    return;
  }
  // An array: element type, count, then the elements without per-element type tags.
  if (depth >= GgufFile::kMaxArrayNesting)
    throw FormatError(path + ": " + where + ": arrays nested more than " +
                      std::to_string(GgufFile::kMaxArrayNesting) + " deep");
  const uint32_t raw_element = cursor.u32(where + " (array element type)");
  if (!valid_value_type(raw_element))
    throw FormatError(path + ": " + where + ": unknown array element type " + std::to_string(raw_element));
  const GgufType element = static_cast<GgufType>(raw_element);
  const uint64_t count = cursor.u64(where + " (array length)");
  // The least bytes each element can take: its fixed size, a string's length field, a nested
  // array's type and count. A count the rest of the file cannot hold is rejected before looping.
  const uint64_t least = fixed_value_bytes(element) != 0 ? fixed_value_bytes(element)
                         : element == GgufType::string  ? 8
                                                        : 12;
  if (count > cursor.remaining() / least)
    throw FormatError(path + ": " + where + ": array of " + std::to_string(count) + " " + gguf_type_name(element) +
                      " elements cannot fit in the " + std::to_string(cursor.remaining()) +
                      " bytes left in the file");
  const uint64_t first = cursor.position();
  if (depth == 0 && entry != nullptr) {
    entry->element_type = element;
    entry->count = count;
    entry->offset = first;
  }
  // Element labels are built only on the way to an error: token lists hold ~10^5 strings.
  auto element_label = [&where](uint64_t i) { return where + " element " + std::to_string(i); };
  if (element == GgufType::boolean) {
    const uint8_t* values = cursor.take(count, where + " (array elements)");
    for (uint64_t i = 0; i < count; ++i) {
      if (values[i] > 1)
        throw FormatError(path + ": " + element_label(i) + ": bool value " + std::to_string(values[i]) +
                          " is neither 0 nor 1");
    }
  } else if (fixed_value_bytes(element) != 0) {
    cursor.take(count * fixed_value_bytes(element), where + " (array elements)");
  } else if (element == GgufType::string) {
    for (uint64_t i = 0; i < count; ++i) {
      const bool fits = cursor.remaining() >= 8 && load<uint64_t>(cursor.peek()) <= kMaxStringBytes &&
                        load<uint64_t>(cursor.peek()) <= cursor.remaining() - 8;
      if (!fits) {
        cursor.string(element_label(i) + " (string value)");   // throws the precise message
        continue;
      }
      cursor.take(8 + load<uint64_t>(cursor.peek()), "");
    }
  } else {
    for (uint64_t i = 0; i < count; ++i) read_value(cursor, element, nullptr, depth + 1, element_label(i), path);
  }
  if (depth == 0 && entry != nullptr) entry->bytes = cursor.position() - first;
}

// Widens the integer metadata value at `at` of `type`; false when it does not fit in int64.
bool integer_at(const uint8_t* at, GgufType type, int64_t* value) {
  switch (type) {
    case GgufType::uint8: *value = load<uint8_t>(at); return true;
    case GgufType::int8: *value = load<int8_t>(at); return true;
    case GgufType::uint16: *value = load<uint16_t>(at); return true;
    case GgufType::int16: *value = load<int16_t>(at); return true;
    case GgufType::uint32: *value = load<uint32_t>(at); return true;
    case GgufType::int32: *value = load<int32_t>(at); return true;
    case GgufType::int64: *value = load<int64_t>(at); return true;
    case GgufType::uint64: {
      const uint64_t wide = load<uint64_t>(at);
      if (wide > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
      *value = static_cast<int64_t>(wide);
      return true;
    }
    default: return false;
  }
}

std::string tensor_where(const std::string& path, const std::string& name) { return path + ": tensor '" + name + "'"; }
std::string key_where(const std::string& path, const std::string& key) { return path + ": key '" + key + "'"; }

}  // namespace

// ---- types --------------------------------------------------------------------------------------

std::string gguf_type_name(GgufType type) {
  static const char* const names[] = {"uint8", "int8",   "uint16", "int16", "uint32", "int32", "float32",
                                      "bool",  "string", "array",  "uint64", "int64", "float64"};
  const auto index = static_cast<uint32_t>(type);
  return index < sizeof names / sizeof names[0] ? names[index] : "type " + std::to_string(index);
}

int64_t GgufTensor::numel() const {
  int64_t count = 1;
  for (const int64_t dim : shape) count *= dim;   // the reader proved this cannot overflow
  return count;
}

// ---- the reader ---------------------------------------------------------------------------------

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FormatError(path + ": cannot open: " + std::strerror(errno));
  struct stat info;
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    ::close(fd);
    throw FormatError(path + ": cannot stat: " + std::strerror(error));
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    throw FormatError(path + ": not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(info.st_size);
  if (size == 0) {
    ::close(fd);
    throw FormatError(path + ": empty file, not GGUF");
  }
  void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_error = errno;
  ::close(fd);   // the mapping keeps the file alive
  if (mapping == MAP_FAILED) throw FormatError(path + ": cannot map: " + std::strerror(map_error));
  file->bytes_ = static_cast<const uint8_t*>(mapping);
  file->size_ = size;
  file->owns_mapping_ = true;
  file->parse_image();
  return file;
}

std::unique_ptr<GgufFile> GgufFile::parse(const uint8_t* bytes, uint64_t size, const std::string& label) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = label;
  file->bytes_ = bytes;
  file->size_ = size;
  file->parse_image();
  return file;
}

GgufFile::~GgufFile() {
  if (owns_mapping_ && bytes_ != nullptr) ::munmap(const_cast<uint8_t*>(bytes_), size_);
}

void GgufFile::parse_image() {
  const std::string& path = path_;
  Cursor cursor(bytes_, size_, path);

  const uint8_t* magic = cursor.take(4, "the magic 'GGUF'");
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    std::string shown;
    for (int i = 0; i < 4; ++i) shown += std::isprint(magic[i]) ? static_cast<char>(magic[i]) : '?';
    throw FormatError(path + ": not a GGUF file (magic '" + shown + "', expected 'GGUF')");
  }
  version_ = cursor.u32("the version");
  if (version_ != 0 && (version_ & 0xffffu) == 0)
    throw FormatError(path + ": version field reads " + std::to_string(version_) +
                      ": a big-endian GGUF file, which qlora does not read");
  if (version_ < kMinVersion)
    throw FormatError(path + ": GGUF version " + std::to_string(version_) + " is not supported (versions " +
                      std::to_string(kMinVersion) + " and " + std::to_string(kMaxVersion) +
                      " are; re-convert the model with a current llama.cpp)");
  if (version_ > kMaxVersion)
    throw FormatError(path + ": GGUF version " + std::to_string(version_) + " is newer than this qlora reads (up to " +
                      std::to_string(kMaxVersion) + ")");
  const uint64_t tensor_count = cursor.u64("the tensor count");
  const uint64_t kv_count = cursor.u64("the metadata count");
  // Least bytes per entry: a key is a length and at least one byte, a type and a 1-byte value; a
  // tensor is a name length, a dimension count, a type and an offset.
  if (kv_count > cursor.remaining() / 14)
    throw FormatError(path + ": metadata count " + std::to_string(kv_count) + " cannot fit in a " +
                      std::to_string(size_) + "-byte file");
  if (tensor_count > cursor.remaining() / 24)
    throw FormatError(path + ": tensor count " + std::to_string(tensor_count) + " cannot fit in a " +
                      std::to_string(size_) + "-byte file");

  metadata_.reserve(std::min(kv_count, kMaxReserve));
  for (uint64_t i = 0; i < kv_count; ++i) {
    const std::string entry_label = "metadata entry " + std::to_string(i);
    GgufMetadata entry;
    entry.key = cursor.string(entry_label + " key");
    if (entry.key.empty()) throw FormatError(path + ": " + entry_label + " has an empty key");
    if (entry.key.size() > kMaxKeyBytes)
      throw FormatError(path + ": " + entry_label + " has a " + std::to_string(entry.key.size()) +
                        "-byte key; keys are at most " + std::to_string(kMaxKeyBytes) + " bytes");
    if (key_index_.count(entry.key) != 0) throw FormatError(key_where(path, entry.key) + " appears twice");
    const std::string where = "key '" + entry.key + "'";
    const uint32_t raw_type = cursor.u32(where + " (value type)");
    if (!valid_value_type(raw_type))
      throw FormatError(key_where(path, entry.key) + " has unknown value type " + std::to_string(raw_type));
    entry.type = static_cast<GgufType>(raw_type);
    entry.offset = cursor.position();
    read_value(cursor, entry.type, &entry, 0, where, path);
    if (entry.type != GgufType::array) entry.bytes = cursor.position() - entry.offset;
    key_index_.emplace(entry.key, metadata_.size());
    metadata_.push_back(std::move(entry));
  }

  if (const GgufMetadata* alignment = find_key(kAlignmentKey)) {
    if (alignment->type != GgufType::uint32)
      throw FormatError(key_where(path, kAlignmentKey) + " is " + gguf_type_name(alignment->type) +
                        "; the format requires uint32");
    alignment_ = load<uint32_t>(bytes_ + alignment->offset);
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0)
      throw FormatError(key_where(path, kAlignmentKey) + " is " + std::to_string(alignment_) +
                        ", not a power of two");
  }

  tensors_.reserve(std::min(tensor_count, kMaxReserve));
  for (uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensor tensor;
    tensor.name = cursor.string("tensor " + std::to_string(i) + " name");
    if (tensor.name.empty()) throw FormatError(path + ": tensor " + std::to_string(i) + " has an empty name");
    if (tensor.name.size() > kMaxTensorNameBytes)
      throw FormatError(path + ": tensor " + std::to_string(i) + " has a " + std::to_string(tensor.name.size()) +
                        "-byte name; tensor names are at most " + std::to_string(kMaxTensorNameBytes) + " bytes");
    const std::string where = tensor_where(path, tensor.name);
    if (tensor_index_.count(tensor.name) != 0) throw FormatError(where + " appears twice");
    const std::string field = "tensor '" + tensor.name + "'";
    const uint32_t dims = cursor.u32(field + " dimension count");
    if (dims > kMaxDims)
      throw FormatError(where + " has " + std::to_string(dims) + " dimensions; ggml allows at most " +
                        std::to_string(kMaxDims));
    std::vector<int64_t> innermost_first(dims);
    int64_t numel = 1;
    for (uint32_t d = 0; d < dims; ++d) {
      const uint64_t extent = cursor.u64(field + " dimension " + std::to_string(d));
      if (extent > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw FormatError(where + ": dimension " + std::to_string(d) + " is " + std::to_string(extent) +
                          ", past int64");
      innermost_first[d] = static_cast<int64_t>(extent);
    }
    tensor.shape.assign(innermost_first.rbegin(), innermost_first.rend());
    for (const int64_t extent : innermost_first) {
      if (__builtin_mul_overflow(numel, extent, &numel))
        throw FormatError(where + ": element count of shape " + shape_text(tensor.shape) + " overflows int64");
    }
    tensor.type = cursor.u32(field + " type");
    const kernels::GgmlTypeInfo* info = kernels::ggml_type_info(tensor.type);
    if (info == nullptr) throw FormatError(where + " has unknown ggml type " + std::to_string(tensor.type));
    const int64_t row = dims == 0 ? 1 : innermost_first[0];
    if (row % info->block_elements != 0)
      throw FormatError(where + ": rows of " + std::to_string(row) + " elements are not a whole number of " +
                        info->name + " blocks of " + std::to_string(info->block_elements));
    const uint64_t blocks = static_cast<uint64_t>(numel / info->block_elements);
    if (__builtin_mul_overflow(blocks, info->block_bytes, &tensor.bytes))
      throw FormatError(where + ": byte size of " + info->name + " " + shape_text(tensor.shape) + " overflows 64 bits");
    tensor.offset = cursor.u64(field + " data offset");
    tensor_index_.emplace(tensor.name, tensors_.size());
    tensors_.push_back(std::move(tensor));
  }

  // The data section starts at the next multiple of the alignment after the tensor infos.
  const uint64_t infos_end = cursor.position();
  const uint64_t padding = (alignment_ - infos_end % alignment_) % alignment_;
  data_offset_ = infos_end + padding;   // infos_end <= size_ < 2^63, alignment_ < 2^32: no overflow
  if (!tensors_.empty() && data_offset_ > size_)
    throw FormatError(path + ": truncated: the tensor data section would start at byte " +
                      std::to_string(data_offset_) + " but the file ends at " + std::to_string(size_));
  const uint64_t data_size = data_offset_ <= size_ ? size_ - data_offset_ : 0;

  for (const GgufTensor& tensor : tensors_) {
    const std::string where = tensor_where(path, tensor.name);
    if (tensor.offset % alignment_ != 0)
      throw FormatError(where + ": data offset " + std::to_string(tensor.offset) + " is not a multiple of the " +
                        std::to_string(alignment_) + "-byte alignment");
    if (tensor.bytes > data_size || tensor.offset > data_size - tensor.bytes)
      throw FormatError(where + ": " + std::to_string(tensor.bytes) + " bytes at data offset " +
                        std::to_string(tensor.offset) + " run past the end of the file (the data section holds " +
                        std::to_string(data_size) + " bytes)");
  }
  // In offset order, a tensor overlaps an earlier one exactly when it starts before the furthest
  // end seen so far. Empty tensors occupy no bytes and cannot overlap anything.
  std::vector<size_t> order(tensors_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return tensors_[a].offset != tensors_[b].offset ? tensors_[a].offset < tensors_[b].offset : a < b;
  });
  const GgufTensor* furthest = nullptr;
  for (const size_t index : order) {
    const GgufTensor& tensor = tensors_[index];
    if (tensor.bytes == 0) continue;
    if (furthest != nullptr && tensor.offset < furthest->offset + furthest->bytes)
      throw FormatError(tensor_where(path, tensor.name) + ": bytes [" + std::to_string(tensor.offset) + ", " +
                        std::to_string(tensor.offset + tensor.bytes) + ") of the data section overlap tensor '" +
                        furthest->name + "' at [" + std::to_string(furthest->offset) + ", " +
                        std::to_string(furthest->offset + furthest->bytes) + ")");
    if (furthest == nullptr || tensor.offset + tensor.bytes > furthest->offset + furthest->bytes) furthest = &tensor;
  }
}

const GgufMetadata* GgufFile::find_key(const std::string& key) const {
  const auto found = key_index_.find(key);
  return found == key_index_.end() ? nullptr : &metadata_[found->second];
}

const GgufMetadata& GgufFile::require(const std::string& key) const {
  const GgufMetadata* entry = find_key(key);
  if (entry == nullptr) throw FormatError(path_ + ": missing metadata key '" + key + "'");
  return *entry;
}

std::string GgufFile::get_string(const std::string& key) const {
  const GgufMetadata& entry = require(key);
  if (entry.type != GgufType::string)
    throw FormatError(key_where(path_, key) + " is " + gguf_type_name(entry.type) + ", not a string");
  const uint64_t length = load<uint64_t>(bytes_ + entry.offset);
  return std::string(reinterpret_cast<const char*>(bytes_ + entry.offset + 8), length);
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufMetadata& entry = require(key);
  int64_t value = 0;
  if (!is_integer_type(entry.type))
    throw FormatError(key_where(path_, key) + " is " + gguf_type_name(entry.type) + ", not an integer");
  if (!integer_at(bytes_ + entry.offset, entry.type, &value))
    throw FormatError(key_where(path_, key) + " holds " + std::to_string(load<uint64_t>(bytes_ + entry.offset)) +
                      ", past int64");
  return value;
}

double GgufFile::get_float(const std::string& key) const {
  const GgufMetadata& entry = require(key);
  if (entry.type == GgufType::float32) return load<float>(bytes_ + entry.offset);
  if (entry.type == GgufType::float64) return load<double>(bytes_ + entry.offset);
  if (is_integer_type(entry.type)) return static_cast<double>(get_int(key));
  throw FormatError(key_where(path_, key) + " is " + gguf_type_name(entry.type) + ", not a number");
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufMetadata& entry = require(key);
  if (entry.type != GgufType::boolean)
    throw FormatError(key_where(path_, key) + " is " + gguf_type_name(entry.type) + ", not a bool");
  return bytes_[entry.offset] != 0;
}

uint64_t GgufFile::get_array_length(const std::string& key) const {
  const GgufMetadata& entry = require(key);
  if (entry.type != GgufType::array)
    throw FormatError(key_where(path_, key) + " is " + gguf_type_name(entry.type) + ", not an array");
  return entry.count;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufMetadata& entry = require(key);
  if (entry.type != GgufType::array || entry.element_type != GgufType::string)
    throw FormatError(key_where(path_, key) + " is not an array of strings");
  std::vector<std::string> values;
  values.reserve(entry.count);
  uint64_t at = entry.offset;
  for (uint64_t i = 0; i < entry.count; ++i) {   // lengths were all checked by the parser
    const uint64_t length = load<uint64_t>(bytes_ + at);
    values.emplace_back(reinterpret_cast<const char*>(bytes_ + at + 8), length);
    at += 8 + length;
  }
  return values;
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const GgufMetadata& entry = require(key);
  if (entry.type != GgufType::array || !is_integer_type(entry.element_type))
    throw FormatError(key_where(path_, key) + " is not an array of integers");
  const uint64_t stride = fixed_value_bytes(entry.element_type);
  std::vector<int64_t> values(entry.count);
  for (uint64_t i = 0; i < entry.count; ++i) {
    if (!integer_at(bytes_ + entry.offset + i * stride, entry.element_type, &values[i]))
      throw FormatError(key_where(path_, key) + ": element " + std::to_string(i) + " is past int64");
  }
  return values;
}

std::vector<double> GgufFile::get_float_array(const std::string& key) const {
  const GgufMetadata& entry = require(key);
  if (entry.type != GgufType::array ||
      (entry.element_type != GgufType::float32 && entry.element_type != GgufType::float64))
    throw FormatError(key_where(path_, key) + " is not an array of float32 or float64");
  std::vector<double> values(entry.count);
  for (uint64_t i = 0; i < entry.count; ++i) {
    values[i] = entry.element_type == GgufType::float32 ? load<float>(bytes_ + entry.offset + 4 * i)
                                                        : load<double>(bytes_ + entry.offset + 8 * i);
  }
  return values;
}

std::string GgufFile::get_string(const std::string& key, const std::string& fallback) const {
  return has_key(key) ? get_string(key) : fallback;
}
int64_t GgufFile::get_int(const std::string& key, int64_t fallback) const {
  return has_key(key) ? get_int(key) : fallback;
}
double GgufFile::get_float(const std::string& key, double fallback) const {
  return has_key(key) ? get_float(key) : fallback;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  const auto found = tensor_index_.find(name);
  return found == tensor_index_.end() ? nullptr : &tensors_[found->second];
}

const GgufTensor& GgufFile::tensor(const std::string& name) const {
  const GgufTensor* tensor = find_tensor(name);
  if (tensor == nullptr) throw FormatError(path_ + ": no tensor '" + name + "'");
  return *tensor;
}

const uint8_t* GgufFile::data(const GgufTensor& tensor) const {
  // A caller could pass a tensor of another file; never point outside this image.
  const uint64_t data_size = data_offset_ <= size_ ? size_ - data_offset_ : 0;
  if (tensor.bytes > data_size || tensor.offset > data_size - tensor.bytes)
    throw FormatError(tensor_where(path_, tensor.name) + ": data lies outside this file's data section");
  return bytes_ + data_offset_ + tensor.offset;
}

void GgufFile::dequantize(const GgufTensor& tensor, float* output) const {
  if (!kernels::ggml_type_dequantizable(tensor.type))
    throw FormatError(tensor_where(path_, tensor.name) + " is " + kernels::ggml_type_name(tensor.type) +
                      ", which qlora cannot dequantize (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
  kernels::dequantize_ggml(tensor.type, data(tensor), tensor.numel(), output);
}

std::vector<float> GgufFile::dequantize(const GgufTensor& tensor) const {
  std::vector<float> values(static_cast<size_t>(tensor.numel()));
  dequantize(tensor, values.data());
  return values;
}

// ---- the Llama config --------------------------------------------------------------------------

namespace {

// llama.cpp's converter writes Llama 3's rope scaling not as metadata but as the per-frequency
// divisors it implies (rope_freqs.weight). Recover the parameters by recomputing those divisors
// with the only low/high frequency factors Llama 3.x uses and checking they match. Leaves `scaling`
// empty (no scaling) when every factor is 1.
void read_llama3_rope(const GgufFile& file, const GgufTensor& freqs, int64_t head_dim, double theta,
                      const std::string& prefix, RopeScaling& scaling) {
  const std::string where = tensor_where(file.path(), freqs.name);
  if (freqs.numel() != head_dim / 2)
    throw FormatError(where + " has " + std::to_string(freqs.numel()) + " elements; head_dim " +
                      std::to_string(head_dim) + " needs " + std::to_string(head_dim / 2));
  const std::vector<float> factors = file.dequantize(freqs);
  const double factor = *std::max_element(factors.begin(), factors.end());
  const bool all_one = std::all_of(factors.begin(), factors.end(), [](float f) { return f == 1.0f; });
  if (all_one) return;
  const double low_freq_factor = 1.0, high_freq_factor = 4.0;
  const int64_t original = file.get_int(prefix + "rope.scaling.original_context_length", 8192);
  const double low_wavelen = original / low_freq_factor, high_wavelen = original / high_freq_factor;
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const double frequency = 1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
    const double wavelen = 2.0 * kPi / frequency;
    double expected = 1.0;
    if (wavelen > low_wavelen) {
      expected = factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
      expected = 1.0 / ((1.0 - smooth) / factor + smooth);
    }
    // fp32 storage and torch's fp32 frequencies: agree to a few ulps, not bit for bit.
    if (std::fabs(factors[i] - expected) > 1e-4 * std::fabs(expected))
      throw FormatError(where + ": the rope frequency factors are not llama3 scaling (factor " +
                        std::to_string(factor) + ", low_freq_factor 1, high_freq_factor 4, original context " +
                        std::to_string(original) + "): element " + std::to_string(i) + " is " +
                        std::to_string(factors[i]) + ", expected " + std::to_string(expected) +
                        "; other rope scalings are not supported");
  }
  scaling.type = "llama3";
  scaling.factor = factor;
  scaling.low_freq_factor = low_freq_factor;
  scaling.high_freq_factor = high_freq_factor;
  scaling.original_max_position_embeddings = original;
}

}  // namespace

ModelConfig llama_config_from_gguf(const GgufFile& file) {
  const std::string& path = file.path();
  const std::string architecture = file.get_string("general.architecture");
  if (architecture != "llama")
    throw FormatError(path + ": general.architecture is '" + architecture +
                      "'; qlora converts GGUF files of the 'llama' architecture only");
  const std::string prefix = architecture + ".";
  auto positive = [&](const std::string& key) {
    const int64_t value = file.get_int(key);
    if (value <= 0) throw FormatError(key_where(path, key) + " is " + std::to_string(value) + ", not positive");
    return value;
  };
  const std::string head_count_kv_key = prefix + "attention.head_count_kv";
  for (const std::string& key : {prefix + "attention.head_count", head_count_kv_key, prefix + "feed_forward_length"}) {
    const GgufMetadata* entry = file.find_key(key);
    if (entry != nullptr && entry->type == GgufType::array)
      throw FormatError(key_where(path, key) + " varies per layer, which the Llama architecture does not allow");
  }

  ModelConfig config;
  config.architecture = "llama";
  const int64_t hidden = positive(prefix + "embedding_length");
  const int64_t heads = positive(prefix + "attention.head_count");
  config.hidden_size = hidden;
  config.intermediate_size = positive(prefix + "feed_forward_length");
  config.num_hidden_layers = positive(prefix + "block_count");
  config.num_attention_heads = heads;
  config.num_key_value_heads = file.has_key(head_count_kv_key) ? positive(head_count_kv_key) : heads;
  int64_t head_dim = hidden / heads;
  if (file.has_key(prefix + "attention.key_length")) {
    head_dim = positive(prefix + "attention.key_length");
    const int64_t value_length = file.get_int(prefix + "attention.value_length", head_dim);
    if (value_length != head_dim)
      throw FormatError(path + ": attention.key_length " + std::to_string(head_dim) + " and value_length " +
                        std::to_string(value_length) + " differ, which the Llama architecture does not allow");
  } else if (hidden % heads != 0) {
    throw FormatError(path + ": embedding_length " + std::to_string(hidden) + " is not a multiple of head_count " +
                      std::to_string(heads) + " and no attention.key_length says the head size");
  }
  config.head_dim = head_dim;
  const int64_t rope_dims = file.get_int(prefix + "rope.dimension_count", head_dim);
  if (rope_dims != head_dim)
    throw FormatError(key_where(path, prefix + "rope.dimension_count") + " is " + std::to_string(rope_dims) +
                      " but heads are " + std::to_string(head_dim) + " wide; partial rotary embeddings are not supported");

  int64_t vocab = 0;
  if (file.has_key("tokenizer.ggml.tokens")) {
    vocab = static_cast<int64_t>(file.get_array_length("tokenizer.ggml.tokens"));
  } else if (file.has_key(prefix + "vocab_size")) {
    vocab = file.get_int(prefix + "vocab_size");
  } else if (const GgufTensor* embedding = file.find_tensor("token_embd.weight")) {
    vocab = embedding->shape.empty() ? 0 : embedding->shape.front();
  }
  if (vocab <= 0)
    throw FormatError(path + ": cannot tell the vocabulary size (no tokenizer.ggml.tokens, " + prefix +
                      "vocab_size or token_embd.weight)");
  config.vocab_size = vocab;
  config.max_position_embeddings =
      file.has_key(prefix + "context_length") ? positive(prefix + "context_length") : int64_t{2048};
  config.rms_norm_eps = file.get_float(prefix + "attention.layer_norm_rms_epsilon", 1e-5);
  const double theta = file.get_float(prefix + "rope.freq_base", 10000.0);
  config.rope_theta = theta;
  config.tie_word_embeddings = file.find_tensor("output.weight") == nullptr;

  const std::string scaling_type = file.get_string(prefix + "rope.scaling.type", "none");
  if (scaling_type != "none")
    throw FormatError(key_where(path, prefix + "rope.scaling.type") + " is '" + scaling_type +
                      "'; only unscaled and llama3 rope are supported");
  if (const GgufTensor* freqs = file.find_tensor("rope_freqs.weight"))
    read_llama3_rope(file, *freqs, head_dim, theta, prefix, config.rope_scaling);

  // The dtype dense tensors are stored in follows the embedding: 16-bit sources stay 16-bit,
  // anything dequantized becomes fp32.
  config.torch_dtype = "float32";
  if (const GgufTensor* embedding = file.find_tensor("token_embd.weight")) {
    if (embedding->type == kernels::ggml_type::f16) config.torch_dtype = "float16";
    if (embedding->type == kernels::ggml_type::bf16) config.torch_dtype = "bfloat16";
  }
  // The rules every model config obeys (key/value heads dividing the heads, an even head_dim) are
  // ModelConfig::from_json's; passing the config through it keeps them in that one place.
  return ModelConfig::from_json(config.to_json(), path);
}

}  // namespace qlora::shard
