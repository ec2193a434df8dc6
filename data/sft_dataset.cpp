// Reading instruction datasets: cutting a file into records with their line numbers, detecting the
// format from the keys, and checking each record field by field so that a bad record is refused
// with the file, the line and the path of the field at fault.
#include "data/sft_dataset.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "common/errors.h"

namespace qlora::data {
namespace {

constexpr const char* kFormatsHint =
    "records are JSON objects with \"text\", \"messages\", \"prompt\" + \"completion\", \"instruction\" + "
    "\"output\" (Alpaca) or \"conversations\" (ShareGPT); --data-format forces one";

struct RawRecord {
  Json value;
  std::string where;  // FILE:LINE
};

[[noreturn]] void refuse(const std::string& where, const std::string& field, const std::string& what) {
  throw FormatError(where + ": " + field + ": " + what, kFormatsHint);
}

std::string expected(const std::string& what, const Json& value) {
  return "expected " + what + ", got " + (value.is_null() ? std::string("null") : std::string(value.type_name()));
}

// JSONL: one record per non-blank line.
std::vector<RawRecord> split_json_lines(const std::string& text, const std::string& path) {
  std::vector<RawRecord> records;
  size_t start = 0;
  int64_t line = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    ++line;
    std::string_view content(text.data() + start, end - start);
    if (content.find_first_not_of(" \t\r\f\v") != std::string_view::npos) {
      const std::string where = path + ":" + std::to_string(line);
      records.push_back({parse_json(content, where), where});
    }
    start = end + 1;
  }
  return records;
}

// The line on which each top-level element of a JSON array starts, found by scanning the text with
// strings and nesting tracked (the parser itself does not report positions).
std::vector<int64_t> array_element_lines(const std::string& text) {
  std::vector<int64_t> lines;
  int64_t line = 1;
  int depth = 0;
  bool in_string = false, escaped = false, expecting_element = false;
  for (char c : text) {
    if (c == '\n') ++line;
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    const bool blank = c == ' ' || c == '\t' || c == '\n' || c == '\r';
    if (depth == 1 && expecting_element && !blank && c != ']' && c != ',') {
      lines.push_back(line);
      expecting_element = false;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      ++depth;
      if (depth == 1) expecting_element = true;
    } else if (c == ']' || c == '}') {
      --depth;
    } else if (c == ',' && depth == 1) {
      expecting_element = true;
    }
  }
  return lines;
}

std::vector<RawRecord> split_json_array(const std::string& text, const std::string& path) {
  const Json array = parse_json(text, path);
  if (!array.is_array()) throw FormatError(path + ": expected a JSON array of records", kFormatsHint);
  const std::vector<int64_t> lines = array_element_lines(text);
  std::vector<RawRecord> records;
  records.reserve(array.size());
  for (size_t i = 0; i < array.size(); ++i) {
    const int64_t line = i < lines.size() ? lines[i] : 1;
    records.push_back({array[i], path + ":" + std::to_string(line)});
  }
  return records;
}

bool starts_as_array(const std::string& text) {
  size_t first = text.find_first_not_of(" \t\r\n");
  return first != std::string::npos && text[first] == '[';
}

DataFormat detect_format(const Json& record) {
  if (record.contains("messages")) return DataFormat::messages;
  if (record.contains("conversations")) return DataFormat::sharegpt;
  if (record.contains("prompt") && record.contains("completion")) return DataFormat::prompt_completion;
  if (record.contains("instruction") && record.contains("output")) return DataFormat::alpaca;
  if (record.contains("text")) return DataFormat::text;
  return DataFormat::automatic;
}

std::string key_list(const Json& record) {
  std::string keys;
  for (const auto& item : record.items()) keys += (keys.empty() ? "" : ", ") + dump_json(item.key());
  return keys.empty() ? "none" : keys;
}

const Json& required(const Json& record, const std::string& key, const std::string& where) {
  if (!record.contains(key)) refuse(where, key, "missing");
  return record.at(key);
}

std::string string_field(const Json& record, const std::string& key, const std::string& where,
                         const std::string& field_path) {
  if (!record.contains(key)) refuse(where, field_path, "missing");
  const Json& value = record.at(key);
  if (!value.is_string()) refuse(where, field_path, expected("a string", value));
  return value.get<std::string>();
}

// A list of {"role", "content"} messages, kept whole (templates may read other keys such as
// tool_calls). Content may be null only beside tool_calls.
Json checked_messages(const Json& value, const std::string& field, const std::string& where) {
  if (!value.is_array()) refuse(where, field, expected("a list of messages", value));
  if (value.empty()) refuse(where, field, "expected at least one message, got an empty list");
  for (size_t i = 0; i < value.size(); ++i) {
    const std::string item = field + "[" + std::to_string(i) + "]";
    const Json& message = value[i];
    if (!message.is_object()) refuse(where, item, expected("an object with \"role\" and \"content\"", message));
    string_field(message, "role", where, item + ".role");
    if (!message.contains("content")) refuse(where, item + ".content", "missing");
    const Json& content = message.at("content");
    if (!content.is_string() && !(content.is_null() && message.contains("tool_calls")))
      refuse(where, item + ".content", expected("a string", content));
  }
  return value;
}

// ShareGPT's "from" values as FastChat, Axolotl and LLaMA-Factory write them.
std::string sharegpt_role(const std::string& from, const std::string& field, const std::string& where) {
  if (from == "human" || from == "user") return "user";
  if (from == "gpt" || from == "assistant" || from == "chatgpt" || from == "bard" || from == "bing" || from == "model")
    return "assistant";
  if (from == "system") return "system";
  if (from == "tool" || from == "observation" || from == "function_response" || from == "ipython") return "tool";
  refuse(where, field, "unknown role " + dump_json(from) +
                           " (known: human, user, gpt, assistant, chatgpt, bard, bing, model, system, tool, "
                           "observation, function_response, ipython)");
}

void read_text(const RawRecord& raw, SftRecord& record) { record.text = string_field(raw.value, "text", raw.where, "text"); }

void read_messages(const RawRecord& raw, SftRecord& record) {
  record.messages = checked_messages(required(raw.value, "messages", raw.where), "messages", raw.where);
}

// Returns whether the record is conversational (both fields message lists) or standard (both strings).
bool read_prompt_completion(const RawRecord& raw, SftRecord& record) {
  const Json& prompt = required(raw.value, "prompt", raw.where);
  const Json& completion = required(raw.value, "completion", raw.where);
  if (prompt.is_string()) {
    if (!completion.is_string()) refuse(raw.where, "completion", expected("a string like \"prompt\"", completion));
    record.prompt = prompt.get<std::string>();
    record.completion = completion.get<std::string>();
    return false;
  }
  if (!prompt.is_array()) refuse(raw.where, "prompt", expected("a string or a list of messages", prompt));
  if (!completion.is_array()) refuse(raw.where, "completion", expected("a list of messages like \"prompt\"", completion));
  record.messages = checked_messages(prompt, "prompt", raw.where);
  record.completion_messages = checked_messages(completion, "completion", raw.where);
  return true;
}

void read_alpaca(const RawRecord& raw, SftRecord& record) {
  std::string instruction = string_field(raw.value, "instruction", raw.where, "instruction");
  const std::string output = string_field(raw.value, "output", raw.where, "output");
  std::string input;
  if (raw.value.contains("input") && !raw.value.at("input").is_null())
    input = string_field(raw.value, "input", raw.where, "input");
  if (!input.empty()) instruction += "\n\n" + input;
  record.messages = Json::array({Json{{"role", "user"}, {"content", instruction}}});
  record.completion_messages = Json::array({Json{{"role", "assistant"}, {"content", output}}});
}

void read_sharegpt(const RawRecord& raw, SftRecord& record) {
  const Json& turns = required(raw.value, "conversations", raw.where);
  if (!turns.is_array()) refuse(raw.where, "conversations", expected("a list of turns", turns));
  if (turns.empty()) refuse(raw.where, "conversations", "expected at least one turn, got an empty list");
  record.messages = Json::array();
  for (size_t i = 0; i < turns.size(); ++i) {
    const std::string item = "conversations[" + std::to_string(i) + "]";
    const Json& turn = turns[i];
    if (!turn.is_object()) refuse(raw.where, item, expected("an object with \"from\" and \"value\"", turn));
    const std::string from = string_field(turn, "from", raw.where, item + ".from");
    const std::string value = string_field(turn, "value", raw.where, item + ".value");
    record.messages.push_back(Json{{"role", sharegpt_role(from, item + ".from", raw.where)}, {"content", value}});
  }
}

}  // namespace

DataFormat parse_data_format(const std::string& name) {
  if (name == "auto") return DataFormat::automatic;
  if (name == "text") return DataFormat::text;
  if (name == "messages") return DataFormat::messages;
  if (name == "prompt-completion") return DataFormat::prompt_completion;
  if (name == "alpaca") return DataFormat::alpaca;
  if (name == "sharegpt") return DataFormat::sharegpt;
  throw UserError("--data-format " + name + ": unknown format",
                  "use auto, text, messages, prompt-completion, alpaca or sharegpt");
}

std::string data_format_name(DataFormat format) {
  switch (format) {
    case DataFormat::automatic: return "auto";
    case DataFormat::text: return "text";
    case DataFormat::messages: return "messages";
    case DataFormat::prompt_completion: return "prompt-completion";
    case DataFormat::alpaca: return "alpaca";
    case DataFormat::sharegpt: return "sharegpt";
  }
  return "?";
}

bool is_sft_data_path(const std::string& path) {
  const std::string extension = std::filesystem::path(path).extension().string();
  return extension == ".jsonl" || extension == ".json";
}

SftDataset parse_sft_dataset(const std::string& file_text, const std::string& path, DataFormat format) {
  // Editors on Windows start files with a UTF-8 byte order mark.
  const bool byte_order_mark = file_text.compare(0, 3, "\xEF\xBB\xBF") == 0;
  const std::string& text = byte_order_mark ? file_text.substr(3) : file_text;
  const std::vector<RawRecord> raw_records = starts_as_array(text) ? split_json_array(text, path)
                                                                   : split_json_lines(text, path);
  if (raw_records.empty())
    throw UserError(path + ": no records", "a .jsonl file holds one JSON object per line, a .json file an array of them");
  SftDataset dataset;
  dataset.path = path;
  dataset.format = format;
  bool first = true;
  for (const RawRecord& raw : raw_records) {
    if (!raw.value.is_object()) throw FormatError(raw.where + ": " + expected("a JSON object", raw.value), kFormatsHint);
    // Under auto every record must look like the first; a forced format only needs its own fields.
    if (format == DataFormat::automatic) {
      const DataFormat detected = detect_format(raw.value);
      if (detected == DataFormat::automatic)
        throw FormatError(raw.where + ": no known instruction-data format in a record with keys " + key_list(raw.value),
                          kFormatsHint);
      if (first) dataset.format = detected;
      if (detected != dataset.format)
        throw FormatError(raw.where + ": the record looks like " + data_format_name(detected) +
                              " data but the file's first record is " + data_format_name(dataset.format),
                          "one file holds one format; --data-format forces one");
    }
    SftRecord record;
    record.where = raw.where;
    switch (dataset.format) {
      case DataFormat::text: read_text(raw, record); break;
      case DataFormat::messages: read_messages(raw, record); break;
      case DataFormat::prompt_completion: {
        const bool conversational = read_prompt_completion(raw, record);
        if (!first && conversational != dataset.conversational)
          throw FormatError(raw.where + ": " + (conversational ? "prompt and completion are message lists"
                                                               : "prompt and completion are strings") +
                                " but earlier records' are " + (conversational ? "strings" : "message lists"),
                            "one file holds either standard or conversational prompt-completion records");
        dataset.conversational = conversational;
        break;
      }
      case DataFormat::alpaca: read_alpaca(raw, record); break;
      case DataFormat::sharegpt: read_sharegpt(raw, record); break;
      case DataFormat::automatic: break;
    }
    dataset.records.push_back(std::move(record));
    first = false;
  }
  switch (dataset.format) {
    case DataFormat::text: dataset.shape = RecordShape::text; break;
    case DataFormat::messages:
    case DataFormat::sharegpt:
      dataset.shape = RecordShape::conversation;
      dataset.conversational = true;
      break;
    case DataFormat::alpaca:
      dataset.shape = RecordShape::prompt_completion;
      dataset.conversational = true;
      break;
    case DataFormat::prompt_completion: dataset.shape = RecordShape::prompt_completion; break;
    case DataFormat::automatic: break;
  }
  return dataset;
}

SftDataset read_sft_dataset(const std::string& path, DataFormat format) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("cannot read data file " + path, "check the path and its permissions");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_sft_dataset(text.str(), path, format);
}

}  // namespace qlora::data
