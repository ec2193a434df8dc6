// The chat template API (data/chat_template.h): parses once, renders per conversation with the
// context transformers' apply_chat_template builds, and picks the template a job uses.
#include "data/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/chat_template_internal.h"
#include "shard/model_store.h"

namespace qlora::data {

ChatTemplate::ChatTemplate(std::string source, std::string origin)
    : source_(std::move(source)), origin_(std::move(origin)), program_(jinja::parse_template(source_, origin_)) {}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(const ChatTemplate& other) = default;
ChatTemplate& ChatTemplate::operator=(const ChatTemplate& other) = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

const std::string& ChatTemplate::source() const { return source_; }
const std::string& ChatTemplate::origin() const { return origin_; }

namespace {

// transformers' apply_chat_template drops message keys whose value is None and copies a message's
// reasoning (reasoning_content, thinking or reasoning) to reasoning_content and thinking.
jinja::Value conversation_value(const Json& messages, const std::string& origin) {
  if (!messages.is_array()) throw ChatTemplateError(origin + ": messages must be a JSON array of objects");
  jinja::List list;
  list.reserve(messages.size());
  for (const Json& message : messages) {
    if (!message.is_object()) {
      throw ChatTemplateError(origin + ": every message must be a JSON object, got " + dump_json(message));
    }
    jinja::Dict fields;
    fields.reserve(message.size() + 2);
    const Json* reasoning = nullptr;
    for (const char* key : {"reasoning_content", "thinking", "reasoning"}) {
      if (!reasoning && message.contains(key) && !message.at(key).is_null()) reasoning = &message.at(key);
    }
    if (reasoning) fields.emplace_back("thinking", jinja::value_from_json(*reasoning));
    for (auto it = message.begin(); it != message.end(); ++it) {
      if (it.value().is_null()) continue;
      if (reasoning && (it.key() == "thinking" || it.key() == "reasoning_content")) continue;
      fields.emplace_back(it.key(), jinja::value_from_json(it.value()));
    }
    if (reasoning) fields.emplace_back("reasoning_content", jinja::value_from_json(*reasoning));
    list.push_back(jinja::Value::from_dict(std::move(fields)));
  }
  return jinja::Value::from_list(std::move(list));
}

}  // namespace

std::string ChatTemplate::render(const Json& messages, bool add_generation_prompt, const Json& variables) const {
  if (!variables.is_null() && !variables.is_object()) {
    throw ChatTemplateError(origin_ + ": chat template variables must be a JSON object");
  }
  jinja::Dict context;
  try {
    // The names apply_chat_template always passes: tools and documents are None when not given.
    context.emplace_back("tools", jinja::Value::none());
    context.emplace_back("documents", jinja::Value::none());
    if (variables.is_object()) {
      for (auto it = variables.begin(); it != variables.end(); ++it) {
        auto existing = std::find_if(context.begin(), context.end(), [&](const auto& kv) { return kv.first == it.key(); });
        if (existing != context.end()) existing->second = jinja::value_from_json(it.value());
        else context.emplace_back(it.key(), jinja::value_from_json(it.value()));
      }
    }
    context.emplace_back("messages", conversation_value(messages, origin_));
    context.emplace_back("add_generation_prompt", jinja::Value::from_bool(add_generation_prompt));
  } catch (const jinja::EvalError& error) {
    throw ChatTemplateError(origin_ + ": " + error.message);
  }
  return jinja::render_program(*program_, origin_, jinja::Value::from_dict(std::move(context)));
}

std::optional<ChatTemplate> chat_template_for(const shard::ModelStore& store, const std::string& override_path) {
  if (!override_path.empty()) {
    std::error_code error;
    std::ifstream in(override_path, std::ios::binary);
    if (!in || std::filesystem::is_directory(override_path, error)) {
      throw UserError(override_path + ": cannot read the chat template file",
                      "check the path given to --chat-template");
    }
    std::ostringstream text;
    text << in.rdbuf();
    if (in.bad()) throw UserError(override_path + ": cannot read the chat template file", "check the file");
    return ChatTemplate(text.str(), override_path);
  }
  const std::string& stored = store.header().chat_template;
  if (stored.empty()) return std::nullopt;
  return ChatTemplate(stored, store.path() + " (chat_template)");
}

}  // namespace qlora::data
