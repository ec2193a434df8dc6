// Tokenizing instruction records and building their loss masks (see sft_examples.h for the rules
// and the TRL behaviour each one follows).
#include "data/sft_examples.h"

#include <algorithm>

#include "common/errors.h"

namespace qlora::data {
namespace {

using ByteRange = std::pair<size_t, size_t>;

bool is_blank(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string trimmed(const std::string& text) {
  size_t first = 0, last = text.size();
  while (first < last && is_blank(text[first])) ++first;
  while (last > first && is_blank(text[last - 1])) --last;
  return text.substr(first, last - first);
}

// Control tokens templates close a turn with: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>, <|end|>.
bool spelled_like_control_token(const std::string& text) {
  if (text.size() < 3 || text.front() != '<' || text.back() != '>') return false;
  return std::none_of(text.begin(), text.end(), [](char c) { return is_blank(c); });
}

std::string render_record(const ConversationRenderer& render, const Json& messages, bool add_generation_prompt,
                          const std::string& where) {
  try {
    return render(messages, add_generation_prompt);
  } catch (const UserError& error) {
    throw UserError(where + ": " + error.what(), error.hint);
  }
}

// TRL's add_eos: the eos token's text is appended unless the text already ends with it.
std::string with_eos(std::string text, const std::string& eos_text) {
  if (!eos_text.empty() && (text.size() < eos_text.size() ||
                            text.compare(text.size() - eos_text.size(), eos_text.size(), eos_text) != 0))
    text += eos_text;
  return text;
}

// Token count of the prompt marks where the completion starts in the whole (TRL's completion_mask).
std::vector<uint8_t> completion_mask(size_t prompt_tokens, size_t total_tokens) {
  std::vector<uint8_t> counted(total_tokens, 1);
  std::fill(counted.begin(), counted.begin() + static_cast<std::ptrdiff_t>(std::min(prompt_tokens, total_tokens)), 0);
  return counted;
}

class RecordTokenizer {
 public:
  RecordTokenizer(const SftDataset& dataset, const Tokenizer& tokenizer, const ConversationRenderer& render,
                  TrainOn train_on)
      : dataset_(dataset), tokenizer_(tokenizer), render_(render), train_on_(train_on) {
    if (tokenizer.eos_id() >= 0) eos_text_ = tokenizer.decode({tokenizer.eos_id()});
  }

  TokenizedExample operator()(const SftRecord& record) const {
    switch (dataset_.shape) {
      case RecordShape::text: return text(record);
      case RecordShape::conversation: return conversation(record);
      case RecordShape::prompt_completion:
        return dataset_.conversational ? conversational_prompt_completion(record) : standard_prompt_completion(record);
    }
    return {};
  }

 private:
  // TRL tokenizes plain strings with tokenizer(text): special tokens added, as the post-processor
  // says (a leading bos for Llama-style tokenizers). Rendered conversations are not (the template
  // writes them).
  std::vector<int32_t> encode_plain(const std::string& text) const {
    std::vector<int32_t> tokens;
    if (tokenizer_.adds_bos()) tokens.push_back(tokenizer_.bos_id());
    const std::vector<int32_t> body = tokenizer_.encode(text);
    tokens.insert(tokens.end(), body.begin(), body.end());
    return tokens;
  }

  TokenizedExample text(const SftRecord& record) const {
    TokenizedExample example;
    example.tokens = encode_plain(with_eos(record.text, eos_text_));
    example.counted.assign(example.tokens.size(), 1);
    return example;
  }

  TokenizedExample standard_prompt_completion(const SftRecord& record) const {
    TokenizedExample example;
    const size_t prompt_tokens = encode_plain(record.prompt).size();
    example.tokens = encode_plain(record.prompt + with_eos(record.completion, eos_text_));
    example.counted = train_on_ == TrainOn::completion ? completion_mask(prompt_tokens, example.tokens.size())
                                                       : std::vector<uint8_t>(example.tokens.size(), 1);
    return example;
  }

  TokenizedExample conversation(const SftRecord& record) const {
    const std::string rendered = render_record(render_, record.messages, false, record.where);
    TokenizedExample example;
    example.tokens = tokenizer_.encode(rendered);
    example.counted = train_on_ == TrainOn::assistant ? assistant_counted(rendered, record.messages, example.tokens, record.where)
                                                      : std::vector<uint8_t>(example.tokens.size(), 1);
    return example;
  }

  TokenizedExample conversational_prompt_completion(const SftRecord& record) const {
    Json whole = record.messages;
    for (const Json& message : record.completion_messages) whole.push_back(message);
    const std::string rendered = render_record(render_, whole, false, record.where);
    TokenizedExample example;
    example.tokens = tokenizer_.encode(rendered);
    if (train_on_ == TrainOn::completion) {
      const size_t prompt_tokens = tokenizer_.encode(render_record(render_, record.messages, true, record.where)).size();
      example.counted = completion_mask(prompt_tokens, example.tokens.size());
    } else if (train_on_ == TrainOn::assistant) {
      example.counted = assistant_counted(rendered, whole, example.tokens, record.where);
    } else {
      example.counted.assign(example.tokens.size(), 1);
    }
    return example;
  }

  std::vector<uint8_t> assistant_counted(const std::string& rendered, const Json& messages,
                                         const std::vector<int32_t>& tokens, const std::string& where) const {
    const auto content = assistant_content_ranges(rendered, messages, where);
    const auto token_ranges = token_byte_ranges(rendered, tokens, tokenizer_);
    return assistant_mask(content, token_ranges, tokens, tokenizer_);
  }

  const SftDataset& dataset_;
  const Tokenizer& tokenizer_;
  const ConversationRenderer& render_;
  TrainOn train_on_;
  std::string eos_text_;
};

}  // namespace

TrainOn parse_train_on(const std::string& name) {
  if (name == "auto") return TrainOn::automatic;
  if (name == "all") return TrainOn::all;
  if (name == "completion") return TrainOn::completion;
  if (name == "assistant") return TrainOn::assistant;
  throw UserError("--train-on " + name + ": unknown choice", "use auto, all, completion or assistant");
}

std::string train_on_name(TrainOn train_on) {
  switch (train_on) {
    case TrainOn::automatic: return "auto";
    case TrainOn::all: return "all";
    case TrainOn::completion: return "completion";
    case TrainOn::assistant: return "assistant";
  }
  return "?";
}

TrainOn resolve_train_on(TrainOn train_on, const SftDataset& dataset) {
  const bool prompts = dataset.shape == RecordShape::prompt_completion;
  if (train_on == TrainOn::automatic) return prompts ? TrainOn::completion : TrainOn::all;
  if (train_on == TrainOn::completion && !prompts)
    throw UserError("--train-on completion needs prompt-completion data, and " + dataset.path + " is " +
                        data_format_name(dataset.format) + " data",
                    "use --train-on all, or --train-on assistant for conversations");
  if (train_on == TrainOn::assistant && !dataset.conversational)
    throw UserError("--train-on assistant needs conversational data (messages, ShareGPT, Alpaca or prompt-completion "
                        "message lists), and " + dataset.path + " is " + data_format_name(dataset.format) + " text",
                    dataset.shape == RecordShape::prompt_completion ? "use --train-on completion" : "use --train-on all");
  return train_on;
}

std::vector<TokenizedExample> tokenize_sft_dataset(const SftDataset& dataset, const Tokenizer& tokenizer,
                                                   const ConversationRenderer& render, TrainOn train_on) {
  if (dataset.conversational && !render)
    throw UserError(dataset.path + ": " + data_format_name(dataset.format) +
                        " data is conversational and needs a chat template, but the model has none",
                    "pass --chat-template FILE (a Jinja chat template, e.g. the chat_template of a similar model's "
                    "tokenizer_config.json)");
  const RecordTokenizer tokenize(dataset, tokenizer, render, resolve_train_on(train_on, dataset));
  std::vector<TokenizedExample> examples;
  examples.reserve(dataset.records.size());
  for (const SftRecord& record : dataset.records) examples.push_back(tokenize(record));
  return examples;
}

std::vector<ByteRange> token_byte_ranges(const std::string& text, const std::vector<int32_t>& tokens,
                                         const Tokenizer& tokenizer) {
  std::vector<ByteRange> ranges;
  ranges.reserve(tokens.size());
  size_t position = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string piece = tokenizer.decode({tokens[i]});
    size_t start = position;
    // Added tokens with lstrip swallow the white space before them; SentencePiece spells a word's
    // leading space into its piece but not back out of a lone one.
    while (text.compare(start, piece.size(), piece) != 0 && start < text.size() && is_blank(text[start])) ++start;
    if (text.compare(start, piece.size(), piece) != 0)
      throw FormatError("token " + std::to_string(i) + " (id " + std::to_string(tokens[i]) +
                            ") does not spell the text back at byte " + std::to_string(position),
                        "--train-on assistant needs a tokenizer whose tokens spell the text; use --train-on all");
    ranges.emplace_back(position, start + piece.size());
    position = start + piece.size();
  }
  return ranges;
}

std::vector<ByteRange> assistant_content_ranges(const std::string& rendered, const Json& messages,
                                                const std::string& where) {
  std::vector<ByteRange> ranges;
  size_t cursor = 0;
  for (size_t i = 0; i < messages.size(); ++i) {
    const Json& message = messages[i];
    const bool assistant = message.value("role", "") == "assistant";
    if (!message.contains("content") || !message.at("content").is_string()) continue;
    const std::string& content = message.at("content").get_ref<const std::string&>();
    std::string needle = content;
    size_t found = needle.empty() ? std::string::npos : rendered.find(needle, cursor);
    if (found == std::string::npos) {
      needle = trimmed(content);
      found = needle.empty() ? std::string::npos : rendered.find(needle, cursor);
    }
    if (found == std::string::npos) {
      // Templates may drop or rewrite other roles' messages (a default system prompt, say); only
      // assistant replies must be there.
      if (assistant && !needle.empty())
        throw FormatError(where + ": message " + std::to_string(i) +
                              " (assistant): its content does not appear in the chat template's output, so "
                              "--train-on assistant cannot locate it",
                          "use --train-on all or completion with this template");
      continue;
    }
    if (assistant) ranges.emplace_back(found, found + needle.size());
    cursor = found + needle.size();
  }
  return ranges;
}

std::vector<uint8_t> assistant_mask(const std::vector<ByteRange>& content_ranges, const std::vector<ByteRange>& token_ranges,
                                    const std::vector<int32_t>& tokens, const Tokenizer& tokenizer) {
  std::vector<uint8_t> counted(tokens.size(), 0);
  size_t token = 0;
  for (const ByteRange& content : content_ranges) {
    while (token < tokens.size() && token_ranges[token].second <= content.first) ++token;
    while (token < tokens.size() && token_ranges[token].first < content.second) counted[token++] = 1;
    if (token < tokens.size() && token_ranges[token].first == content.second &&
        (tokens[token] == tokenizer.eos_id() || spelled_like_control_token(tokenizer.decode({tokens[token]}))))
      counted[token++] = 1;
  }
  return counted;
}

}  // namespace qlora::data
