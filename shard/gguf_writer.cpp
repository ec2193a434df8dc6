// GGUF v3 header writing (the format as llama.cpp's gguf.c and the gguf Python package write it:
// little-endian, strings as uint64 length + bytes, dimensions innermost first, tensor offsets
// relative to the data section and aligned to general.alignment).
#include "shard/gguf_writer.h"

#include <algorithm>
#include <stdexcept>

#include "kernels/ggml_blocks.h"

namespace qlora::shard {

uint64_t ggml_tensor_bytes(uint32_t ggml_type, int64_t numel) {
  const kernels::GgmlTypeInfo* info = kernels::ggml_type_info(ggml_type);
  if (info == nullptr || numel < 0 || numel % info->block_elements != 0)
    throw std::invalid_argument("ggml_tensor_bytes: " + std::to_string(numel) + " elements of " +
                                kernels::ggml_type_name(ggml_type));
  return static_cast<uint64_t>(numel / info->block_elements) * info->block_bytes;
}

void GgufHeaderBuilder::append_text(std::string& out, const std::string& text) const {
  append(out, static_cast<uint64_t>(text.size()));
  out += text;
}

void GgufHeaderBuilder::start(const std::string& key, GgufType type) {
  if (has_key(key)) throw std::invalid_argument("GgufHeaderBuilder: key '" + key + "' given twice");
  keys_.push_back(key);
  append_text(metadata_, key);
  append(metadata_, static_cast<uint32_t>(type));
  ++metadata_count_;
}

bool GgufHeaderBuilder::has_key(const std::string& key) const {
  return std::find(keys_.begin(), keys_.end(), key) != keys_.end();
}

void GgufHeaderBuilder::add_string(const std::string& key, const std::string& value) {
  start(key, GgufType::string);
  append_text(metadata_, value);
}

void GgufHeaderBuilder::add_uint32(const std::string& key, uint32_t value) {
  start(key, GgufType::uint32);
  append(metadata_, value);
}

void GgufHeaderBuilder::add_int32(const std::string& key, int32_t value) {
  start(key, GgufType::int32);
  append(metadata_, value);
}

void GgufHeaderBuilder::add_float32(const std::string& key, float value) {
  start(key, GgufType::float32);
  append(metadata_, value);
}

void GgufHeaderBuilder::add_bool(const std::string& key, bool value) {
  start(key, GgufType::boolean);
  append(metadata_, static_cast<uint8_t>(value ? 1 : 0));
}

void GgufHeaderBuilder::add_string_array(const std::string& key, const std::vector<std::string>& values) {
  start(key, GgufType::array);
  append(metadata_, static_cast<uint32_t>(GgufType::string));
  append(metadata_, static_cast<uint64_t>(values.size()));
  for (const auto& value : values) append_text(metadata_, value);
}

void GgufHeaderBuilder::add_float32_array(const std::string& key, const std::vector<float>& values) {
  start(key, GgufType::array);
  append(metadata_, static_cast<uint32_t>(GgufType::float32));
  append(metadata_, static_cast<uint64_t>(values.size()));
  for (float value : values) append(metadata_, value);
}

void GgufHeaderBuilder::add_int32_array(const std::string& key, const std::vector<int32_t>& values) {
  start(key, GgufType::array);
  append(metadata_, static_cast<uint32_t>(GgufType::int32));
  append(metadata_, static_cast<uint64_t>(values.size()));
  for (int32_t value : values) append(metadata_, value);
}

uint64_t GgufHeaderBuilder::add_tensor(const std::string& name, const std::vector<int64_t>& shape, uint32_t ggml_type) {
  if (std::find(tensor_names_.begin(), tensor_names_.end(), name) != tensor_names_.end())
    throw std::invalid_argument("GgufHeaderBuilder: tensor '" + name + "' given twice");
  const kernels::GgmlTypeInfo* info = kernels::ggml_type_info(ggml_type);
  if (info == nullptr || shape.empty() || shape.back() % info->block_elements != 0)
    throw std::invalid_argument("GgufHeaderBuilder: tensor '" + name + "': rows are not whole " +
                                kernels::ggml_type_name(ggml_type) + " blocks");
  int64_t numel = 1;
  for (int64_t dimension : shape) numel *= dimension;
  tensor_names_.push_back(name);
  append_text(tensor_infos_, name);
  append(tensor_infos_, static_cast<uint32_t>(shape.size()));
  for (auto dimension = shape.rbegin(); dimension != shape.rend(); ++dimension)
    append(tensor_infos_, static_cast<uint64_t>(*dimension));
  append(tensor_infos_, ggml_type);
  const uint64_t offset = data_bytes_;
  append(tensor_infos_, offset);
  const uint64_t bytes = ggml_tensor_bytes(ggml_type, numel);
  data_bytes_ = (offset + bytes + kAlignment - 1) / kAlignment * kAlignment;
  return offset;
}

std::string GgufHeaderBuilder::header() const {
  std::string out("GGUF", 4);
  append(out, static_cast<uint32_t>(3));
  append(out, static_cast<uint64_t>(tensor_names_.size()));
  append(out, metadata_count_);
  out += metadata_;
  out += tensor_infos_;
  out.append((kAlignment - out.size() % kAlignment) % kAlignment, '\0');
  return out;
}

}  // namespace qlora::shard
