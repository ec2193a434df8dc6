// Tokenizer loading: byte tokens, tokenizer.json and GGUF metadata into a byte-level BPE, the
// dispatch on a store's tokenizer kind, and what the converter embeds into model.h5.
#include "shard/tokenizer.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/hash.h"
#include "shard/bpe_tokenizer.h"
#include "shard/gguf.h"
#include "shard/json.h"
#include "shard/model_store.h"
#include "shard/safetensors.h"

namespace qlora::shard {
namespace {

// The expressions tokenizer.json files spell out in Split pre-tokenizers, recognised verbatim.
constexpr const char* kGpt2Expression =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
constexpr const char* kLlama3Expression =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<uint8_t>(text[i]);
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string text;
    for (int32_t id : ids)
      if (id >= 0 && id < 256) text += static_cast<char>(id);
    return text;
  }
  int64_t vocab_size() const override { return 256; }
  int32_t bos_id() const override { return -1; }
  int32_t eos_id() const override { return -1; }
  std::string kind() const override { return "bytes"; }
};

std::string read_whole_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path.string() + ": cannot read");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// ---- tokenizer.json -----------------------------------------------------------------------------

void add_pre_tokenizer(const Json& node, BpeSpec& spec, bool& byte_level, const std::string& where) {
  const std::string type = node.get_string("type", "");
  if (type == "Sequence") {
    for (const Json& child : node.at("pretokenizers").as_array()) add_pre_tokenizer(child, spec, byte_level, where);
  } else if (type == "ByteLevel") {
    byte_level = true;
    if (node.get_bool("add_prefix_space", false)) {
      if (!spec.steps.empty())
        throw FormatError(where + ": ByteLevel(add_prefix_space=true) after another pre-tokenizer is not supported");
      spec.add_prefix_space = true;
    }
    if (node.get_bool("use_regex", true)) spec.steps.push_back(PreTokenizerStep::gpt2_expression);
  } else if (type == "Digits") {
    spec.steps.push_back(node.get_bool("individual_digits", false) ? PreTokenizerStep::digits_individual
                                                                  : PreTokenizerStep::digits_contiguous);
  } else if (type == "Split") {
    const Json& pattern = node.at("pattern");
    const std::string expression = pattern.contains("Regex") ? pattern.at("Regex").as_string() : "";
    if (node.get_string("behavior", "") != "Isolated" || node.get_bool("invert", false))
      throw FormatError(where + ": Split pre-tokenizer with behavior '" + node.get_string("behavior", "") +
                        "' is not supported (only Isolated, not inverted)");
    if (expression == kGpt2Expression)
      spec.steps.push_back(PreTokenizerStep::gpt2_expression);
    else if (expression == kLlama3Expression)
      spec.steps.push_back(PreTokenizerStep::llama3_expression);
    else
      throw FormatError(where + ": Split pre-tokenizer expression '" + expression +
                        "' is not one qlora implements (GPT-2's and Llama 3's are)");
  } else {
    throw FormatError(where + ": pre-tokenizer '" + type + "' is not supported (ByteLevel, Digits, Split, Sequence are)");
  }
}

int32_t find_token_id(const BpeSpec& spec, const std::string& content) {
  if (content.empty()) return -1;
  for (const AddedToken& token : spec.added_tokens)
    if (token.content == content) return token.id;
  for (size_t id = 0; id < spec.tokens.size(); ++id)
    if (spec.tokens[id] == content) return static_cast<int32_t>(id);
  return -1;
}

std::unique_ptr<Tokenizer> parse_tokenizer_json(const std::string& json_text, const std::string& bos_token,
                                                const std::string& eos_token, const std::string& where) {
  Json root;
  try {
    root = Json::parse(json_text);
  } catch (const JsonError& error) {
    throw FormatError(where + ": invalid JSON: " + error.what());
  }
  BpeSpec spec;
  spec.kind = "tokenizer.json";
  try {
    const Json& model = root.at("model");
    const std::string type = model.get_string("type", model.contains("merges") ? "BPE" : "");
    if (type != "BPE")
      throw FormatError(where + ": model type '" + type + "' is not supported (byte-level BPE is; for SentencePiece "
                        "models qlora reads tokenizer.model)");
    if (model.get_bool("byte_fallback", false))
      throw FormatError(where + ": a BPE with byte_fallback (SentencePiece style) is not supported; qlora reads "
                        "such models from tokenizer.model");
    if (model.contains("dropout") && !model.at("dropout").is_null() && model.at("dropout").as_double() != 0.0)
      throw FormatError(where + ": BPE dropout is not supported");
    for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (model.contains(affix) && !model.at(affix).is_null() && !model.at(affix).as_string().empty())
        throw FormatError(where + ": BPE " + affix + " is not supported");
    if (root.contains("normalizer") && !root.at("normalizer").is_null())
      throw FormatError(where + ": normalizer '" + root.at("normalizer").get_string("type", "?") +
                        "' is not supported (byte-level BPE models without one are)");
    spec.ignore_merges = model.get_bool("ignore_merges", false);
    for (const auto& [text, id_value] : model.at("vocab").as_object()) {
      const int64_t id = id_value.as_int();
      if (id < 0 || id > (1 << 30)) throw FormatError(where + ": token '" + text + "' has id " + std::to_string(id));
      if (static_cast<size_t>(id) >= spec.tokens.size()) spec.tokens.resize(static_cast<size_t>(id) + 1);
      spec.tokens[static_cast<size_t>(id)] = text;
    }
    for (const Json& merge : model.at("merges").as_array()) {
      if (merge.is_array()) {
        spec.merges.emplace_back(merge.at(0).as_string(), merge.at(1).as_string());
        continue;
      }
      const std::string& text = merge.as_string();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        throw FormatError(where + ": merge '" + text + "' is not two tokens separated by one space");
      spec.merges.emplace_back(text.substr(0, space), text.substr(space + 1));
    }
    if (root.contains("added_tokens"))
      for (const Json& added : root.at("added_tokens").as_array()) {
        AddedToken token;
        token.id = static_cast<int32_t>(added.at("id").as_int());
        token.content = added.at("content").as_string();
        token.special = added.get_bool("special", false);
        token.lstrip = added.get_bool("lstrip", false);
        token.rstrip = added.get_bool("rstrip", false);
        spec.added_tokens.push_back(std::move(token));
      }
    bool byte_level = false;
    if (root.contains("pre_tokenizer") && !root.at("pre_tokenizer").is_null())
      add_pre_tokenizer(root.at("pre_tokenizer"), spec, byte_level, where);
    if (!byte_level)
      throw FormatError(where + ": not a byte-level BPE (no ByteLevel pre-tokenizer); for SentencePiece models qlora "
                        "reads tokenizer.model");
  } catch (const JsonError& error) {
    throw FormatError(where + ": " + error.what());
  }
  // tokenizer.json does not say which tokens begin and end a text; tokenizer_config.json does (the
  // converter passes them on), else the names these model families use.
  spec.bos_id = find_token_id(spec, bos_token);
  if (spec.bos_id < 0)
    for (const char* name : {"<|begin_of_text|>", "<s>"})
      if ((spec.bos_id = find_token_id(spec, name)) >= 0) break;
  spec.eos_id = find_token_id(spec, eos_token);
  if (spec.eos_id < 0)
    for (const char* name : {"<|end_of_text|>", "<|endoftext|>", "</s>"})
      if ((spec.eos_id = find_token_id(spec, name)) >= 0) break;
  return make_byte_level_bpe(std::move(spec), where);
}

// tokenizer_config.json's bos_token / eos_token: a string or {"content": ...}.
std::string special_token_name(const Json& config, const char* key) {
  if (!config.contains(key)) return "";
  const Json& value = config.at(key);
  if (value.is_string()) return value.as_string();
  if (value.is_object() && value.contains("content") && value.at("content").is_string())
    return value.at("content").as_string();
  return "";
}

// ---- GGUF ---------------------------------------------------------------------------------------

std::vector<PreTokenizerStep> gguf_pre_tokenizer(const std::string& name, const std::string& where) {
  // llama.cpp's names (llama-vocab.cpp) for the expressions qlora implements.
  if (name == "default" || name == "gpt2" || name == "gpt-2") return {PreTokenizerStep::gpt2_expression};
  for (const char* digits_first : {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
    if (name == digits_first) return {PreTokenizerStep::digits_individual, PreTokenizerStep::gpt2_expression};
  for (const char* llama3 : {"llama-bpe", "llama3", "dbrx", "smaug-bpe"})
    if (name == llama3) return {PreTokenizerStep::llama3_expression};
  throw FormatError(where + ": tokenizer.ggml.pre '" + name + "' is not supported (known: default, gpt2, smollm, "
                    "starcoder, refact, llama-bpe, ...)");
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

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& json_text, const std::string& where) {
  return parse_tokenizer_json(json_text, "", "", where);
}

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const GgufFile& file) {
  const std::string where = file.path();
  const std::string model = file.get_string("tokenizer.ggml.model");
  if (model != "gpt2")
    throw FormatError(where + ": tokenizer.ggml.model '" + model + "' is not supported (gpt2, the byte-level BPE, is; "
                      "for a SentencePiece model convert the Hugging Face folder with its tokenizer.model)");
  BpeSpec spec;
  spec.kind = "gguf";
  spec.tokens = file.get_string_array("tokenizer.ggml.tokens");
  std::vector<int64_t> types(spec.tokens.size(), 1);
  if (file.has_key("tokenizer.ggml.token_type")) types = file.get_int_array("tokenizer.ggml.token_type");
  if (types.size() != spec.tokens.size())
    throw FormatError(where + ": tokenizer.ggml.token_type has " + std::to_string(types.size()) + " entries for " +
                      std::to_string(spec.tokens.size()) + " tokens");
  // llama.cpp's token types: 3 control and 4 user-defined tokens are matched in the text as written.
  for (size_t id = 0; id < spec.tokens.size(); ++id) {
    if (types[id] != 3 && types[id] != 4) continue;
    AddedToken token;
    token.id = static_cast<int32_t>(id);
    token.content = spec.tokens[id];
    token.special = types[id] == 3;
    spec.added_tokens.push_back(std::move(token));
  }
  if (file.has_key("tokenizer.ggml.merges"))
    for (const std::string& merge : file.get_string_array("tokenizer.ggml.merges")) {
      const size_t space = merge.find(' ');
      if (space == std::string::npos)
        throw FormatError(where + ": tokenizer.ggml.merges entry '" + merge + "' has no space between its tokens");
      spec.merges.emplace_back(merge.substr(0, space), merge.substr(space + 1));
    }
  spec.steps = gguf_pre_tokenizer(file.get_string("tokenizer.ggml.pre", "default"), where);
  spec.bos_id = static_cast<int32_t>(file.get_int("tokenizer.ggml.bos_token_id", -1));
  spec.eos_id = static_cast<int32_t>(file.get_int("tokenizer.ggml.eos_token_id", -1));
  return make_byte_level_bpe(std::move(spec), where);
}

std::unique_ptr<Tokenizer> load_tokenizer(const TokenizerSource& source, const std::string& where) {
  if (source.kind == "bytes") return make_byte_tokenizer();
  if (source.kind == "tokenizer.json") return parse_tokenizer_json(source.bytes, source.bos_token, source.eos_token, where);
  if (source.kind == "sentencepiece") return load_sentencepiece(source.bytes, where);
  if (source.kind == "gguf") {
    const auto file = GgufFile::parse(reinterpret_cast<const uint8_t*>(source.bytes.data()), source.bytes.size(), where);
    return load_gguf_tokenizer(*file);
  }
  throw FormatError(where + ": unknown tokenizer kind '" + source.kind + "'");
}

TokenizerSource tokenizer_from_hf_directory(const std::string& directory) {
  const std::filesystem::path folder(directory);
  std::error_code error;
  TokenizerSource json_source;
  std::string json_error;
  if (std::filesystem::is_regular_file(folder / "tokenizer.json", error)) {
    json_source.kind = "tokenizer.json";
    json_source.bytes = read_whole_file(folder / "tokenizer.json");
    if (std::filesystem::is_regular_file(folder / "tokenizer_config.json", error)) {
      try {
        const Json config = Json::parse(read_whole_file(folder / "tokenizer_config.json"));
        json_source.bos_token = special_token_name(config, "bos_token");
        json_source.eos_token = special_token_name(config, "eos_token");
      } catch (const JsonError&) {
        // A broken tokenizer_config.json only costs the bos/eos names; the tokenizer itself is intact.
      }
    }
    try {
      load_tokenizer(json_source, (folder / "tokenizer.json").string());
      return json_source;
    } catch (const FormatError& failure) {
      json_error = failure.what();
    }
  }
  if (std::filesystem::is_regular_file(folder / "tokenizer.model", error)) {
    TokenizerSource model{"sentencepiece", read_whole_file(folder / "tokenizer.model"), "", ""};
    if (!sentencepiece_available()) return model;
    load_tokenizer(model, (folder / "tokenizer.model").string());   // a corrupt model fails the conversion
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

std::unique_ptr<Tokenizer> load_store_tokenizer(const ModelStore& store) {
  return load_tokenizer(store_tokenizer_source(store), store.path() + ": /tokenizer");
}

}  // namespace qlora::shard
