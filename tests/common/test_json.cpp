// common/json.h: what the project adds to nlohmann-json. Untrusted text becomes a FormatError naming
// its source (malformed syntax, invalid UTF-8, numbers past a double, repeated keys, deep nesting);
// checked field reads name the field and refuse wrong types; writes are compact or pretty, keys
// sorted, numbers in a form that reads back to the same value, and always valid UTF-8.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "common/json.h"

namespace qlora {
namespace {

// Parses text that must be refused and returns the FormatError's message.
std::string refusal(const std::string& text, const std::string& label = "input.json") {
  try {
    parse_json(text, label);
  } catch (const FormatError& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected a FormatError for: " << text;
  return "";
}

// Runs `read` and returns the FormatError it must throw.
template <typename Read>
std::string read_refusal(Read read) {
  try {
    read();
  } catch (const FormatError& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected a FormatError";
  return "";
}

TEST(JsonParse, EveryValueKind) {
  const Json value = parse_json(
      R"({"n": null, "t": true, "f": false, "i": 42, "d": 2.5, "s": "text", "a": [1, "two", [3]], "o": {"k": {}}})",
      "kinds.json");
  ASSERT_TRUE(value.is_object());
  EXPECT_EQ(value.size(), 8u);
  EXPECT_TRUE(value.at("n").is_null());
  EXPECT_TRUE(value.at("t").get<bool>());
  EXPECT_FALSE(value.at("f").get<bool>());
  EXPECT_EQ(value.at("i").get<int64_t>(), 42);
  EXPECT_TRUE(value.at("i").is_number_integer());
  EXPECT_DOUBLE_EQ(value.at("d").get<double>(), 2.5);
  EXPECT_TRUE(value.at("d").is_number_float());
  EXPECT_EQ(value.at("s").get<std::string>(), "text");
  ASSERT_EQ(value.at("a").size(), 3u);
  EXPECT_EQ(value.at("a").at(1).get<std::string>(), "two");
  EXPECT_EQ(value.at("a").at(2).at(0).get<int64_t>(), 3);
  EXPECT_TRUE(value.at("o").at("k").is_object());
  EXPECT_TRUE(value.at("o").at("k").empty());
}

TEST(JsonParse, ScalarDocumentsWhitespaceAndEmbeddedNul) {
  EXPECT_TRUE(parse_json("null", "x").is_null());
  EXPECT_TRUE(parse_json(" \t\r\n true \n", "x").get<bool>());
  EXPECT_EQ(parse_json("\"x\"", "x").get<std::string>(), "x");
  EXPECT_TRUE(parse_json("[ ]", "x").empty());
  // The view's length, not a terminating NUL, ends the text.
  const std::string padded("[1]\0[2]", 7);
  EXPECT_EQ(parse_json(std::string_view(padded.data(), 3), "x").at(0).get<int64_t>(), 1);
}

TEST(JsonParse, EscapesAndUnicode) {
  EXPECT_EQ(parse_json(R"("\" \\ \/ \b \f \n \r \t")", "x").get<std::string>(), "\" \\ / \b \f \n \r \t");
  EXPECT_EQ(parse_json(R"("\u00e9\u20AC")", "x").get<std::string>(), "\xc3\xa9\xe2\x82\xac");
  EXPECT_EQ(parse_json(R"("\u0000")", "x").get<std::string>(), std::string(1, '\0'));
  EXPECT_EQ(parse_json(R"("\ud83d\ude00")", "x").get<std::string>(), "\xf0\x9f\x98\x80");  // U+1F600
  EXPECT_EQ(parse_json(R"("\uDBFF\uDFFF")", "x").get<std::string>(), "\xf4\x8f\xbf\xbf");  // U+10FFFF
  EXPECT_EQ(parse_json("\"caf\xc3\xa9\"", "x").get<std::string>(), "caf\xc3\xa9");
}

TEST(JsonParse, RefusalsNameTheSourceAndThePosition) {
  const std::string message = refusal(R"({"a": 1,})", "models/config.json");
  EXPECT_EQ(message.rfind("models/config.json: invalid JSON: ", 0), 0u) << message;
  EXPECT_NE(message.find("line 1, column 9"), std::string::npos) << message;
  EXPECT_NE(refusal("{\n  \"a\": 1,\n}").find("line 3, column 1"), std::string::npos);
  EXPECT_NE(refusal("").find("unexpected end of input"), std::string::npos);
  EXPECT_NE(refusal("[1] x").find("expected end of input"), std::string::npos);
  EXPECT_NE(refusal(R"({"a": 1} {})").find("expected end of input"), std::string::npos);
  // A control byte is shown escaped, so the message stays printable.
  EXPECT_NE(refusal("[\x01]").find("<U+0001>"), std::string::npos);
}

TEST(JsonParse, RefusesMalformedText) {
  for (const char* text : {"[1, 2", R"({"a" 1})", "[1,]", "{1: 2}", "tru", "[1 2]", "'single'", "[1] [2]",
                           "\"a\nb\"", "\"abc", R"("\x")", R"("\u12g4")"}) {
    SCOPED_TRACE(text);
    EXPECT_NE(refusal(text).find("input.json: invalid JSON: "), std::string::npos);
  }
}

TEST(JsonParse, RefusesInvalidUtf8AndLoneSurrogates) {
  for (const std::string text : {"\"\xc0\x80\"", "\"\xed\xa0\x80\"", "\"\xff\"", "\"\xe2\x82\"", "\"\xf4\x90\x80\x80\""}) {
    EXPECT_NE(refusal(text).find("ill-formed UTF-8"), std::string::npos) << text.size();
  }
  for (const char* text : {R"("\ud83d")", R"("\ud83dx")", R"("\ud83d\u0041")", R"("\ude00")"}) {
    SCOPED_TRACE(text);
    EXPECT_NE(refusal(text).find("surrogate"), std::string::npos);
  }
}

TEST(JsonParse, RefusesMalformedAndNonFiniteNumbers) {
  for (const char* text : {"01", "-01", "1.", ".5", "-", "+1", "1e", "1e+", "0x10", "NaN", "Infinity", "-Infinity",
                           "1.2.3", "--1"}) {
    SCOPED_TRACE(text);
    EXPECT_NE(refusal(text).find("invalid JSON"), std::string::npos);
  }
  // Past a double's range is bad input too, not an exception of another kind.
  EXPECT_EQ(refusal("1e400"), "input.json: invalid JSON: number overflow parsing '1e400'");
  EXPECT_EQ(refusal("[-1e400]"), "input.json: invalid JSON: number overflow parsing '-1e400'");
  EXPECT_EQ(parse_json("1e-400", "x").get<double>(), 0.0);  // underflow is a finite zero
}

TEST(JsonParse, RefusesAnObjectRepeatingAKey) {
  EXPECT_EQ(refusal(R"({"a": 1, "a": 2})"), "input.json: invalid JSON: an object repeats a key");
  EXPECT_NE(refusal(R"([{"x": {"b": 1, "c": 2, "b": 3}}])").find("repeats a key"), std::string::npos);
  // The same key in sibling objects is not a repeat.
  const Json siblings = parse_json(R"([{"a": 1}, {"a": 2}, {"a": {"a": 3}}])", "x");
  EXPECT_EQ(siblings.at(2).at("a").at("a").get<int64_t>(), 3);
}

TEST(JsonParse, NestingIsCappedAt256Levels) {
  const int limit = 256;
  const Json deepest = parse_json(std::string(limit, '[') + std::string(limit, ']'), "x");
  EXPECT_TRUE(deepest.is_array());
  const std::string too_deep = std::string(limit + 1, '[') + std::string(limit + 1, ']');
  EXPECT_EQ(refusal(too_deep), "input.json: invalid JSON: nesting deeper than 256 levels");
  std::string objects;
  for (int level = 0; level <= limit; ++level) objects += "{\"k\":";
  objects += "0" + std::string(limit + 1, '}');
  EXPECT_NE(refusal(objects).find("nesting deeper than 256 levels"), std::string::npos);
  // Far deeper input fails at the cap rather than exhausting the stack later.
  EXPECT_NE(refusal(std::string(1000000, '[')).find("nesting deeper"), std::string::npos);
}

TEST(JsonNumbers, IntegersStayExact) {
  EXPECT_EQ(json_as_int(parse_json("9007199254740993", "x"), "n"), (int64_t{1} << 53) + 1);
  EXPECT_EQ(json_as_int(parse_json("9223372036854775807", "x"), "n"), std::numeric_limits<int64_t>::max());
  EXPECT_EQ(json_as_int(parse_json("-9223372036854775808", "x"), "n"), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(dump_json(parse_json("[123456789012345678]", "x")), "[123456789012345678]");
  // Writers such as Python's json emit 4096.0 for an integer; exact integral doubles are accepted.
  EXPECT_EQ(json_as_int(parse_json("4096.0", "x"), "n"), 4096);
  EXPECT_EQ(json_as_int(parse_json("1e2", "x"), "n"), 100);
  EXPECT_EQ(json_as_int(parse_json("-3.0", "x"), "n"), -3);
}

TEST(JsonNumbers, NonIntegersAndOutOfRangeIntegersAreRefused) {
  EXPECT_EQ(read_refusal([] { json_as_int(parse_json("1.5", "x"), "layers"); }), "layers must be an integer, not 1.5");
  EXPECT_EQ(read_refusal([] { json_as_int(parse_json("9223372036854775808", "x"), "offset"); }),
            "offset is beyond the int64 range");
  EXPECT_NE(read_refusal([] { json_as_int(parse_json("1e19", "x"), "n"); }).find("must be an integer"),
            std::string::npos);
  EXPECT_EQ(read_refusal([] { json_as_int(parse_json("\"7\"", "x"), "n"); }), "n must be an integer, not string");
  EXPECT_EQ(read_refusal([] { json_as_int(Json(), "n"); }), "n must be an integer, not null");
}

TEST(JsonFields, RequiredReadsNameTheFieldOnEveryRefusal) {
  const Json config = parse_json(
      R"({"layers": 32, "eps": 1e-5, "ratio": 2, "name": "llama", "tied": true, "half": 3.5, "scaling": null})", "x");
  EXPECT_EQ(json_int(config, "layers", "config.json"), 32);
  EXPECT_DOUBLE_EQ(json_double(config, "eps", "config.json"), 1e-5);
  EXPECT_DOUBLE_EQ(json_double(config, "ratio", "config.json"), 2.0);  // an integer is a number
  EXPECT_EQ(json_string(config, "name", "config.json"), "llama");
  EXPECT_TRUE(json_bool(config, "tied", "config.json"));
  EXPECT_EQ(read_refusal([&] { json_int(config, "heads", "config.json"); }), "config.json: missing field \"heads\"");
  EXPECT_EQ(read_refusal([&] { json_int(config, "half", "config.json"); }),
            "config.json: field \"half\" must be an integer, not 3.5");
  EXPECT_EQ(read_refusal([&] { json_double(config, "name", "config.json"); }),
            "config.json: field \"name\" must be a number, not string");
  EXPECT_EQ(read_refusal([&] { json_string(config, "layers", "config.json"); }),
            "config.json: field \"layers\" must be a string, not number");
  EXPECT_EQ(read_refusal([&] { json_bool(config, "name", "config.json"); }),
            "config.json: field \"name\" must be true or false, not string");
  // A required field that is null is present but of the wrong type.
  EXPECT_EQ(read_refusal([&] { json_int(config, "scaling", "config.json"); }),
            "config.json: field \"scaling\" must be an integer, not null");
  EXPECT_EQ(read_refusal([] { json_int(Json::array({1}), "layers", "config.json"); }),
            "config.json: expected a JSON object holding \"layers\"");
}

TEST(JsonFields, OptionalReadsFallBackOnlyWhenAbsentOrNull) {
  const Json config = parse_json(R"({"layers": 32, "eps": 1e-5, "name": "llama", "tied": false, "scaling": null})", "x");
  EXPECT_EQ(json_int_or(config, "layers", 7, "c"), 32);
  EXPECT_EQ(json_int_or(config, "missing", 7, "c"), 7);
  EXPECT_EQ(json_int_or(config, "scaling", 7, "c"), 7);
  EXPECT_DOUBLE_EQ(json_double_or(config, "eps", 0.5, "c"), 1e-5);
  EXPECT_DOUBLE_EQ(json_double_or(config, "missing", 0.5, "c"), 0.5);
  EXPECT_EQ(json_string_or(config, "name", "fallback", "c"), "llama");
  EXPECT_EQ(json_string_or(config, "scaling", "fallback", "c"), "fallback");
  EXPECT_FALSE(json_bool_or(config, "tied", true, "c"));
  EXPECT_TRUE(json_bool_or(config, "missing", true, "c"));
  // Present with the wrong type is a config error, not a reason to use the fallback.
  EXPECT_EQ(read_refusal([&] { json_int_or(config, "name", 0, "c"); }), "c: field \"name\" must be an integer, not string");
  EXPECT_EQ(read_refusal([&] { json_int_or(config, "eps", 0, "c"); }), "c: field \"eps\" must be an integer, not 1e-05");
  EXPECT_EQ(read_refusal([&] { json_string_or(config, "layers", "", "c"); }),
            "c: field \"layers\" must be a string, not number");
  EXPECT_EQ(read_refusal([&] { json_bool_or(config, "name", false, "c"); }),
            "c: field \"name\" must be true or false, not string");
}

TEST(JsonDump, CompactAndPrettyWithSortedKeys) {
  const Json value = parse_json(R"({"b": [1, {"y": null, "x": false}], "a": "s", "c": [], "d": {}})", "x");
  EXPECT_EQ(dump_json(value), R"({"a":"s","b":[1,{"x":false,"y":null}],"c":[],"d":{}})");
  EXPECT_EQ(dump_json(value, 2),
            "{\n"
            "  \"a\": \"s\",\n"
            "  \"b\": [\n"
            "    1,\n"
            "    {\n"
            "      \"x\": false,\n"
            "      \"y\": null\n"
            "    }\n"
            "  ],\n"
            "  \"c\": [],\n"
            "  \"d\": {}\n"
            "}");
  Json built;
  built["name"] = "adapter";
  built["count"] = uint64_t{5};
  built["nested"]["inner"] = 1;
  built["list"] = Json::array({1, "a", nullptr});
  EXPECT_EQ(dump_json(built), R"({"count":5,"list":[1,"a",null],"name":"adapter","nested":{"inner":1}})");
}

TEST(JsonDump, EscapesControlCharactersAndKeepsUtf8) {
  const std::string text = std::string("q\" b\\ n\n t\t c\x01 nul") + std::string(1, '\0') + "\xc3\xa9/";
  const std::string dumped = dump_json(Json(text));
  EXPECT_EQ(dumped, "\"q\\\" b\\\\ n\\n t\\t c\\u0001 nul\\u0000\xc3\xa9/\"");
  EXPECT_EQ(parse_json(dumped, "x").get<std::string>(), text);
}

TEST(JsonDump, InvalidUtf8BecomesTheReplacementCharacter) {
  // A model file's string with a stray byte must not make the written file unreadable.
  const std::string dumped = dump_json(Json(std::string("ab\xff" "cd")));
  EXPECT_EQ(dumped, "\"ab\xef\xbf\xbd" "cd\"");
  EXPECT_EQ(parse_json(dumped, "x").get<std::string>(), "ab\xef\xbf\xbd" "cd");
}

TEST(JsonDump, NumbersKeepTheirKindAndReadBackExactly) {
  EXPECT_EQ(dump_json(Json(16)), "16");
  EXPECT_EQ(dump_json(Json(16.0)), "16.0");  // a double stays a double across a round trip
  EXPECT_EQ(dump_json(Json(-0.0)), "-0.0");
  EXPECT_EQ(dump_json(Json(1e-5)), "1e-05");
  EXPECT_EQ(dump_json(Json(10000.0)), "10000.0");
  EXPECT_EQ(dump_json(Json(500000.0)), "500000.0");
  EXPECT_EQ(dump_json(Json(int64_t{-9007199254740993})), "-9007199254740993");
  for (const double number : {0.1, 1.0 / 3.0, 1e300, -1e-300, 5e-324, 1.7976931348623157e308, 123456.789}) {
    SCOPED_TRACE(number);
    EXPECT_EQ(parse_json(dump_json(Json(number)), "x").get<double>(), number);  // shortest form, still exact
  }
}

TEST(JsonDump, ParseDumpRoundTripIsStable) {
  const Json value = parse_json(R"({
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
    "unicode": "\u00fcber \ud83d\ude00",
    "nested": [[[]], [{}], [null, true, -1.25e-3]]
  })",
                                "x");
  for (const int indent : {-1, 0, 1, 4}) {
    SCOPED_TRACE(indent);
    const std::string dumped = dump_json(value, indent);
    const Json again = parse_json(dumped, "x");
    EXPECT_EQ(again, value);
    EXPECT_EQ(dump_json(again, indent), dumped);
  }
  EXPECT_EQ(dump_json(value.at("rope_scaling").at("factor")), "8.0");
  EXPECT_EQ(dump_json(value.at("nested").at(2)), "[null,true,-0.00125]");
}

}  // namespace
}  // namespace qlora
