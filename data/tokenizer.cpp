// Tokenizer loading: byte tokens, tokenizer.json and GGUF metadata into a byte-level BPE, and the
// dispatch on a stored tokenizer's kind.
#include "data/tokenizer.h"

#include "common/errors.h"
#include "common/json.h"
#include "data/bpe_tokenizer.h"
#include "shard/gguf.h"
#include "shard/model_store.h"

namespace qlora::data {
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

// ---- tokenizer.json -----------------------------------------------------------------------------

const Json& field(const Json& object, const std::string& key, const std::string& where) {
  if (!object.is_object() || !object.contains(key)) throw FormatError(where + ": missing field \"" + key + "\"");
  return object.at(key);
}

const Json& array_field(const Json& object, const std::string& key, const std::string& where) {
  const Json& value = field(object, key, where);
  if (!value.is_array()) throw FormatError(where + ": field \"" + key + "\" must be an array");
  return value;
}

const std::string& text_of(const Json& value, const std::string& what) {
  if (!value.is_string()) throw FormatError(what + " must be a string");
  return value.get_ref<const std::string&>();
}

void add_pre_tokenizer(const Json& node, BpeSpec& spec, bool& byte_level, const std::string& where) {
  const std::string type = json_string_or(node, "type", "", where);
  if (type == "Sequence") {
    for (const Json& child : array_field(node, "pretokenizers", where)) add_pre_tokenizer(child, spec, byte_level, where);
  } else if (type == "ByteLevel") {
    byte_level = true;
    if (json_bool_or(node, "add_prefix_space", false, where)) {
      if (!spec.steps.empty())
        throw FormatError(where + ": ByteLevel(add_prefix_space=true) after another pre-tokenizer is not supported");
      spec.add_prefix_space = true;
    }
    if (json_bool_or(node, "use_regex", true, where)) spec.steps.push_back(PreTokenizerStep::gpt2_expression);
  } else if (type == "Digits") {
    spec.steps.push_back(json_bool_or(node, "individual_digits", false, where) ? PreTokenizerStep::digits_individual
                                                                               : PreTokenizerStep::digits_contiguous);
  } else if (type == "Split") {
    const std::string expression = json_string_or(field(node, "pattern", where), "Regex", "", where);
    const std::string behavior = json_string_or(node, "behavior", "", where);
    if (behavior != "Isolated" || json_bool_or(node, "invert", false, where))
      throw FormatError(where + ": Split pre-tokenizer with behavior '" + behavior +
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

// True when a post-processor (TemplateProcessing, possibly inside a Sequence) puts the token `id`
// before a single text.
bool template_starts_with(const Json& processor, int32_t id, const BpeSpec& spec, const std::string& where) {
  if (!processor.is_object() || id < 0) return false;
  const std::string type = json_string_or(processor, "type", "", where);
  if (type == "Sequence" && processor.contains("processors") && processor.at("processors").is_array()) {
    for (const Json& child : processor.at("processors"))
      if (template_starts_with(child, id, spec, where)) return true;
    return false;
  }
  if (type != "TemplateProcessing" || !processor.contains("single") || !processor.at("single").is_array() ||
      processor.at("single").empty())
    return false;
  const Json& first = processor.at("single")[0];
  if (!first.is_object() || !first.contains("SpecialToken") || !first.at("SpecialToken").is_object()) return false;
  return find_token_id(spec, json_string_or(first.at("SpecialToken"), "id", "", where)) == id;
}

std::unique_ptr<Tokenizer> parse_tokenizer_json(const std::string& json_text, const std::string& bos_token,
                                                const std::string& eos_token, const std::string& where) {
  const Json root = parse_json(json_text, where);
  BpeSpec spec;
  spec.kind = "tokenizer.json";
  const Json& model = field(root, "model", where);
  const std::string type = json_string_or(model, "type", model.contains("merges") ? "BPE" : "", where);
  if (type != "BPE")
    throw FormatError(where + ": model type '" + type + "' is not supported (byte-level BPE is; for SentencePiece "
                      "models qlora reads tokenizer.model)");
  if (json_bool_or(model, "byte_fallback", false, where))
    throw FormatError(where + ": a BPE with byte_fallback (SentencePiece style) is not supported; qlora reads "
                      "such models from tokenizer.model");
  if (json_double_or(model, "dropout", 0.0, where) != 0.0) throw FormatError(where + ": BPE dropout is not supported");
  for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (!json_string_or(model, affix, "", where).empty())
      throw FormatError(where + ": BPE " + affix + " is not supported");
  if (root.contains("normalizer") && !root.at("normalizer").is_null())
    throw FormatError(where + ": normalizer '" + json_string_or(root.at("normalizer"), "type", "?", where) +
                      "' is not supported (byte-level BPE models without one are)");
  spec.ignore_merges = json_bool_or(model, "ignore_merges", false, where);
  const Json& vocabulary = field(model, "vocab", where);
  if (!vocabulary.is_object()) throw FormatError(where + ": field \"vocab\" must be an object");
  for (const auto& [text, id_value] : vocabulary.items()) {
    const int64_t id = json_as_int(id_value, where + ": token '" + text + "'");
    if (id < 0 || id > (1 << 30)) throw FormatError(where + ": token '" + text + "' has id " + std::to_string(id));
    if (static_cast<size_t>(id) >= spec.tokens.size()) spec.tokens.resize(static_cast<size_t>(id) + 1);
    spec.tokens[static_cast<size_t>(id)] = text;
  }
  for (const Json& merge : array_field(model, "merges", where)) {
    if (merge.is_array()) {
      if (merge.size() < 2) throw FormatError(where + ": merge " + dump_json(merge) + " is not a pair of tokens");
      spec.merges.emplace_back(text_of(merge[0], where + ": a merge"), text_of(merge[1], where + ": a merge"));
      continue;
    }
    const std::string& text = text_of(merge, where + ": a merge");
    const size_t space = text.find(' ');
    if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
      throw FormatError(where + ": merge '" + text + "' is not two tokens separated by one space");
    spec.merges.emplace_back(text.substr(0, space), text.substr(space + 1));
  }
  if (root.contains("added_tokens"))
    for (const Json& added : array_field(root, "added_tokens", where)) {
      AddedToken token;
      token.id = static_cast<int32_t>(json_int(added, "id", where));
      token.content = json_string(added, "content", where);
      token.special = json_bool_or(added, "special", false, where);
      token.lstrip = json_bool_or(added, "lstrip", false, where);
      token.rstrip = json_bool_or(added, "rstrip", false, where);
      spec.added_tokens.push_back(std::move(token));
    }
  bool byte_level = false;
  if (root.contains("pre_tokenizer") && !root.at("pre_tokenizer").is_null())
    add_pre_tokenizer(root.at("pre_tokenizer"), spec, byte_level, where);
  if (!byte_level)
    throw FormatError(where + ": not a byte-level BPE (no ByteLevel pre-tokenizer); for SentencePiece models qlora "
                      "reads tokenizer.model");
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
  if (root.contains("post_processor")) spec.adds_bos = template_starts_with(root.at("post_processor"), spec.bos_id, spec, where);
  return make_byte_level_bpe(std::move(spec), where);
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

}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& json_text, const std::string& where) {
  return parse_tokenizer_json(json_text, "", "", where);
}

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const shard::GgufFile& file) {
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
  spec.adds_bos = file.has_key("tokenizer.ggml.add_bos_token") && file.get_bool("tokenizer.ggml.add_bos_token");
  return make_byte_level_bpe(std::move(spec), where);
}

std::unique_ptr<Tokenizer> load_tokenizer(const shard::TokenizerSource& source, const std::string& where) {
  if (source.kind == "bytes") return make_byte_tokenizer();
  if (source.kind == "tokenizer.json") return parse_tokenizer_json(source.bytes, source.bos_token, source.eos_token, where);
  if (source.kind == "sentencepiece") return load_sentencepiece(source.bytes, where);
  if (source.kind == "gguf") {
    const auto file = shard::GgufFile::parse(reinterpret_cast<const uint8_t*>(source.bytes.data()), source.bytes.size(), where);
    return load_gguf_tokenizer(*file);
  }
  throw FormatError(where + ": unknown tokenizer kind '" + source.kind + "'");
}

void check_tokenizer(const shard::TokenizerSource& source, const std::string& where) {
  if (source.kind == "sentencepiece" && !sentencepiece_available()) return;
  load_tokenizer(source, where);
}

std::unique_ptr<Tokenizer> load_store_tokenizer(const shard::ModelStore& store) {
  return load_tokenizer(shard::store_tokenizer_source(store), store.path() + ": /tokenizer");
}

}  // namespace qlora::data
