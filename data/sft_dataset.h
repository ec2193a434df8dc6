// Instruction-tuning datasets as TRL's SFTTrainer reads them: JSONL (one object per line) or JSON
// array files in the language-modeling ({"text"}), conversational ({"messages"}), prompt-completion
// ({"prompt", "completion"}, strings or message lists), Alpaca ({"instruction", "input", "output"})
// and ShareGPT ({"conversations": [{"from", "value"}]}) formats, checked record by record and turned
// into the three shapes tokenization needs (text, a conversation, a prompt and its completion).
// Tokenizing those with the chat template and the loss masks lives in data/sft_examples.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/json.h"

namespace qlora::data {

// As the user names them with --data-format; `automatic` detects the format from each record's keys.
enum class DataFormat { automatic, text, messages, prompt_completion, alpaca, sharegpt };

// "auto" | "text" | "messages" | "prompt-completion" | "alpaca" | "sharegpt"; throws UserError.
DataFormat parse_data_format(const std::string& name);
std::string data_format_name(DataFormat format);

// One record after conversion. Alpaca becomes a conversational prompt-completion
// (user: instruction + "\n\n" + input when input is non-empty; assistant: output); ShareGPT becomes
// messages with roles user / assistant / system / tool.
struct SftRecord {
  std::string where;          // "FILE:LINE", the record's first line
  std::string text;           // text format
  std::string prompt;         // standard prompt-completion
  std::string completion;
  Json messages;              // messages format: the conversation; conversational prompt-completion: the prompt
  Json completion_messages;   // conversational prompt-completion: the completion's messages
};

// The three shapes records take once read: what tokenization and the --train-on defaults depend on.
enum class RecordShape { text, conversation, prompt_completion };

struct SftDataset {
  std::string path;
  DataFormat format = DataFormat::automatic;  // as detected (or forced); never `automatic`
  RecordShape shape = RecordShape::text;
  bool conversational = false;  // messages rather than strings (conversation, or prompt-completion lists)
  std::vector<SftRecord> records;
};

// True for files read as instruction data: .jsonl and .json.
bool is_sft_data_path(const std::string& path);

// Reads `path` (JSONL; or a JSON array when its first non-blank character is '['). Every record must
// be a JSON object of the one format: `format` when forced, else the format the first record's keys
// name. Throws FormatError "FILE:LINE: FIELD PATH: what is wrong" (e.g. "data.jsonl:7:
// messages[2].content: expected a string") for a malformed record, and UserError for an unreadable
// or empty file.
SftDataset read_sft_dataset(const std::string& path, DataFormat format = DataFormat::automatic);

// Parses records from text already in memory (`path` only names it in messages).
SftDataset parse_sft_dataset(const std::string& text, const std::string& path, DataFormat format = DataFormat::automatic);

}  // namespace qlora::data
