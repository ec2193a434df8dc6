// The config reader's refusals: every field later layers divide by, allocate from or exponentiate is
// checked where the config is read, so a zero or absurd value ends as a message naming the field.
#include <gtest/gtest.h>

#include <string>

#include "common/json.h"
#include "shard/model_config.h"

namespace qlora::shard {
namespace {

// SmolLM2-135M's shape: a config every check accepts.
Json valid_config() {
  return Json{{"model_type", "llama"},       {"hidden_size", 576},         {"intermediate_size", 1536},
              {"num_hidden_layers", 30},     {"num_attention_heads", 9},   {"num_key_value_heads", 3},
              {"vocab_size", 49152},         {"max_position_embeddings", 8192}, {"rms_norm_eps", 1e-5},
              {"rope_theta", 100000.0},      {"tie_word_embeddings", true}};
}

// The message of the FormatError `config` raises, or "" when it is accepted.
std::string refusal(const Json& config) {
  try {
    ModelConfig::from_json(config, "config.json");
  } catch (const FormatError& error) {
    return error.what();
  }
  return "";
}

TEST(ModelConfig, AcceptsARealShapeAndDerivesHeadDim) {
  const ModelConfig config = ModelConfig::from_json(valid_config(), "config.json");
  EXPECT_EQ(config.head_dim, 64);
  EXPECT_EQ(config.num_key_value_heads, 3);
  EXPECT_DOUBLE_EQ(config.rope_theta, 100000.0);
}

TEST(ModelConfig, ZeroKeyValueHeadsIsRefusedNotADivisionByZero) {
  Json config = valid_config();
  config["num_key_value_heads"] = 0;
  EXPECT_EQ(refusal(config), "config.json: num_key_value_heads is 0, outside 1..9");
}

TEST(ModelConfig, RefusesEachCountOutsideItsRangeNamingTheField) {
  const std::pair<const char*, int64_t> cases[] = {
      {"num_key_value_heads", -3},  {"num_key_value_heads", 18},  {"head_dim", 0},
      {"head_dim", 1 << 20},        {"max_position_embeddings", 0}, {"max_position_embeddings", int64_t{1} << 40},
      {"vocab_size", int64_t{1} << 40}, {"hidden_size", int64_t{1} << 40}, {"num_hidden_layers", 100000}};
  for (const auto& [field, value] : cases) {
    Json config = valid_config();
    config[field] = value;
    const std::string message = refusal(config);
    EXPECT_NE(message.find(field), std::string::npos) << field << " = " << value << ": " << message;
    EXPECT_EQ(message.rfind("config.json: ", 0), 0u) << message;
  }
}

TEST(ModelConfig, HeadsMustDivideHiddenUnlessHeadDimIsGiven) {
  Json config = valid_config();
  config["num_attention_heads"] = 7;
  config["num_key_value_heads"] = 7;
  EXPECT_EQ(refusal(config),
            "config.json: hidden_size (576) is not a multiple of num_attention_heads (7) and no head_dim is given");
  config["head_dim"] = 64;
  EXPECT_EQ(refusal(config), "");
}

TEST(ModelConfig, KeyValueHeadsMustDivideHeads) {
  Json config = valid_config();
  config["num_key_value_heads"] = 2;
  EXPECT_EQ(refusal(config), "config.json: num_attention_heads (9) is not a multiple of num_key_value_heads (2)");
}

TEST(ModelConfig, RefusesNonPositiveEpsilonAndRopeTheta) {
  for (const char* field : {"rms_norm_eps", "rope_theta"}) {
    for (double value : {0.0, -1.0}) {
      Json config = valid_config();
      config[field] = value;
      const std::string message = refusal(config);
      EXPECT_NE(message.find(std::string(field) + " must be a positive finite number"), std::string::npos)
          << field << " = " << value << ": " << message;
    }
  }
  Json config = valid_config();
  config["rope_scaling"] = Json{{"rope_type", "llama3"}, {"factor", 0.0}};
  EXPECT_NE(refusal(config).find("rope_scaling.factor must be a positive finite number"), std::string::npos);
}

}  // namespace
}  // namespace qlora::shard
