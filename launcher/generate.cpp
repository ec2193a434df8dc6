// `qlora generate`: prompt / JSONL / chat front ends over the KV-cached decoder.
#include "launcher/generate.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>

#include "common/errors.h"
#include "common/json.h"
#include "common/log.h"
#include "data/chat_template.h"
#include "launcher/adapter_io.h"
#include "launcher/errors.h"
#include "launcher/train.h"
#include "prepare/prepare.h"
#include "shard/model_store.h"

namespace qlora::launcher {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Every rank takes rank 0's token, so ranks whose logits differed in the last bit still agree.
int64_t agree_on_token(int64_t token, cluster::Communicator& communicator) {
  if (communicator.size() > 1) communicator.broadcast(&token, sizeof token, 0);
  return token;
}

// Rank 0's string on every rank (stdin is read on rank 0 only). nullopt when rank 0 has none (EOF).
std::optional<std::string> broadcast_line(const std::optional<std::string>& line, cluster::Communicator& communicator) {
  int64_t length = line ? static_cast<int64_t>(line->size()) : -1;
  if (communicator.size() > 1) communicator.broadcast(&length, sizeof length, 0);
  if (length < 0) return std::nullopt;
  std::string text = communicator.rank() == 0 ? *line : std::string(static_cast<size_t>(length), '\0');
  if (communicator.size() > 1 && length > 0) communicator.broadcast(text.data(), length, 0);
  return text;
}

std::vector<int64_t> encode(const data::Tokenizer& tokenizer, const std::string& text, bool add_bos) {
  std::vector<int64_t> ids;
  if (add_bos && tokenizer.bos_id() >= 0) ids.push_back(tokenizer.bos_id());
  for (int32_t id : tokenizer.encode(text)) ids.push_back(id);
  return ids;
}

std::string token_text(const data::Tokenizer& tokenizer, int32_t id) {
  return id >= 0 ? tokenizer.decode({id}) : std::string();
}

// The conversation rendered for the next assistant turn.
std::vector<int64_t> render_conversation(const data::ChatTemplate& chat_template, const data::Tokenizer& tokenizer,
                                         const Json& messages) {
  Json variables = Json::object();
  variables["bos_token"] = token_text(tokenizer, tokenizer.bos_id());
  variables["eos_token"] = token_text(tokenizer, tokenizer.eos_id());
  return encode(tokenizer, chat_template.render(messages, /*add_generation_prompt=*/true, variables), false);
}

// Runs `prompt` through the decoder, reusing the cached prefix it shares with `cached` (a chat's
// earlier turns), then generates.
Completion complete_reusing_cache(model::CachedDecoder& decoder, std::vector<int64_t>& cached,
                                  const std::vector<int64_t>& prompt, const GenerateOptions& options,
                                  const data::Tokenizer& tokenizer, const std::vector<int64_t>& stops,
                                  model::TokenSampler& sampler, cluster::Communicator& communicator,
                                  std::ostream* stream, GenerationStats& stats) {
  size_t shared = 0;
  while (shared < cached.size() && shared < prompt.size() && cached[shared] == prompt[shared]) ++shared;
  if (shared == prompt.size() && shared > 0) --shared;  // at least one token must run to give logits
  decoder.truncate(static_cast<int64_t>(std::min<size_t>(shared, static_cast<size_t>(decoder.length()))));
  auto completion = generate_completion(decoder, tokenizer, prompt, stops, options.max_new_tokens, sampler,
                                        communicator, stream, &stats);
  cached = prompt;
  cached.insert(cached.end(), completion.tokens.begin(), completion.tokens.end());
  // The cache holds every generated token except the last, which was never run.
  cached.resize(static_cast<size_t>(decoder.length()));
  return completion;
}

void print_stats(const GenerationStats& stats) {
  if (!log::is_root()) return;
  char line[256];
  std::snprintf(line, sizeof line,
                "generate: prefill %lld tokens in %.3f s (%.1f tokens/s), decode %lld tokens in %.3f s (%.2f tokens/s)",
                static_cast<long long>(stats.prefill_tokens), stats.prefill_seconds,
                stats.prefill_seconds > 0 ? static_cast<double>(stats.prefill_tokens) / stats.prefill_seconds : 0.0,
                static_cast<long long>(stats.decode_tokens), stats.decode_seconds,
                stats.decode_seconds > 0 ? static_cast<double>(stats.decode_tokens) / stats.decode_seconds : 0.0);
  std::cerr << line << std::endl;
}

int run_prompt(const GenerateOptions& options, model::CachedDecoder& decoder, const data::Tokenizer& tokenizer,
               const std::vector<int64_t>& stops, cluster::Communicator& communicator) {
  const auto prompt = encode(tokenizer, options.prompt, options.add_bos);
  if (prompt.empty()) throw UserError("--prompt encodes to no tokens", "give some text, or use --add-bos");
  model::TokenSampler sampler(options.sampling);
  GenerationStats stats;
  std::ostream* stream = log::is_root() ? &std::cout : nullptr;
  if (stream != nullptr) *stream << options.prompt << std::flush;
  generate_completion(decoder, tokenizer, prompt, stops, options.max_new_tokens, sampler, communicator, stream, &stats);
  if (stream != nullptr) *stream << std::endl;
  print_stats(stats);
  return 0;
}

int run_input_file(const GenerateOptions& options, model::CachedDecoder& decoder, const data::Tokenizer& tokenizer,
                   const std::vector<int64_t>& stops, const std::optional<data::ChatTemplate>& chat_template,
                   cluster::Communicator& communicator) {
  std::vector<Json> requests;
  run_collectively(communicator, [&] {
    std::ifstream in(options.input_path);
    if (!in) throw UserError("--input " + options.input_path + ": cannot open the file", "check the path");
    std::string line;
    int64_t number = 0;
    while (std::getline(in, line)) {
      ++number;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = options.input_path + ":" + std::to_string(number);
      Json request = parse_json(line, where);
      const bool has_prompt = request.is_object() && request.contains("prompt") && request["prompt"].is_string();
      const bool has_messages = request.is_object() && request.contains("messages") && request["messages"].is_array();
      if (has_prompt == has_messages)
        throw UserError(where + ": each line needs exactly one of {\"prompt\": TEXT} and {\"messages\": [...]}",
                        "e.g. {\"prompt\": \"Once upon a time\"}");
      if (has_messages && !chat_template)
        throw UserError(where + ": {\"messages\"} needs a chat template, and " + options.model_path + " has none",
                        "give one with --chat-template FILE");
      requests.push_back(std::move(request));
    }
  });
  GenerationStats stats;
  for (const auto& request : requests) {
    std::vector<int64_t> prompt;
    Json answer = Json::object();
    if (request.contains("prompt")) {
      const std::string text = request["prompt"].get<std::string>();
      prompt = encode(tokenizer, text, options.add_bos);
      answer["prompt"] = text;
    } else {
      prompt = render_conversation(*chat_template, tokenizer, request["messages"]);
      answer["messages"] = request["messages"];
    }
    if (prompt.empty()) throw UserError("an --input prompt encodes to no tokens", "remove the empty prompt");
    decoder.reset();
    model::TokenSampler sampler(options.sampling);  // per line, so a line's answer is independent of the others
    auto completion = generate_completion(decoder, tokenizer, prompt, stops, options.max_new_tokens, sampler,
                                          communicator, nullptr, &stats);
    answer["completion"] = completion.text;
    if (log::is_root()) std::cout << dump_json(answer) << std::endl;
  }
  print_stats(stats);
  return 0;
}

int run_chat(const GenerateOptions& options, model::CachedDecoder& decoder, const data::Tokenizer& tokenizer,
             const std::vector<int64_t>& stops, const data::ChatTemplate& chat_template,
             cluster::Communicator& communicator) {
  const bool root = log::is_root();
  if (root)
    std::cout << "qlora chat: type a message and press Enter; /reset starts over, /exit or end of input quits"
              << std::endl;
  Json messages = Json::array();
  std::vector<int64_t> cached;
  model::TokenSampler sampler(options.sampling);
  GenerationStats stats;
  while (true) {
    std::optional<std::string> line;
    if (root) {
      std::cout << "> " << std::flush;
      std::string text;
      if (std::getline(std::cin, text)) line = text;
    }
    line = broadcast_line(line, communicator);
    if (!line || *line == "/exit") break;
    if (*line == "/reset") {
      messages = Json::array();
      continue;
    }
    if (line->empty()) continue;
    messages.push_back(Json{{"role", "user"}, {"content", *line}});
    const auto prompt = render_conversation(chat_template, tokenizer, messages);
    auto completion = complete_reusing_cache(decoder, cached, prompt, options, tokenizer, stops, sampler,
                                             communicator, root ? &std::cout : nullptr, stats);
    if (root) std::cout << std::endl;
    messages.push_back(Json{{"role", "assistant"}, {"content", completion.text}});
  }
  if (root) std::cout << std::endl;
  print_stats(stats);
  return 0;
}

}  // namespace

size_t printable_prefix_length(const std::string& text) {
  size_t end = text.size();
  // Find the last character's lead byte (at most 3 continuation bytes back) and cut it if incomplete.
  size_t lead = end;
  for (size_t back = 1; back <= 4 && back <= end; ++back) {
    const auto byte = static_cast<unsigned char>(text[end - back]);
    if ((byte & 0xC0) != 0x80) {
      lead = end - back;
      break;
    }
  }
  if (lead < end) {
    const auto byte = static_cast<unsigned char>(text[lead]);
    const size_t expected = byte < 0x80 ? 1 : (byte >> 5) == 0x6 ? 2 : (byte >> 4) == 0xE ? 3 : (byte >> 3) == 0x1E ? 4 : 1;
    if (end - lead < expected) end = lead;
  }
  static const std::string replacement = "\xEF\xBF\xBD";
  if (end >= 3 && text.compare(end - 3, 3, replacement) == 0) end -= 3;
  return end;
}

std::vector<int64_t> stop_token_ids(const data::Tokenizer& tokenizer) {
  std::vector<int64_t> stops;
  if (tokenizer.eos_id() >= 0) stops.push_back(tokenizer.eos_id());
  for (const char* name : {"<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"}) {
    const auto ids = tokenizer.encode(name);
    if (ids.size() != 1 || tokenizer.decode({ids[0]}) != name) continue;
    if (std::find(stops.begin(), stops.end(), ids[0]) == stops.end()) stops.push_back(ids[0]);
  }
  return stops;
}

Completion generate_completion(model::CachedDecoder& decoder, const data::Tokenizer& tokenizer,
                               const std::vector<int64_t>& prompt, const std::vector<int64_t>& stop_tokens,
                               int64_t max_new_tokens, model::TokenSampler& sampler,
                               cluster::Communicator& communicator, std::ostream* stream, GenerationStats* stats) {
  Completion completion;
  if (max_new_tokens <= 0) return completion;
  TORCH_CHECK(decoder.length() < static_cast<int64_t>(prompt.size()), "the prompt must extend the cached tokens");
  auto start = Clock::now();
  const std::vector<int64_t> fresh(prompt.begin() + decoder.length(), prompt.end());
  auto logits = decoder.append(fresh);
  if (stats != nullptr) {
    stats->prefill_tokens += static_cast<int64_t>(fresh.size());
    stats->prefill_seconds += seconds_since(start);
  }
  size_t printed = 0;
  std::vector<int32_t> text_ids;
  start = Clock::now();
  int64_t decoded = 0;
  while (true) {
    const int64_t token = agree_on_token(sampler.next(logits), communicator);
    if (std::find(stop_tokens.begin(), stop_tokens.end(), token) != stop_tokens.end()) {
      completion.stopped = true;
      break;
    }
    completion.tokens.push_back(token);
    text_ids.push_back(static_cast<int32_t>(token));
    if (stream != nullptr) {
      const std::string text = tokenizer.decode(text_ids);
      const size_t printable = printable_prefix_length(text);
      if (printable > printed) {
        *stream << text.substr(printed, printable - printed) << std::flush;
        printed = printable;
      }
    }
    if (static_cast<int64_t>(completion.tokens.size()) >= max_new_tokens) break;
    logits = decoder.append({token});
    ++decoded;
  }
  if (stats != nullptr) {
    stats->decode_tokens += decoded;
    stats->decode_seconds += seconds_since(start);
  }
  completion.text = tokenizer.decode(text_ids);
  if (stream != nullptr && completion.text.size() > printed) *stream << completion.text.substr(printed) << std::flush;
  return completion;
}

int run_generation(const GenerateOptions& options, cluster::Communicator& communicator) {
  std::unique_ptr<shard::ModelStore> store;
  std::unique_ptr<data::Tokenizer> tokenizer;
  std::optional<data::ChatTemplate> chat_template;
  model::LlamaModel model{nullptr};
  run_collectively(communicator, [&] {
    if (options.max_new_tokens < 1) throw UserError("--max-new-tokens must be at least 1");
    if (!(options.sampling.temperature >= 0)) throw UserError("--temperature must be >= 0 (0: greedy)");
    if (!(options.sampling.top_p > 0 && options.sampling.top_p <= 1))
      throw UserError("--top-p must be in (0, 1]", "1 keeps every token");
    store = shard::ModelStore::open(options.model_path);
    tokenizer = data::load_store_tokenizer(*store);
    chat_template = data::chat_template_for(*store, options.chat_template_path);
    if (options.chat && !chat_template)
      throw UserError("--chat needs a chat template, and " + options.model_path + " has none",
                      "give one with --chat-template FILE");
    check_world_fits(*store, communicator.size());
    model = model::LlamaModel(*store, communicator);
    prepare::PrepareOptions prepare_options;
    prepare_options.use_gradient_checkpointing = false;
    prepare::prepare_model_for_kbit_training(*model, prepare_options);
    if (!options.adapter_dir.empty()) load_peft_adapter(options.adapter_dir, *model);
    model->eval();
  });
  const auto stops = stop_token_ids(*tokenizer);
  model::CachedDecoder decoder(*model, 256 + options.max_new_tokens);
  if (options.chat) return run_chat(options, decoder, *tokenizer, stops, *chat_template, communicator);
  if (!options.input_path.empty())
    return run_input_file(options, decoder, *tokenizer, stops, chat_template, communicator);
  return run_prompt(options, decoder, *tokenizer, stops, communicator);
}

}  // namespace qlora::launcher
