// Tests for qlora::shard::Json: every value kind, string escapes, exact integers, the strict
// parser's error offsets and depth limit, accessors, and dump/parse round trips.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "shard/json.h"

namespace qlora::shard {
namespace {

// Parses text that must be rejected and returns the error message for inspection.
std::string parse_error(const std::string& text) {
  try {
    Json::parse(text);
  } catch (const JsonError& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected a JsonError for: " << text;
  return "";
}

TEST(JsonParse, AllValueKinds) {
  const Json value = Json::parse(
      R"({"n": null, "t": true, "f": false, "i": 42, "d": 2.5, "s": "text", "a": [1, "two", [3]], "o": {"k": {}}})");
  ASSERT_TRUE(value.is_object());
  EXPECT_EQ(value.size(), 8u);
  EXPECT_TRUE(value.at("n").is_null());
  EXPECT_TRUE(value.at("t").as_bool());
  EXPECT_FALSE(value.at("f").as_bool());
  EXPECT_EQ(value.at("i").as_int(), 42);
  EXPECT_DOUBLE_EQ(value.at("d").as_double(), 2.5);
  EXPECT_EQ(value.at("s").as_string(), "text");
  const Json& array = value.at("a");
  ASSERT_TRUE(array.is_array());
  EXPECT_EQ(array.size(), 3u);
  EXPECT_EQ(array.at(0).as_int(), 1);
  EXPECT_EQ(array.at(1).as_string(), "two");
  EXPECT_EQ(array.at(2).at(0).as_int(), 3);
  EXPECT_TRUE(value.at("o").at("k").is_object());
  EXPECT_EQ(value.at("o").at("k").size(), 0u);
  EXPECT_EQ(value.at("t").kind(), Json::Kind::boolean);
  EXPECT_EQ(value.at("d").kind(), Json::Kind::number);
}

TEST(JsonParse, ScalarDocumentsAndWhitespace) {
  EXPECT_TRUE(Json::parse("null").is_null());
  EXPECT_TRUE(Json::parse(" \t\r\n true \n").as_bool());
  EXPECT_EQ(Json::parse("\"x\"").as_string(), "x");
  EXPECT_EQ(Json::parse("[ ]").size(), 0u);
  EXPECT_EQ(Json::parse("{ }").size(), 0u);
  const std::string with_nul("[1]", 3);
  EXPECT_EQ(Json::parse(with_nul.data(), with_nul.size()).at(0).as_int(), 1);
}

TEST(JsonParse, SimpleEscapes) {
  EXPECT_EQ(Json::parse(R"("\" \\ \/ \b \f \n \r \t")").as_string(), "\" \\ / \b \f \n \r \t");
}

TEST(JsonParse, UnicodeEscapesBecomeUtf8) {
  EXPECT_EQ(Json::parse(R"("\u0041")").as_string(), "A");
  EXPECT_EQ(Json::parse(R"("\u00e9")").as_string(), "\xc3\xa9");
  EXPECT_EQ(Json::parse(R"("\u20AC")").as_string(), "\xe2\x82\xac");
  EXPECT_EQ(Json::parse(R"("\u0000")").as_string(), std::string(1, '\0'));
  // U+1F600 as a surrogate pair.
  EXPECT_EQ(Json::parse(R"("\ud83d\ude00")").as_string(), "\xf0\x9f\x98\x80");
  // U+10FFFF, the largest code point.
  EXPECT_EQ(Json::parse(R"("\uDBFF\uDFFF")").as_string(), "\xf4\x8f\xbf\xbf");
}

TEST(JsonParse, RawUtf8PassesThrough) {
  EXPECT_EQ(Json::parse("\"caf\xc3\xa9 \xf0\x9f\x98\x80\"").as_string(), "caf\xc3\xa9 \xf0\x9f\x98\x80");
}

TEST(JsonParse, RejectsBadStrings) {
  EXPECT_NE(parse_error(R"("\ud83d")").find("surrogate"), std::string::npos);
  EXPECT_NE(parse_error(R"("\ud83dx")").find("surrogate"), std::string::npos);
  EXPECT_NE(parse_error(R"("\ud83d\u0041")").find("surrogate"), std::string::npos);
  EXPECT_NE(parse_error(R"("\ude00")").find("surrogate"), std::string::npos);
  EXPECT_NE(parse_error(R"("\u12g4")").find("hex"), std::string::npos);
  EXPECT_NE(parse_error(R"("\u12")").find("offset"), std::string::npos);
  EXPECT_NE(parse_error(R"("\x")").find("escape"), std::string::npos);
  EXPECT_NE(parse_error("\"a\nb\"").find("control"), std::string::npos);
  EXPECT_NE(parse_error("\"abc").find("unterminated"), std::string::npos);
  EXPECT_NE(parse_error("\"\xc0\x80\"").find("UTF-8"), std::string::npos);      // overlong NUL
  EXPECT_NE(parse_error("\"\xed\xa0\x80\"").find("UTF-8"), std::string::npos);  // encoded surrogate
  EXPECT_NE(parse_error("\"\xff\"").find("UTF-8"), std::string::npos);
  EXPECT_NE(parse_error("\"\xe2\x82\"").find("UTF-8"), std::string::npos);      // truncated
  EXPECT_NE(parse_error("\"\xf4\x90\x80\x80\"").find("UTF-8"), std::string::npos);  // past U+10FFFF
}

TEST(JsonNumbers, IntegersAreExact) {
  EXPECT_EQ(Json::parse("0").as_int(), 0);
  EXPECT_EQ(Json::parse("-17").as_int(), -17);
  EXPECT_EQ(Json::parse("9007199254740992").as_int(), int64_t{1} << 53);
  // 2^53 + 1 has no double; it must survive as an integer.
  EXPECT_EQ(Json::parse("9007199254740993").as_int(), (int64_t{1} << 53) + 1);
  EXPECT_EQ(Json::parse("9223372036854775807").as_int(), std::numeric_limits<int64_t>::max());
  EXPECT_EQ(Json::parse("-9223372036854775808").as_int(), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(Json::parse("[123456789012345678]").dump(), "[123456789012345678]");
}

TEST(JsonNumbers, FractionsAndExponents) {
  EXPECT_DOUBLE_EQ(Json::parse("1.5").as_double(), 1.5);
  EXPECT_DOUBLE_EQ(Json::parse("-2.5e3").as_double(), -2500.0);
  EXPECT_DOUBLE_EQ(Json::parse("1E2").as_double(), 100.0);
  EXPECT_DOUBLE_EQ(Json::parse("1e+2").as_double(), 100.0);
  EXPECT_DOUBLE_EQ(Json::parse("25e-2").as_double(), 0.25);
  EXPECT_DOUBLE_EQ(Json::parse("0.1").as_double(), 0.1);
  EXPECT_EQ(Json::parse("1e-400").as_double(), 0.0);  // underflow rounds to zero, it is finite
  EXPECT_DOUBLE_EQ(Json::parse("42").as_double(), 42.0);
  // Integral doubles still read as integers; fractional ones do not.
  EXPECT_EQ(Json::parse("1e2").as_int(), 100);
  EXPECT_EQ(Json::parse("-3.0").as_int(), -3);
  EXPECT_THROW(Json::parse("1.5").as_int(), JsonError);
  EXPECT_THROW(Json::parse("1e19").as_int(), JsonError);
  // Past int64 an integer literal becomes the nearest double rather than an error.
  EXPECT_DOUBLE_EQ(Json::parse("18446744073709551616").as_double(), 18446744073709551616.0);
  EXPECT_TRUE(std::signbit(Json::parse("-0").as_double()));
}

TEST(JsonNumbers, RejectsMalformedAndNonFinite) {
  for (const char* text : {"01", "-01", "1.", ".5", "-", "+1", "1e", "1e+", "0x10", "NaN", "Infinity",
                           "-Infinity", "1.2.3", "--1"}) {
    SCOPED_TRACE(text);
    EXPECT_FALSE(parse_error(text).empty());
  }
  EXPECT_NE(parse_error("1e400").find("range"), std::string::npos);
  EXPECT_NE(parse_error("-1e400").find("range"), std::string::npos);
}

TEST(JsonErrors, NameTheByteOffset) {
  EXPECT_NE(parse_error("").find("byte offset 0"), std::string::npos);
  EXPECT_NE(parse_error("[1, 2").find("byte offset 5"), std::string::npos);
  EXPECT_NE(parse_error(R"({"a" 1})").find("byte offset 5"), std::string::npos);
  EXPECT_NE(parse_error(R"({"a": 1,})").find("byte offset 8"), std::string::npos);
  EXPECT_NE(parse_error("[1,]").find("byte offset 3"), std::string::npos);
  EXPECT_NE(parse_error("[1] x").find("byte offset 4"), std::string::npos);
  EXPECT_NE(parse_error("{1: 2}").find("byte offset 1"), std::string::npos);
  EXPECT_NE(parse_error("tru").find("byte offset 0"), std::string::npos);
  EXPECT_NE(parse_error("[\x01]").find("0x01"), std::string::npos);
  // The message says what was expected, not only where.
  EXPECT_NE(parse_error("[1 2]").find("','"), std::string::npos);
  EXPECT_NE(parse_error(R"({"a": 1} {})").find("after the JSON value"), std::string::npos);
}

TEST(JsonErrors, RejectsDuplicateKeys) {
  EXPECT_NE(parse_error(R"({"a": 1, "a": 2})").find("duplicate"), std::string::npos);
}

TEST(JsonErrors, DepthLimit) {
  const int limit = 256;
  const std::string deepest_allowed = std::string(limit, '[') + std::string(limit, ']');
  EXPECT_NO_THROW(Json::parse(deepest_allowed));
  const std::string too_deep = std::string(limit + 1, '[') + std::string(limit + 1, ']');
  EXPECT_NE(parse_error(too_deep).find("nesting"), std::string::npos);
  std::string objects;
  for (int i = 0; i <= limit; ++i) objects += "{\"k\":";
  objects += "0" + std::string(limit + 1, '}');
  EXPECT_NE(parse_error(objects).find("nesting"), std::string::npos);
  // Far deeper input must fail cleanly rather than exhaust the stack.
  EXPECT_NE(parse_error(std::string(1000000, '[')).find("nesting"), std::string::npos);
}

TEST(JsonAccess, KindMismatchesThrow) {
  const Json number(3);
  EXPECT_THROW(number.as_string(), JsonError);
  EXPECT_THROW(number.as_bool(), JsonError);
  EXPECT_THROW(number.as_array(), JsonError);
  EXPECT_THROW(number.as_object(), JsonError);
  EXPECT_THROW(Json("x").as_double(), JsonError);
  EXPECT_THROW(Json().as_int(), JsonError);
  EXPECT_THROW(number.size(), JsonError);
  EXPECT_THROW(number.at("k"), JsonError);
  EXPECT_THROW(number.at(0), JsonError);
}

TEST(JsonAccess, LookupsAndMissingKeys) {
  const Json value = Json::parse(R"({"present": 1, "list": [10, 20]})");
  EXPECT_TRUE(value.contains("present"));
  EXPECT_FALSE(value.contains("absent"));
  EXPECT_FALSE(Json(1).contains("present"));
  try {
    value.at("absent");
    FAIL() << "expected JsonError";
  } catch (const JsonError& error) {
    EXPECT_NE(std::string(error.what()).find("'absent'"), std::string::npos);
  }
  EXPECT_EQ(value.at("list").at(1).as_int(), 20);
  EXPECT_THROW(value.at("list").at(2), JsonError);
}

TEST(JsonAccess, TypedGettersWithDefaults) {
  const Json config = Json::parse(
      R"({"layers": 32, "eps": 1e-5, "ratio": 2, "name": "llama", "tied": true, "scaling": null})");
  EXPECT_EQ(config.get_int("layers", 0), 32);
  EXPECT_EQ(config.get_int("missing", 7), 7);
  EXPECT_EQ(config.get_int("scaling", 7), 7);  // null reads as "not set"
  EXPECT_DOUBLE_EQ(config.get_double("eps", 0.0), 1e-5);
  EXPECT_DOUBLE_EQ(config.get_double("ratio", 0.0), 2.0);
  EXPECT_DOUBLE_EQ(config.get_double("missing", 0.5), 0.5);
  EXPECT_EQ(config.get_string("name", ""), "llama");
  EXPECT_EQ(config.get_string("missing", "fallback"), "fallback");
  EXPECT_TRUE(config.get_bool("tied", false));
  EXPECT_TRUE(config.get_bool("missing", true));
  // A present value of the wrong kind is a config error, not a reason to use the default.
  EXPECT_THROW(config.get_int("name", 0), JsonError);
  EXPECT_THROW(config.get_int("eps", 0), JsonError);
  EXPECT_THROW(config.get_string("layers", ""), JsonError);
  EXPECT_THROW(config.get_bool("name", false), JsonError);
  EXPECT_EQ(Json().get_int("anything", 3), 3);
}

TEST(JsonBuild, ConstructorsAndIndexing) {
  Json value;
  value["count"] = Json(uint64_t{5});
  value["name"] = "adapter";
  value["flag"] = true;
  value["ratio"] = 0.25;
  value["nested"]["inner"] = 1;
  value["list"] = Json(Json::Array{1, "a", nullptr});
  EXPECT_TRUE(value.is_object());
  EXPECT_EQ(value.at("count").as_int(), 5);
  EXPECT_EQ(value.at("nested").at("inner").as_int(), 1);
  EXPECT_TRUE(value.at("list").at(2).is_null());
  EXPECT_EQ(value.dump(), R"({"count":5,"flag":true,"list":[1,"a",null],"name":"adapter","nested":{"inner":1},"ratio":0.25})");
  Json number(1);
  EXPECT_THROW(number["key"], JsonError);
}

TEST(JsonBuild, CopiesAreIndependent) {
  Json original = Json::parse(R"({"list": [1, 2], "map": {"a": 1}})");
  Json copy = original;
  copy["map"]["b"] = 2;
  copy["list"].as_array().push_back(3);
  EXPECT_EQ(original.dump(), R"({"list":[1,2],"map":{"a":1}})");
  EXPECT_EQ(copy.dump(), R"({"list":[1,2,3],"map":{"a":1,"b":2}})");
  original.as_object().erase("list");
  EXPECT_EQ(copy.at("list").size(), 3u);
}

TEST(JsonDump, CompactSortedAndPretty) {
  const Json value = Json::parse(R"({"b": [1, {"y": null, "x": false}], "a": "s", "c": [], "d": {}})");
  EXPECT_EQ(value.dump(), R"({"a":"s","b":[1,{"x":false,"y":null}],"c":[],"d":{}})");
  EXPECT_EQ(value.dump(2),
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
}

TEST(JsonDump, EscapesStrings) {
  const std::string text = std::string("q\" b\\ n\n t\t c\x01 nul") + std::string(1, '\0') + "\xc3\xa9/";
  const std::string dumped = Json(text).dump();
  EXPECT_EQ(dumped, "\"q\\\" b\\\\ n\\n t\\t c\\u0001 nul\\u0000\xc3\xa9/\"");
  EXPECT_EQ(Json::parse(dumped).as_string(), text);
}

TEST(JsonDump, NumbersKeepTheirForm) {
  EXPECT_EQ(Json(16).dump(), "16");
  EXPECT_EQ(Json(16.0).dump(), "16.0");  // a double stays a double across a round trip
  EXPECT_EQ(Json(-0.0).dump(), "-0.0");
  EXPECT_EQ(Json(int64_t{-9007199254740993}).dump(), "-9007199254740993");
  for (const double number : {0.1, 1.0 / 3.0, 1e300, -1e-300, 5e-324, 1.7976931348623157e308, 123456.789}) {
    SCOPED_TRACE(number);
    const Json back = Json::parse(Json(number).dump());
    EXPECT_EQ(back.as_double(), number);  // shortest form, still exact
  }
  EXPECT_THROW(Json(std::nan("")).dump(), JsonError);
  EXPECT_THROW(Json(std::numeric_limits<double>::infinity()).dump(), JsonError);
}

TEST(JsonDump, RoundTrip) {
  const std::string text = R"({
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
    "tie_word_embeddings": false,
    "torch_dtype": "bfloat16",
    "unicode": "\u00fcber \ud83d\ude00",
    "nested": [[[]], [{}], [null, true, -1.25e-3]]
  })";
  const Json value = Json::parse(text);
  for (const int indent : {0, 1, 4}) {
    SCOPED_TRACE(indent);
    const std::string dumped = value.dump(indent);
    const Json again = Json::parse(dumped);
    EXPECT_EQ(again.dump(indent), dumped);
    EXPECT_EQ(again.dump(), value.dump());
  }
  EXPECT_EQ(value.at("rope_scaling").at("factor").dump(), "8.0");
  EXPECT_EQ(value.at("hidden_size").dump(), "4096");
}

}  // namespace
}  // namespace qlora::shard
