// Chat templates: the Jinja2 subset Hugging Face chat templates use, rendered byte for byte as
// transformers' tokenizer.apply_chat_template(messages, tokenize=False, ...) renders them (its
// sandboxed environment with trim_blocks and lstrip_blocks, its tojson, raise_exception and
// strftime_now). A construct the interpreter cannot run exactly (an unknown filter, test, tag or
// method) is refused with a ChatTemplateError naming it and the template line, never approximated.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "common/errors.h"
#include "common/json.h"

namespace qlora::shard {
class ModelStore;
}

namespace qlora::data {

// Exit 2 like every UserError: a template qlora cannot run, or one that raised (raise_exception).
struct ChatTemplateError : UserError {
  using UserError::UserError;
};

namespace jinja {
struct Program;  // the parsed template (data/chat_template_internal.h)
}

class ChatTemplate {
 public:
  // Parses `source` now, so unsupported constructs are refused before any data is read.
  // `origin` names where the text came from ("model.h5", a file path) in error messages.
  ChatTemplate(std::string source, std::string origin);
  ~ChatTemplate();
  ChatTemplate(const ChatTemplate& other);
  ChatTemplate& operator=(const ChatTemplate& other);
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // Renders like tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...).
  // `variables` is a JSON object of extra context: bos_token, eos_token, tools, documents, anything
  // else. raise_exception(msg) in the template throws ChatTemplateError carrying msg.
  std::string render(const Json& messages, bool add_generation_prompt, const Json& variables) const;
  const std::string& source() const;
  const std::string& origin() const;

 private:
  std::string source_;
  std::string origin_;
  std::shared_ptr<const jinja::Program> program_;  // immutable once parsed, so copies share it
};

// The template a job uses: the file at `override_path` when it is non-empty (a missing or unreadable
// file is a UserError naming it), else the one stored in the model (model.h5 root attribute
// chat_template), else nothing.
std::optional<ChatTemplate> chat_template_for(const shard::ModelStore& store, const std::string& override_path);

}  // namespace qlora::data
