// What the converter embeds as a store's /tokenizer (a Hugging Face folder's tokenizer files, or a
// GGUF model's tokenizer.* metadata re-encoded as a small GGUF image), and reading it back.
#include "shard/tokenizer_source.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/errors.h"
#include "common/hash.h"
#include "common/json.h"
#include "shard/gguf.h"
#include "shard/model_store.h"

namespace qlora::shard {
namespace {

std::string read_whole_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path.string() + ": cannot read");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// tokenizer_config.json's bos_token / eos_token: a string or {"content": ...}.
std::string special_token_name(const qlora::Json& config, const char* key) {
  if (!config.contains(key)) return "";
  const qlora::Json& value = config.at(key);
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value.at("content").is_string())
    return value.at("content").get<std::string>();
  return "";
}

// A minimal GGUF v3 image: header, no tensors, the given metadata re-encoded from typed reads.
class GgufImageWriter {
 public:
  void add(const GgufFile& file, const GgufMetadata& entry) {
    const std::string& key = entry.key;
    switch (entry.type) {
      case GgufType::string:
        start(key, GgufType::string), text(file.get_string(key));
        break;
      case GgufType::boolean:
        start(key, GgufType::boolean), bytes_.push_back(file.get_bool(key) ? 1 : 0);
        break;
      case GgufType::float32:
      case GgufType::float64:
        start(key, GgufType::float64), scalar(file.get_float(key));
        break;
      case GgufType::array:
        if (entry.element_type == GgufType::string) {
          const auto values = file.get_string_array(key);
          start(key, GgufType::array), scalar(static_cast<uint32_t>(GgufType::string)), scalar(uint64_t(values.size()));
          for (const auto& value : values) text(value);
        } else if (entry.element_type == GgufType::float32 || entry.element_type == GgufType::float64) {
          const auto values = file.get_float_array(key);
          start(key, GgufType::array), scalar(static_cast<uint32_t>(GgufType::float32)), scalar(uint64_t(values.size()));
          for (double value : values) scalar(static_cast<float>(value));
        } else if (entry.element_type != GgufType::array && entry.element_type != GgufType::boolean) {
          const auto values = file.get_int_array(key);
          start(key, GgufType::array), scalar(static_cast<uint32_t>(GgufType::int64)), scalar(uint64_t(values.size()));
          for (int64_t value : values) scalar(value);
        } else {
          return;   // nested or boolean arrays: no tokenizer key qlora reads has one
        }
        break;
      default:   // the integer types
        start(key, GgufType::int64), scalar(file.get_int(key));
        break;
    }
    ++count_;
  }
  std::string image() const {
    std::string out("GGUF", 4);
    const uint32_t version = 3;
    const uint64_t tensors = 0;
    out.append(reinterpret_cast<const char*>(&version), 4);
    out.append(reinterpret_cast<const char*>(&tensors), 8);
    out.append(reinterpret_cast<const char*>(&count_), 8);
    out.append(bytes_.begin(), bytes_.end());
    return out;
  }

 private:
  template <typename T>
  void scalar(T value) {
    const auto* raw = reinterpret_cast<const char*>(&value);
    bytes_.insert(bytes_.end(), raw, raw + sizeof value);
  }
  void text(const std::string& value) {
    scalar(static_cast<uint64_t>(value.size()));
    bytes_.insert(bytes_.end(), value.begin(), value.end());
  }
  void start(const std::string& key, GgufType type) {
    text(key);
    scalar(static_cast<uint32_t>(type));
  }
  std::vector<char> bytes_;
  uint64_t count_ = 0;
};

}  // namespace

std::string TokenizerSource::checksum() const {
  Fnv1a64 hash;
  for (const std::string* part : {&kind, &bytes, &bos_token, &eos_token}) {
    const uint64_t length = part->size();
    hash.update(&length, sizeof length);
    hash.update(part->data(), part->size());
  }
  return hash.hex();
}

TokenizerSource tokenizer_from_hf_directory(const std::string& directory, const TokenizerCheck& check) {
  const std::filesystem::path folder(directory);
  std::error_code error;
  TokenizerSource json_source;
  if (std::filesystem::is_regular_file(folder / "tokenizer.json", error)) {
    json_source.kind = "tokenizer.json";
    json_source.bytes = read_whole_file(folder / "tokenizer.json");
    if (std::filesystem::is_regular_file(folder / "tokenizer_config.json", error)) {
      try {
        const qlora::Json config =
            parse_json(read_whole_file(folder / "tokenizer_config.json"), "tokenizer_config.json");
        json_source.bos_token = special_token_name(config, "bos_token");
        json_source.eos_token = special_token_name(config, "eos_token");
      } catch (const FormatError&) {
        // A broken tokenizer_config.json only costs the bos/eos names; the tokenizer itself is intact.
      }
    }
    try {
      if (check) check(json_source, (folder / "tokenizer.json").string());
      return json_source;
    } catch (const FormatError&) {
      // Llama 2 and Mistral ship a tokenizer.json qlora cannot reproduce next to their tokenizer.model.
    }
  }
  if (std::filesystem::is_regular_file(folder / "tokenizer.model", error)) {
    TokenizerSource model{"sentencepiece", read_whole_file(folder / "tokenizer.model"), "", ""};
    if (check) check(model, (folder / "tokenizer.model").string());   // a corrupt model fails the conversion
    return model;
  }
  return json_source;   // kind "" when there is no tokenizer at all
}

TokenizerSource tokenizer_from_gguf(const GgufFile& file) {
  if (!file.has_key("tokenizer.ggml.model")) return {};
  GgufImageWriter writer;
  for (const GgufMetadata& entry : file.metadata())
    if (entry.key.rfind("tokenizer.", 0) == 0 && entry.key != "tokenizer.chat_template") writer.add(file, entry);
  return {"gguf", writer.image(), "", ""};
}

std::string chat_template_from_hf_directory(const std::string& directory) {
  const std::filesystem::path folder(directory);
  const std::filesystem::path config_path = folder / "tokenizer_config.json";
  std::error_code error;
  if (std::filesystem::is_regular_file(config_path, error)) {
    const qlora::Json config = parse_json(read_whole_file(config_path), config_path.string());
    if (config.is_object() && config.contains("chat_template") && !config.at("chat_template").is_null()) {
      const qlora::Json& value = config.at("chat_template");
      if (value.is_string()) return value.get<std::string>();
      if (!value.is_array())
        throw FormatError(config_path.string() + ": chat_template is neither a string nor a list of {name, template}");
      std::string names;
      for (const qlora::Json& entry : value) {
        if (!entry.is_object() || !entry.contains("name") || !entry.contains("template") ||
            !entry.at("name").is_string() || !entry.at("template").is_string())
          throw FormatError(config_path.string() + ": chat_template list entries must be {\"name\": ..., \"template\": ...}");
        const std::string name = entry.at("name").get<std::string>();
        if (name == "default") return entry.at("template").get<std::string>();
        names += (names.empty() ? "" : ", ") + name;
      }
      throw FormatError(config_path.string() + ": chat_template lists templates (" + names + ") but none named "
                        "\"default\"", "pass the one to use at training time with --chat-template FILE");
    }
  }
  if (std::filesystem::is_regular_file(folder / "chat_template.jinja", error))
    return read_whole_file(folder / "chat_template.jinja");
  return "";
}

std::string chat_template_from_gguf(const GgufFile& file) {
  if (!file.has_key("tokenizer.chat_template")) return "";
  return file.get_string("tokenizer.chat_template");
}

TokenizerSource store_tokenizer_source(const ModelStore& store) {
  const std::string& kind = store.header().tokenizer;
  if (kind == "bytes") return {"bytes", "", "", ""};
  TokenizerSource source;
  if (!store.read_tokenizer(&source))
    throw FormatError(store.path() + ": the model store carries no tokenizer (tokenizer '" + kind +
                      "'); convert again from a folder holding tokenizer.json or tokenizer.model, or from the GGUF "
                      "file, with this qlora, or pass pre-tokenized data (an HDF5 token file) as --data");
  return source;
}

}  // namespace qlora::shard
