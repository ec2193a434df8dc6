// Chat templates (data/chat_template.h) against what transformers' apply_chat_template renders:
// tests/fixtures/chat_templates/cases.json (scripts/make_chat_template_fixtures.py) holds real
// models' templates over conversations with and without a system prompt, multi-turn, non-ASCII text
// and roles the templates reject, plus small templates probing Jinja semantics. Every rendering
// must be byte-identical; every raise must raise ChatTemplateError with the template's message.
// Also: constructs qlora cannot run are refused by name and line, and the template travels from a
// Hugging Face folder or a GGUF file into model.h5.
#include <gtest/gtest.h>

#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "common/json.h"
#include "data/chat_template.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace fs = std::filesystem;
using qlora::Json;
using qlora::data::ChatTemplate;
using qlora::data::ChatTemplateError;

namespace {

std::string fixture(const std::string& name) {
  return qlora::testing_support::source_dir() + "/tests/fixtures/chat_templates/" + name;
}

const Json& cases() {
  static const Json parsed = qlora::parse_json(qlora::testing_support::read_file(fixture("cases.json")), "cases.json");
  return parsed;
}

std::string render(const std::string& source, const Json& variables = Json::object(), const Json& messages = Json::array(),
                   bool add_generation_prompt = false) {
  return ChatTemplate(source, "test.jinja").render(messages, add_generation_prompt, variables);
}

// The message of the ChatTemplateError `action` throws ("" when it does not throw).
template <typename Action>
std::string error_of(Action action) {
  try {
    action();
  } catch (const ChatTemplateError& error) {
    return error.what();
  }
  return "";
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

}  // namespace

TEST(ChatTemplateFixtures, RealTemplatesRenderByteForByteAsTransformers) {
  std::map<std::string, std::unique_ptr<ChatTemplate>> templates;
  int rendered = 0, raised = 0;
  for (const Json& c : cases().at("cases")) {
    const std::string file = c.at("template").get<std::string>();
    if (!templates.count(file)) {
      templates[file] = std::make_unique<ChatTemplate>(qlora::testing_support::read_file(fixture(file)), file);
    }
    const ChatTemplate& chat_template = *templates[file];
    const std::string label = file + " / " + c.at("name").get<std::string>() +
                              (c.at("add_generation_prompt").get<bool>() ? " / generation prompt" : "");
    if (c.contains("expected")) {
      EXPECT_EQ(chat_template.render(c.at("messages"), c.at("add_generation_prompt").get<bool>(), c.at("variables")),
                c.at("expected").get<std::string>())
          << label;
      ++rendered;
    } else {
      const std::string message = error_of([&] {
        chat_template.render(c.at("messages"), c.at("add_generation_prompt").get<bool>(), c.at("variables"));
      });
      ASSERT_EQ(c.at("error").at("type"), "TemplateError") << label;
      EXPECT_NE(message.find(c.at("error").at("message").get<std::string>()), std::string::npos)
          << label << ": got '" << message << "'";
      ++raised;
    }
  }
  EXPECT_EQ(templates.size(), 9u);
  EXPECT_GE(rendered, 100);
  EXPECT_GE(raised, 20);
}

TEST(ChatTemplateFixtures, JinjaSemanticsMatchTransformers) {
  for (const Json& c : cases().at("semantics")) {
    const std::string source = c.at("template").get<std::string>();
    if (c.contains("expected")) {
      EXPECT_EQ(render(source, c.at("variables")), c.at("expected").get<std::string>()) << source;
    } else {
      const std::string message = error_of([&] { render(source, c.at("variables")); });
      EXPECT_NE(message, "") << source << " should fail like transformers (" << c.at("error").dump() << ")";
      // Undefined names and raised messages carry Jinja's own text.
      const std::string type = c.at("error").at("type").get<std::string>();
      if (type == "TemplateError" || type == "UndefinedError") {
        EXPECT_NE(message.find(c.at("error").at("message").get<std::string>()), std::string::npos)
            << source << ": got '" << message << "'";
      }
    }
  }
}

TEST(ChatTemplate, WhitespaceControlTrimBlocksAndLstripBlocks) {
  // trim_blocks eats the newline after a block tag, lstrip_blocks the indentation before it.
  EXPECT_EQ(render("{% if true %}\n    yes\n    {% endif %}\nafter"), "    yes\nafter");
  // '-' strips every white space character on that side, newlines included.
  EXPECT_EQ(render("a   \n  {{- 'b' -}}  \n  c"), "abc");
  // '+' keeps the indentation lstrip_blocks would remove.
  EXPECT_EQ(render("  {%+ if true %}x{% endif %}"), "  x");
  // Output tags are not blocks: neither trim_blocks nor lstrip_blocks touch them.
  EXPECT_EQ(render("  {{ 'x' }}\ny"), "  x\ny");
  // Exactly one trailing newline of the template is dropped.
  EXPECT_EQ(render("x\n\n"), "x\n");
  // Comments count as blocks for both rules.
  EXPECT_EQ(render("a\n  {# note #}\nb"), "a\nb");
}

TEST(ChatTemplate, LoopVariablesBreakContinueAndScoping) {
  EXPECT_EQ(render("{% for x in 'abc' %}{{ loop.index0 }}{{ x }}{% if not loop.last %},{% endif %}{% endfor %}"),
            "0a,1b,2c");
  EXPECT_EQ(render("{% for x in [1, 2, 3] %}{{ loop.revindex0 }}{{ loop.previtem is defined }}{% endfor %}"),
            "2False1True0True");
  EXPECT_EQ(render("{% for i in range(1, 10, 3) %}{% if i == 4 %}{% continue %}{% endif %}{{ i }}{% endfor %}"), "17");
  EXPECT_EQ(render("{% for i in range(5) %}{% for j in range(5) %}{% if j > i %}{% break %}{% endif %}{{ j }}{% endfor %};"
                   "{% endfor %}"),
            "0;01;012;0123;01234;");
  // A set inside a loop body dies with the iteration; a namespace carries values out.
  EXPECT_EQ(render("{% set n = 0 %}{% for i in [1, 2] %}{% set n = n + i %}{% endfor %}{{ n }}"), "0");
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for i in [1, 2] %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}"),
            "3");
  // The inner loop's `loop` shadows the outer one only inside it.
  EXPECT_EQ(render("{% for a in [1, 2] %}{% for b in [1] %}{{ loop.length }}{% endfor %}{{ loop.length }}{% endfor %}"),
            "1212");
}

TEST(ChatTemplate, SlicesSubscriptsAndStrings) {
  EXPECT_EQ(render("{{ m[1:] }}|{{ m[-1].content }}|{{ m[::-1][0]['role'] }}|{{ m[5] is defined }}",
                   Json{{"m", Json::array({Json{{"role", "system"}, {"content", "s"}},
                                           Json{{"role", "user"}, {"content", "u"}}})}}),
            "[{'content': 'u', 'role': 'user'}]|u|user|False");
  EXPECT_EQ(render("{{ '日本語テキスト'[2:4] }}{{ 'abc'[-5:2] }}{{ 'abcdef'[5:1:-2] }}"), "語テabfd");
  EXPECT_EQ(render("{{ '\\u00e9\\n\\t' ~ \"\\\"\" }}"), "é\n\t\"");
}

TEST(ChatTemplate, UndefinedBehavesLikeJinjasDefaultUndefined) {
  EXPECT_EQ(render("[{{ missing }}]{{ missing is defined }}{{ missing|default('d') }}{% for x in missing %}x{% endfor %}"),
            "[]Falsed");
  EXPECT_NE(error_of([] { render("{{ missing.attribute }}"); }).find("'missing' is undefined"), std::string::npos);
  EXPECT_NE(error_of([] { render("{{ missing ~ 1 }}{{ missing + 1 }}"); }).find("'missing' is undefined"),
            std::string::npos);
  EXPECT_EQ(render("{{ d.nothing is defined }}{{ d['x'] }}", Json{{"d", Json{{"x", "y"}}}}), "Falsey");
}

TEST(ChatTemplate, RaiseExceptionCarriesTheTemplatesMessageAndLine) {
  const std::string message = error_of([] {
    render("line one\n{% if messages|length == 0 %}\n{{ raise_exception('No messages given: ' ~ 0) }}\n{% endif %}");
  });
  EXPECT_NE(message.find("No messages given: 0"), std::string::npos) << message;
  EXPECT_NE(message.find("line 3"), std::string::npos) << message;
  EXPECT_NE(message.find("test.jinja"), std::string::npos) << message;
}

TEST(ChatTemplate, UnsupportedConstructsAreRefusedByNameAtParseTime) {
  const std::string filter = error_of([] { ChatTemplate("ok\n{{ messages | wordcount }}", "model.h5"); });
  EXPECT_NE(filter.find("unsupported filter 'wordcount'"), std::string::npos) << filter;
  EXPECT_NE(filter.find("model.h5: chat template line 2"), std::string::npos) << filter;
  const std::string tag = error_of([] { ChatTemplate("{% include 'other.jinja' %}", "t"); });
  EXPECT_NE(tag.find("unsupported tag 'include'"), std::string::npos) << tag;
  const std::string test = error_of([] { ChatTemplate("{{ x is sameas y }}", "t"); });
  EXPECT_NE(test.find("unsupported test 'sameas'"), std::string::npos) << test;
  const std::string recursive = error_of([] { ChatTemplate("{% for x in y recursive %}{% endfor %}", "t"); });
  EXPECT_NE(recursive.find("recursive"), std::string::npos) << recursive;
  const std::string unclosed = error_of([] { ChatTemplate("{% if x %}never closed", "t"); });
  EXPECT_NE(unclosed.find("endif"), std::string::npos) << unclosed;
  // Methods are only known at render time: refused then, by name.
  const std::string method = error_of([] { render("{{ 'a'.zfill(3) }}"); });
  EXPECT_NE(method.find("unsupported string method 'zfill'"), std::string::npos) << method;
  const std::string mutation = error_of([] { render("{% set l = [] %}{{ l.append(1) }}"); });
  EXPECT_NE(mutation.find("append"), std::string::npos) << mutation;
  const std::string format = error_of([] { render("{{ '%s' % 1 }}"); });
  EXPECT_NE(format.find("'%'"), std::string::npos) << format;
}

TEST(ChatTemplate, StrftimeNowFormatsTheLocalDate) {
  std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  char year[16];
  std::strftime(year, sizeof year, "%Y", &local);
  const std::string rendered = render("{{ strftime_now('%Y') }}|{{ strftime_now is defined }}");
  // The year could roll over between the two reads only at midnight on New Year's Eve.
  EXPECT_EQ(rendered, std::string(year) + "|True");
}

TEST(ChatTemplate, MessagesMustBeObjectsAndCopiesShareTheParsedTemplate) {
  ChatTemplate original("{{ messages[0].content }}", "t");
  ChatTemplate copy = original;
  EXPECT_EQ(copy.render(Json::array({Json{{"role", "user"}, {"content", "hi"}}}), false, Json::object()), "hi");
  EXPECT_EQ(copy.source(), "{{ messages[0].content }}");
  EXPECT_NE(error_of([&] { copy.render(Json::array({"not an object"}), false, Json::object()); }), "");
  EXPECT_NE(error_of([&] { copy.render(Json::object(), false, Json::object()); }), "");
}

TEST(ChatTemplateStore, HfFolderTemplateTravelsIntoTheStore) {
  const std::string folder = qlora::testing_support::shared_temp_dir(MPI_COMM_SELF);
  const fs::path hf = fs::path(folder) / "hf_chat";
  fs::create_directories(hf);
  for (const auto& entry : fs::directory_iterator(qlora::testing_support::source_dir() + "/tests/fixtures/model/llama/hf"))
    fs::copy_file(entry.path(), hf / entry.path().filename(), fs::copy_options::overwrite_existing);
  const std::string llama2 = qlora::testing_support::read_file(fixture("llama-2-chat.jinja"));

  // A string chat_template.
  write_file(hf / "tokenizer_config.json", Json{{"chat_template", llama2}, {"eos_token", "</s>"}}.dump());
  const std::string store_path = folder + "/chat.h5";
  qlora::shard::convert_hf_directory(hf.string(), store_path, qlora::shard::ConvertOptions{});
  {
    const auto store = qlora::shard::ModelStore::open(store_path);
    EXPECT_EQ(store->chat_template(), llama2);
    const auto chat_template = qlora::data::chat_template_for(*store, "");
    ASSERT_TRUE(chat_template.has_value());
    EXPECT_EQ(chat_template->render(Json::array({Json{{"role", "user"}, {"content", " hi "}}}), false,
                                    Json{{"bos_token", "<s>"}, {"eos_token", "</s>"}}),
              "<s>[INST] hi [/INST]");
    // An override file wins over the stored template; a missing one is a UserError naming it.
    const std::string override_path = folder + "/override.jinja";
    write_file(override_path, "{{ messages|length }}");
    EXPECT_EQ(qlora::data::chat_template_for(*store, override_path)->render(Json::array(), false, Json::object()), "0");
    try {
      qlora::data::chat_template_for(*store, folder);
      ADD_FAILURE() << "a directory given as --chat-template must be refused";
    } catch (const qlora::UserError& error) {
      EXPECT_NE(std::string(error.what()).find("cannot read"), std::string::npos) << error.what();
    }
    try {
      qlora::data::chat_template_for(*store, folder + "/absent.jinja");
      ADD_FAILURE() << "a missing --chat-template file must be refused";
    } catch (const qlora::UserError& error) {
      EXPECT_NE(std::string(error.what()).find("absent.jinja"), std::string::npos) << error.what();
    }
  }

  // A list of named templates: "default" is stored.
  write_file(hf / "tokenizer_config.json",
             Json{{"chat_template", Json::array({Json{{"name", "tool_use"}, {"template", "TOOLS"}},
                                                 Json{{"name", "default"}, {"template", "DEFAULT"}}})}}
                 .dump());
  qlora::shard::convert_hf_directory(hf.string(), folder + "/named.h5", qlora::shard::ConvertOptions{});
  EXPECT_EQ(qlora::shard::ModelStore::open(folder + "/named.h5")->chat_template(), "DEFAULT");

  // A list without "default" is refused, naming what it has.
  write_file(hf / "tokenizer_config.json",
             Json{{"chat_template", Json::array({Json{{"name", "tool_use"}, {"template", "TOOLS"}}})}}.dump());
  try {
    qlora::shard::convert_hf_directory(hf.string(), folder + "/refused.h5", qlora::shard::ConvertOptions{});
    ADD_FAILURE() << "a chat_template list without default must be refused";
  } catch (const qlora::FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("tool_use"), std::string::npos) << error.what();
  }
  EXPECT_FALSE(fs::exists(folder + "/refused.h5"));

  // No template at all: the store has none and chat_template_for gives nothing.
  write_file(hf / "tokenizer_config.json", R"({"eos_token": "</s>"})");
  qlora::shard::convert_hf_directory(hf.string(), folder + "/plain.h5", qlora::shard::ConvertOptions{});
  const auto plain = qlora::shard::ModelStore::open(folder + "/plain.h5");
  EXPECT_EQ(plain->chat_template(), "");
  EXPECT_FALSE(qlora::data::chat_template_for(*plain, "").has_value());

  // Newer transformers save the template beside the config as chat_template.jinja.
  write_file(hf / "chat_template.jinja", "JINJA FILE");
  qlora::shard::convert_hf_directory(hf.string(), folder + "/file.h5", qlora::shard::ConvertOptions{});
  EXPECT_EQ(qlora::shard::ModelStore::open(folder + "/file.h5")->chat_template(), "JINJA FILE");
}

TEST(ChatTemplateStore, GgufTemplateTravelsIntoTheStore) {
  const std::string folder = qlora::testing_support::shared_temp_dir(MPI_COMM_SELF);
  const std::string store_path = folder + "/gguf_chat.h5";
  qlora::shard::convert_gguf_file(fixture("llama_tiny_chat.gguf"), store_path, qlora::shard::ConvertOptions{});
  const auto store = qlora::shard::ModelStore::open(store_path);
  const std::string smollm2 = qlora::testing_support::read_file(fixture("smollm2-135m-instruct.jinja"));
  EXPECT_EQ(store->chat_template(), smollm2);
  const auto chat_template = qlora::data::chat_template_for(*store, "");
  ASSERT_TRUE(chat_template.has_value());
  EXPECT_EQ(chat_template->render(Json::array({Json{{"role", "user"}, {"content", "Hi"}}}), true, Json::object()),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  // The original fixture has no template: nothing is stored.
  qlora::shard::convert_gguf_file(qlora::testing_support::source_dir() + "/tests/fixtures/gguf/llama_tiny.gguf",
                                  folder + "/gguf_plain.h5", qlora::shard::ConvertOptions{});
  EXPECT_EQ(qlora::shard::ModelStore::open(folder + "/gguf_plain.h5")->chat_template(), "");
}

TEST(ChatTemplateStore, RealSmolLM2GgufTemplateRendersLikeTheFixture) {
  const char* location = std::getenv("QLORA_SMOLLM2_GGUF");
  if (location == nullptr || !fs::exists(location)) GTEST_SKIP() << "set QLORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf";
  const std::string folder = qlora::testing_support::shared_temp_dir(MPI_COMM_SELF);
  qlora::shard::convert_gguf_file(location, folder + "/smollm2.h5", qlora::shard::ConvertOptions{});
  const auto store = qlora::shard::ModelStore::open(folder + "/smollm2.h5");
  EXPECT_EQ(store->chat_template(), qlora::testing_support::read_file(fixture("smollm2-135m-instruct.jinja")));
}
