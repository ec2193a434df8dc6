// Instruction records (data/sft_dataset.h) into tokenized examples with loss masks, following TRL's
// SFTTrainer: conversations rendered by the model's chat template then tokenized without adding
// special tokens; text and standard prompt-completion records get the eos token appended (unless
// already there) and are tokenized as tokenizer(text) does (a leading bos when Tokenizer::adds_bos). Which tokens count in the loss is --train-on:
//   all         every token (TRL's default for text and conversations)
//   completion  the tokens after the prompt (TRL's completion_only_loss, its default for prompt-completion):
//               the prompt is tokenized alone (conversations: rendered with add_generation_prompt) and
//               its token count marks the start of the completion in the tokenized whole
//   assistant   each assistant message's content plus the end-of-turn token the template emits right
//               after it (TRL's assistant_only_loss), located in the rendered text for any template
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "common/json.h"
#include "data/examples.h"
#include "data/sft_dataset.h"
#include "data/tokenizer.h"

namespace qlora::data {

enum class TrainOn { automatic, all, completion, assistant };

// "auto" | "all" | "completion" | "assistant"; throws UserError.
TrainOn parse_train_on(const std::string& name);
std::string train_on_name(TrainOn train_on);

// `automatic` becomes completion for prompt-completion data (Alpaca included) and all otherwise, as
// TRL decides. Throws UserError for completion on data without prompts and assistant on data
// without conversations (TRL refuses both too).
TrainOn resolve_train_on(TrainOn train_on, const SftDataset& dataset);

// The chat template, applied: (messages, add_generation_prompt) -> text. data/chat_template.h's
// ChatTemplate::render with the tokenizer's bos_token / eos_token bound is the usual one.
using ConversationRenderer = std::function<std::string(const Json& messages, bool add_generation_prompt)>;

// Tokenizes every record of `dataset`. `render` may be empty for text and standard prompt-completion
// data; conversational data without one is a UserError whose hint names --chat-template. Errors in
// a record (its template rendering fails, --train-on assistant cannot find an assistant message in
// the rendered text) name the record's FILE:LINE.
std::vector<TokenizedExample> tokenize_sft_dataset(const SftDataset& dataset, const Tokenizer& tokenizer,
                                                   const ConversationRenderer& render, TrainOn train_on);

// Each token's byte range in `text` (which `tokens` is the encoding of), from the tokens' own
// spellings. Throws FormatError when the tokens do not spell the text back.
std::vector<std::pair<size_t, size_t>> token_byte_ranges(const std::string& text, const std::vector<int32_t>& tokens,
                                                         const Tokenizer& tokenizer);

// The byte ranges of the assistant messages' content in `rendered` (the template's output for
// `messages`). Messages of every role are located in order, each searched from where the previous
// one ended, so an assistant reply that repeats a user's words is found in its own turn; content the
// template trims is searched trimmed. Throws FormatError naming `where` and the message when an
// assistant message cannot be found.
std::vector<std::pair<size_t, size_t>> assistant_content_ranges(const std::string& rendered, const Json& messages,
                                                                const std::string& where);

// The --train-on assistant mask: tokens overlapping an assistant content range count, and so does
// the token right after each range when it is an end-of-turn token (the eos token, or one spelled
// like "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>") starting exactly where the content ends.
std::vector<uint8_t> assistant_mask(const std::vector<std::pair<size_t, size_t>>& content_ranges,
                                    const std::vector<std::pair<size_t, size_t>>& token_ranges,
                                    const std::vector<int32_t>& tokens, const Tokenizer& tokenizer);

}  // namespace qlora::data
