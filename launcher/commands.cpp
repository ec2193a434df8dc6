// Command-line front ends of convert / train / eval / inspect / plan (Boost.Program_options, grouped --help,
// every train option also settable from an INI file given by --config; the command line wins).
#include "launcher/commands.h"

#include <boost/program_options.hpp>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "cluster/fault_watchdog.h"
#include "cluster/memory.h"
#include "common/format.h"
#include "common/json.h"
#include "common/log.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "launcher/errors.h"
#include "launcher/evaluate.h"
#include "launcher/generate.h"
#include "launcher/job_options.h"
#include "launcher/plan.h"
#include "launcher/report.h"
#include "launcher/threads.h"
#include "launcher/train.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "shard/shard_plan.h"

namespace po = boost::program_options;

namespace qlora::launcher {
namespace {

po::variables_map parse(const std::vector<std::string>& arguments, const po::options_description& options,
                        const std::string& command, const po::positional_options_description* positional = nullptr) {
  po::variables_map values;
  try {
    auto parser = po::command_line_parser(arguments).options(options);
    if (positional != nullptr) parser.positional(*positional);
    po::store(parser.run(), values);
    if (values.count("config")) {
      const std::string path = values["config"].as<std::string>();
      if (!std::filesystem::is_regular_file(path))
        throw UserError("no such config file: " + path, "check --config");
      po::store(po::parse_config_file<char>(path.c_str(), options), values);
    }
    po::notify(values);
  } catch (const po::error& error) {
    throw UserError(std::string(error.what()), "see `qlora " + command + " --help`");
  }
  return values;
}

// Every option's final value (defaults included), for the run folder and the banner.
Json resolved_options(const po::variables_map& values) {
  Json resolved = Json::object();
  for (const auto& [name, value] : values) {
    const auto& held = value.value();
    if (held.type() == typeid(std::string)) resolved[name] = boost::any_cast<std::string>(held);
    else if (held.type() == typeid(int64_t)) resolved[name] = boost::any_cast<int64_t>(held);
    else if (held.type() == typeid(uint64_t)) resolved[name] = boost::any_cast<uint64_t>(held);
    else if (held.type() == typeid(int)) resolved[name] = boost::any_cast<int>(held);
    else if (held.type() == typeid(double)) resolved[name] = boost::any_cast<double>(held);
    else if (held.type() == typeid(bool)) resolved[name] = boost::any_cast<bool>(held);
  }
  return resolved;
}

void print_help(const std::string& synopsis, const po::options_description& options) {
  if (!log::is_root()) return;
  std::cout << synopsis << "\n\n" << options << std::flush;
}

// How a store's block linears are quantized, in words.
std::string quantization_text(const shard::StoreHeader& header) {
  if (header.quant_method == "none") return "none";
  if (header.quant_method == "bnb-8bit") return "int8 (LLM.int8, one fp32 scale per row)";
  return header.quant_type + " (blocksize " + std::to_string(header.blocksize) + ", double quantization " +
         (header.double_quant ? "on" : "off") + ")";
}

}  // namespace

std::string usage() {
  return "usage: qlora <command> [options]\n"
         "\n"
         "commands:\n"
         "  train     fine-tune LoRA adapters on a 4-bit model (any number of ranks; no --model: embedded demo)\n"
         "  plan      predict per-rank memory of a job (and whether it fits) before it runs\n"
         "  convert   write a 4-bit model store (model.h5) from a Hugging Face folder or a synthetic preset\n"
         "  eval      loss and perplexity of a model, with or without a PEFT adapter\n"
         "  generate  text from a model (+ adapter): --prompt, --input FILE.jsonl or --chat\n"
         "  inspect   print a model store and, with --world N, each rank's shard\n"
         "  merge     fold a LoRA adapter into the base model: a Hugging Face folder or a GGUF file\n"
         "  report    PNG plots (loss, learning rate, throughput, memory per rank) and report.md of a run folder\n"
         "\n"
         "`qlora <command> --help` lists a command's options.\n";
}

// ---- convert -------------------------------------------------------------------------------------

int run_convert(const std::vector<std::string>& arguments, CommandContext& context) {
  po::options_description options("qlora convert options");
  options.add_options()
      ("help,h", "show this help")
      ("from", po::value<std::string>(), "Hugging Face model folder (config.json + *.safetensors) or a llama GGUF file (*.gguf)")
      ("synthetic", po::value<std::string>(), "write a random model instead: micro | tiny | small | smollm2-135m | CONFIG.json")
      ("out", po::value<std::string>(), "output model store (model.h5)")
      ("quant-type", po::value<std::string>()->default_value("nf4"),
       "nf4 | fp4 | int8 (LLM.int8 rows) | none (keep the source dtype)")
      ("quant", po::value<std::string>(), "alias of --quant-type")
      ("blocksize", po::value<int64_t>()->default_value(64), "quantization block size (power of two, 32..4096)")
      ("double-quant", po::bool_switch(), "quantize the 4-bit absmax again (bitsandbytes' compress_statistics): 0.516 "
                                          "instead of 0.5625 bytes per parameter at blocksize 64")
      ("keep-unquantized", po::value<std::string>()->default_value(""),
       "comma list of module-name suffixes left in the source dtype, e.g. lm_head,down_proj")
      ("seed", po::value<uint64_t>()->default_value(1234), "random seed of synthetic models");
  const auto values = parse(arguments, options, "convert");
  if (values.count("help")) {
    print_help("usage: qlora convert (--from HF_DIR | --from MODEL.gguf | --synthetic tiny) --out model.h5", options);
    return 0;
  }
  if (!values.count("out")) throw UserError("--out is required", "e.g. qlora convert --synthetic tiny --out model.h5");
  if (values.count("from") == values.count("synthetic"))
    throw UserError("give exactly one of --from and --synthetic", "see `qlora convert --help`");
  shard::ConvertOptions convert_options;
  convert_options.check_tokenizer = data::check_tokenizer;
  if (values.count("quant") && !values["quant-type"].defaulted())
    throw UserError("give only one of --quant and --quant-type");
  const std::string quant_type =
      values.count("quant") ? values["quant"].as<std::string>() : values["quant-type"].as<std::string>();
  if (quant_type != "nf4" && quant_type != "fp4" && quant_type != "int8" && quant_type != "none")
    throw UserError("--quant-type must be nf4, fp4, int8 or none");
  convert_options.quantize = quant_type != "none";
  convert_options.int8 = quant_type == "int8";
  convert_options.quant_type = quant_type == "fp4" ? kernels::QuantType::fp4 : kernels::QuantType::nf4;
  convert_options.double_quant = values["double-quant"].as<bool>();
  if (convert_options.double_quant && (quant_type == "int8" || quant_type == "none"))
    throw UserError("--double-quant applies to nf4 and fp4 only", "drop it, or use --quant-type nf4");
  convert_options.keep_unquantized = values["keep-unquantized"].as<std::string>();
  convert_options.blocksize = values["blocksize"].as<int64_t>();
  convert_options.seed = values["seed"].as<uint64_t>();
  const std::string out = values["out"].as<std::string>();
  const auto parent = std::filesystem::path(out).parent_path();
  if (!parent.empty() && !std::filesystem::is_directory(parent))
    throw UserError("output folder " + parent.string() + " does not exist", "create it first");

  // Conversion is a one-process job; under mpirun the other ranks just wait for it.
  run_collectively(context.communicator, [&] {
    if (context.layout.rank != 0) return;
    const bool terminal = isatty(fileno(stdout));
    auto progress = [terminal](int64_t done, int64_t total, const std::string& name) {
      if (terminal)
        std::printf("\r  %lld/%lld %-60s", static_cast<long long>(done), static_cast<long long>(total), name.c_str());
    };
    const std::string from = values.count("from") ? values["from"].as<std::string>() : "";
    const bool from_gguf = from.size() > 5 && from.compare(from.size() - 5, 5, ".gguf") == 0;
    const auto summary = from_gguf          ? shard::convert_gguf_file(from, out, convert_options, progress)
                         : !from.empty()    ? shard::convert_hf_directory(from, out, convert_options, progress)
                                            : shard::convert_synthetic(values["synthetic"].as<std::string>(), out,
                                                                       convert_options, progress);
    if (terminal) std::printf("\r%90s\r", "");
    const std::string quantization = quantization_text(shard::ModelStore::open(out)->header());
    char line[400];
    std::snprintf(line, sizeof line,
                  "converted %lld tensors, %lld parameters (%lld quantized to %s) -> %s: %s of "
                  "tensor data, %.3f bits/parameter, %.2f s",
                  static_cast<long long>(summary.tensors), static_cast<long long>(summary.parameters),
                  static_cast<long long>(summary.quantized_parameters), quantization.c_str(), out.c_str(),
                  format_bytes(static_cast<double>(summary.store_bytes)).c_str(),
                  8.0 * static_cast<double>(summary.store_bytes) / static_cast<double>(summary.parameters),
                  summary.seconds);
    log::banner(line);
  });
  return 0;
}

// ---- inspect -------------------------------------------------------------------------------------

// "none", or the template's size, first line and whether qlora's interpreter accepts it.
static std::string chat_template_text(const shard::ModelStore& store) {
  const std::string& source = store.chat_template();
  if (source.empty()) return "none";
  std::string first_line = source.substr(0, source.find('\n'));
  if (first_line.size() > 60) first_line = first_line.substr(0, 57) + "...";
  std::string text = std::to_string(source.size()) + " bytes, first line \"" + first_line + "\"";
  try {
    data::ChatTemplate parsed(source, store.path());
    return text + " (qlora renders it)";
  } catch (const data::ChatTemplateError& error) {
    return text + " (qlora cannot render it: " + error.what() + ")";
  }
}

int run_inspect(const std::vector<std::string>& arguments, CommandContext& context) {
  po::options_description options("qlora inspect options");
  options.add_options()
      ("help,h", "show this help")
      ("model", po::value<std::string>(), "model store to describe")
      ("world", po::value<int>()->default_value(0), "also print the shard plan for this many ranks")
      ("verify", po::bool_switch(), "read every tensor and check it against the store's checksums");
  po::positional_options_description positional;
  positional.add("model", 1);
  const auto values = parse(arguments, options, "inspect", &positional);
  if (values.count("help") || !values.count("model")) {
    print_help("usage: qlora inspect model.h5 [--world N] [--verify]", options);
    if (!values.count("help")) throw UserError("no model store given", "usage: qlora inspect model.h5 [--world N]");
    return 0;
  }
  if (context.layout.rank != 0) return 0;
  auto store = shard::ModelStore::open(values["model"].as<std::string>());
  const auto& header = store->header();
  std::ostringstream out;
  out << store->path() << "\n"
      << "  format version   " << header.format_version << "\n"
      << "  architecture     " << header.config.architecture << " (" << header.config.num_hidden_layers
      << " layers, hidden " << header.config.hidden_size << ", intermediate " << header.config.intermediate_size
      << ", heads " << header.config.num_attention_heads << "/" << header.config.num_key_value_heads << ", vocab "
      << header.config.vocab_size << (header.config.tie_word_embeddings ? ", tied" : "") << ")\n"
      << "  parameters       " << header.config.parameter_count() << "\n"
      << "  quantization     " << header.quant_method << " " << quantization_text(header) << ", compute " << header.compute_dtype << "\n"
      << "  unquantized      " << (header.unquantized_modules.empty() ? "-" : header.unquantized_modules)
      << " (besides embeddings, norms and LM head)\n"
      << "  tokenizer        " << header.tokenizer << "\n"
      << "  chat template    " << chat_template_text(*store) << "\n"
      << "  source           " << header.source << " (checksum " << header.source_checksum << ")\n"
      << "  tensor data      " << format_bytes(static_cast<double>(store->data_bytes())) << "\n\n";
  char row[256];
  std::snprintf(row, sizeof row, "  %-48s %-16s %-9s %-6s %12s\n", "tensor", "shape", "dtype", "quant", "bytes");
  out << row;
  for (const auto& tensor : store->tensors()) {
    std::string shape;
    for (size_t i = 0; i < tensor.shape.size(); ++i) shape += (i ? "x" : "") + std::to_string(tensor.shape[i]);
    const int64_t bytes =
        tensor.quantized ? tensor.geometry.stored_bytes() : tensor.numel * kernels::dtype_size(tensor.dtype);
    std::snprintf(row, sizeof row, "  %-48s %-16s %-9s %-6s %12lld\n", tensor.name.c_str(), shape.c_str(),
                  kernels::dtype_name(tensor.dtype).c_str(), tensor.quantized ? header.quant_type.c_str() : "-",
                  static_cast<long long>(bytes));
    out << row;
  }
  if (values["verify"].as<bool>()) {
    if (!store->has_checksums())
      throw UserError(store->path() + " has no tensor checksums (converted by an older qlora): nothing to verify",
                      "convert the model again to add them");
    const auto start = std::chrono::steady_clock::now();
    const uint64_t verified = store->verify_all();
    char line[256];
    std::snprintf(line, sizeof line, "\nverified: %s of tensor data in %zu tensors match their checksums (%.2f s)\n",
                  format_bytes(static_cast<double>(verified)).c_str(), store->tensors().size(),
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    out << line;
  }
  const int world = values["world"].as<int>();
  if (world > 0) {
    out << "\nshard plan for " << world << " ranks (bytes each rank holds: codes + absmax (+ nested absmax) of the "
        << "quantized tensors, its vocabulary rows of the embedding and LM head; the other unquantized tensors are "
           "held whole by every rank):\n";
    check_world_fits(*store, world);
    std::vector<int64_t> totals(world, 0);
    for (const auto& tensor : store->tensors()) {
      const bool vocabulary_rows = tensor.name == "model.embed_tokens.weight" || tensor.name == "lm_head.weight";
      if (!tensor.quantized && !vocabulary_rows) continue;
      std::snprintf(row, sizeof row, "  %-48s", tensor.name.c_str());
      out << row;
      for (int rank = 0; rank < world; ++rank) {
        const int64_t bytes =
            tensor.quantized
                ? shard::shard_bytes(tensor.geometry, shard::shard_range(tensor.geometry, rank, world))
                : shard::vocab_range(header.config.vocab_size, rank, world).rows() * (tensor.numel / tensor.shape[0]) *
                      static_cast<int64_t>(kernels::dtype_size(tensor.dtype));
        totals[rank] += bytes;
        std::snprintf(row, sizeof row, " %10lld", static_cast<long long>(bytes));
        out << row;
      }
      out << "\n";
    }
    std::snprintf(row, sizeof row, "  %-48s", "total per rank");
    out << row;
    for (int rank = 0; rank < world; ++rank) {
      std::snprintf(row, sizeof row, " %10lld", static_cast<long long>(totals[rank]));
      out << row;
    }
    out << "\n";
  }
  std::cout << out.str() << std::flush;
  return 0;
}

// ---- plan ----------------------------------------------------------------------------------------

namespace {

// --accumulation-steps, plan's alternative to --global-batch for jobs sized as micro-batch x
// accumulation: it sets the global batch when --global-batch is not given, and must agree with it
// when it is (checked once the batch is split).
void apply_accumulation_steps(const po::variables_map& values, int world, TrainOptions& job) {
  if (!values.count("accumulation-steps")) return;
  const int64_t accumulation = values["accumulation-steps"].as<int64_t>();
  if (accumulation < 1) throw UserError("--accumulation-steps must be at least 1");
  if (job.micro_batch < 1)
    throw UserError("--accumulation-steps needs --micro-batch",
                    "give --micro-batch M: the global batch is then world x M x accumulation steps");
  if (values["global-batch"].defaulted()) job.global_batch = world * job.micro_batch * accumulation;
}

void check_accumulation_agrees(const po::variables_map& values, const TrainOptions& job, int world) {
  if (!values.count("accumulation-steps")) return;
  const int64_t accumulation = values["accumulation-steps"].as<int64_t>();
  const int64_t derived = split_batch(job, world).micro_steps;
  if (derived != accumulation)
    throw UserError("--accumulation-steps " + std::to_string(accumulation) + " disagrees with --global-batch " +
                        std::to_string(job.global_batch) + " / " + std::to_string(world) + " ranks / --micro-batch " +
                        std::to_string(job.micro_batch) + " = " + std::to_string(derived) + " accumulation steps",
                    "give --global-batch or --accumulation-steps, not both");
}

// The model's shape (and, from a store, its quantization) from a store, a config.json or a preset.
shard::ModelConfig plan_model(const std::string& model, PlanJob& job) {
  const auto extension = std::filesystem::path(model).extension();
  if (is_plan_preset(model)) return plan_preset(model);
  if (extension == ".json") {
    shard::ModelConfig config = shard::read_config_file(model);
    job.source_dtype = config.torch_dtype;
    return config;
  }
  if (extension != ".h5" && !std::filesystem::exists(model)) return plan_preset(model);  // names the known presets
  auto store = shard::ModelStore::open(model);
  const auto& header = store->header();
  job.quant = header.quant_method == "none" ? "none" : header.quant_method == "bnb-8bit" ? "int8" : header.quant_type;
  job.blocksize = header.blocksize;
  job.double_quant = header.double_quant;
  job.keep_unquantized = split_list(header.unquantized_modules);
  job.source_dtype = kernels::dtype_name(store->tensor("model.embed_tokens.weight").dtype);
  return header.config;
}

}  // namespace

int run_plan(const std::vector<std::string>& arguments, CommandContext& context) {
  po::options_description model_options(
      "Model (plan also takes a Hugging Face config.json, or a preset: llama-2-7b, llama-2-70b, llama-3-8b, "
      "llama-3-70b, llama-3.1-405b, mistral-7b)");
  add_model_option(model_options);
  model_options.add_options()
      ("quant", po::value<std::string>(), "nf4 | fp4 | int8 | none (default: the store's, else nf4)")
      ("blocksize", po::value<int64_t>(), "quantization blocksize (default: the store's, else 64)")
      ("double-quant", po::value<bool>(), "double quantization of absmax, 1|0 (default: the store's, else 0)")
      ("keep-unquantized", po::value<std::string>(), "comma list of projections kept in 16 bits, e.g. down_proj "
       "(default: the store's)");
  po::options_description job_options("The job: qlora train's options, defaults and meanings");
  add_batch_options(job_options);
  job_options.add_options()
      ("accumulation-steps", po::value<int64_t>(),
       "instead of --global-batch: micro-batches per step, the global batch being world x micro-batch x this "
       "(needs --micro-batch; must agree with --global-batch if both are given)");
  add_lora_options(job_options);
  add_memory_options(job_options);
  po::options_description device_options("Ranks and devices");
  device_options.add_options()
      ("world", po::value<int>()->default_value(1), "ranks (GPUs) in the job")
      ("gpus-per-node", po::value<int>()->default_value(0), "ranks per node (0: one node)")
      ("device-memory", po::value<std::string>()->default_value("0"), "memory per rank to fit into, e.g. 80GiB (0: no check)")
      ("overhead", po::value<std::string>()->default_value("0"), "per-rank memory outside tensors, e.g. 1GiB for a CUDA context and NCCL buffers")
      ("optimizer", po::value<std::string>()->default_value("adamw"), "adamw | sgd")
      ("compute-dtype", po::value<std::string>()->default_value("fp32"), "activation dtype: fp32 (this CPU runtime) | bf16")
      ("offload-weights", po::value<bool>()->default_value(false)->implicit_value(true),
       "keep the 4-bit shards in host memory (as FSDP CPU offload does); only gathered blocks use the device");
  po::options_description output_options("Output");
  output_options.add_options()
      ("help,h", "show this help")
      ("fit", "search the largest micro-batch for each sequence length that fits --device-memory")
      ("json", "print JSON instead of the table");
  po::options_description all("qlora plan options");
  all.add(model_options).add(job_options).add(device_options).add(output_options);
  po::positional_options_description positional;
  positional.add("model", 1);
  const auto values = parse(arguments, all, "plan", &positional);
  if (values.count("help")) {
    print_help("usage: qlora plan [--model (model.h5 | config.json | llama-3-70b)] --world N --device-memory 80GiB "
               "[qlora train's job options] [options]",
               all);
    return 0;
  }

  // The job exactly as `qlora train` would take these options on `world` ranks.
  TrainOptions train;
  read_job_options(values, train);
  const int world = values["world"].as<int>();
  if (world < 1) throw UserError("--world must be at least 1");
  apply_accumulation_steps(values, world, train);
  validate_options(train, world);
  check_accumulation_agrees(values, train, world);
  const bool embedded_demo = !values.count("model");
  if (embedded_demo) train.model_path = ensure_demo_model(context.communicator, context.layout, 1234);
  if (context.layout.rank != 0) return 0;

  PlanJob job = plan_job_for(train, world);
  const shard::ModelConfig config = plan_model(train.model_path, job);
  if (values.count("quant")) job.quant = values["quant"].as<std::string>();
  if (values.count("blocksize")) job.blocksize = values["blocksize"].as<int64_t>();
  if (values.count("double-quant")) job.double_quant = values["double-quant"].as<bool>();
  if (values.count("keep-unquantized")) job.keep_unquantized = split_list(values["keep-unquantized"].as<std::string>());
  job.gpus_per_node = values["gpus-per-node"].as<int>();
  job.device_memory = parse_byte_size(values["device-memory"].as<std::string>(), "--device-memory");
  job.overhead = parse_byte_size(values["overhead"].as<std::string>(), "--overhead");
  job.optimizer = values["optimizer"].as<std::string>();
  job.compute_dtype = values["compute-dtype"].as<std::string>();
  job.offload_weights = values["offload-weights"].as<bool>();
  if (values.count("fit") && job.device_memory <= 0)
    throw UserError("--fit needs --device-memory", "e.g. --device-memory 80GiB");

  const Plan plan = make_plan(train.model_path, config, job);
  std::vector<FitPoint> fit;
  if (values.count("fit")) fit = fit_search(train.model_path, config, job);
  if (values.count("json")) {
    std::cout << dump_json(plan_json(plan, values.count("fit") ? &fit : nullptr), 2) << std::endl;
  } else {
    std::cout << format_plan(plan);
    if (values.count("fit")) std::cout << "\n" << format_fit(fit, plan);
    std::cout << std::flush;
  }
  return 0;
}

// ---- report --------------------------------------------------------------------------------------

int run_report(const std::vector<std::string>& arguments, CommandContext& context) {
  po::options_description options("qlora report options");
  options.add_options()
      ("help,h", "show this help")
      ("run", po::value<std::string>(), "run folder written by qlora train --out")
      ("out", po::value<std::string>()->default_value(""), "folder for report.md and the PNGs (default: RUN/report)");
  po::positional_options_description positional;
  positional.add("run", 1);
  const auto values = parse(arguments, options, "report", &positional);
  const std::string synopsis = "usage: qlora report runs/NAME [--out DIR]";
  if (values.count("help") || !values.count("run")) {
    print_help(synopsis, options);
    if (!values.count("help")) throw UserError("no run folder given", synopsis);
    return 0;
  }
  const std::string run_dir = values["run"].as<std::string>();
  std::string out = values["out"].as<std::string>();
  if (out.empty()) out = run_dir + "/report";
  // Reading a few files is a one-process job; under mpirun the other ranks just wait for it.
  run_collectively(context.communicator, [&] {
    if (context.layout.rank != 0) return;
    const auto start = std::chrono::steady_clock::now();
    const RunRecord run = load_run(run_dir);
    for (const auto& warning : run.warnings) log::warn(warning);
    const ReportImages images = write_report(run, out);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::string written = "report.md";
    for (const auto* image : {&images.loss, &images.throughput, &images.learning_rate, &images.memory})
      if (!image->empty()) written += ", " + *image;
    char line[400];
    std::snprintf(line, sizeof line, "report: %zu steps (last loss %.4f), %zu evaluations, %zu ranks of memory -> %s/{%s} in %.2f s",
                  run.steps.size(), run.steps.back().loss, run.evaluations.size(), run.memory.size(), out.c_str(),
                  written.c_str(), seconds);
    log::banner(line);
  });
  return 0;
}

// ---- eval ----------------------------------------------------------------------------------------

int run_eval(const std::vector<std::string>& arguments, CommandContext& context) {
  EvalOptions eval;
  po::options_description options("qlora eval options");
  options.add_options()
      ("help,h", "show this help")
      ("model", po::value<std::string>(), "4-bit model store")
      ("adapter", po::value<std::string>()->default_value(""), "PEFT adapter folder (qlora's runs/NAME/final or PEFT's)")
      ("data", po::value<std::string>()->default_value(""), "text file, folder or HDF5 token file (default: the embedded excerpt)")
      ("seq-len", po::value<int64_t>()->default_value(eval.sequence_length), "tokens per window")
      ("windows", po::value<int64_t>()->default_value(eval.max_windows), "consecutive windows evaluated (at most)")
      ("micro-batch", po::value<int64_t>()->default_value(eval.micro_batch), "windows per forward on each rank")
      ("threads", po::value<int>()->default_value(0), "compute threads per rank (0: cores / ranks on the node)");
  add_example_options(options);
  const auto values = parse(arguments, options, "eval");
  if (values.count("help")) {
    print_help("usage: [mpirun -np N] qlora eval --model model.h5 [--adapter runs/a/final] [--data held-out.txt]", options);
    return 0;
  }
  if (!values.count("model")) throw UserError("--model is required", "e.g. qlora eval --model model.h5 --adapter runs/a/final");
  eval.model_path = values["model"].as<std::string>();
  eval.adapter_dir = values["adapter"].as<std::string>();
  eval.data_path = values["data"].as<std::string>();
  eval.sequence_length = values["seq-len"].as<int64_t>();
  eval.max_windows = values["windows"].as<int64_t>();
  eval.micro_batch = values["micro-batch"].as<int64_t>();
  read_example_options(values, eval.examples);
  assign_threads(context.layout, values["threads"].as<int>());
  const auto result = run_evaluation(eval, context.communicator);
  char line[256];
  std::snprintf(line, sizeof line, "eval: loss %.6f  perplexity %.4f  over %lld windows x %lld tokens (%s, %s)",
                result.loss, result.perplexity, static_cast<long long>(result.windows),
                static_cast<long long>(eval.sequence_length), eval.model_path.c_str(),
                eval.adapter_dir.empty() ? "no adapter" : eval.adapter_dir.c_str());
  log::banner(line);
  return 0;
}

// ---- train ---------------------------------------------------------------------------------------

int run_train(const std::vector<std::string>& arguments, CommandContext& context) {
  TrainOptions train;
  po::options_description data_options("Model and data");
  add_model_option(data_options);
  data_options.add_options()
      ("data", po::value<std::string>(), "text file, folder of .txt/.md files, or HDF5 token file; omitted: the embedded Austen excerpt")
      ("eval-data", po::value<std::string>(), "separate evaluation text (default: a held-out tail of --data)")
      ("eval-fraction", po::value<double>()->default_value(train.eval_fraction), "held-out share of --data for evaluation")
      ("out", po::value<std::string>()->default_value(train.out_dir), "run folder: metrics, memory report, adapter");
  add_example_options(data_options);
  po::options_description schedule_options("Schedule");
  schedule_options.add_options()
      ("steps", po::value<int64_t>()->default_value(train.steps), "optimizer steps");
  add_batch_options(schedule_options);
  schedule_options.add_options()
      ("lr", po::value<double>()->default_value(train.learning_rate), "AdamW peak learning rate")
      ("lr-schedule", po::value<std::string>()->default_value(train.lr_schedule), "constant | cosine")
      ("warmup-steps", po::value<int64_t>()->default_value(0), "linear warmup steps")
      ("weight-decay", po::value<double>()->default_value(train.weight_decay), "AdamW weight decay")
      ("max-grad-norm", po::value<double>()->default_value(train.max_grad_norm), "global-norm clipping (0: off)")
      ("seed", po::value<uint64_t>()->default_value(train.seed), "seed of adapters, data order and dropout")
      ("eval-every", po::value<int64_t>()->default_value(0), "evaluate every K steps (0: only at the end)")
      ("eval-batches", po::value<int64_t>()->default_value(train.eval_batches), "evaluation windows, in global batches")
      ("save-every", po::value<int64_t>()->default_value(0), "checkpoint every K steps (0: only the final one)")
      ("keep-checkpoints", po::value<int>()->default_value(train.keep_checkpoints), "newest checkpoints kept (0: all)")
      ("resume", po::value<std::string>()->default_value(""), "auto (newest checkpoint under --out, if any) or a checkpoint folder")
      ("resume-mismatch", po::value<std::string>()->default_value(train.resume_mismatch),
       "refuse | warn: resuming a checkpoint of another model, data, LoRA shape or seed")
      ("overwrite", po::bool_switch(), "replace another run found in --out (removes its checkpoints, final adapter, metrics)")
      ("max-bad-steps", po::value<int>()->default_value(train.max_bad_steps),
       "consecutive non-finite steps skipped before the run stops");
  po::options_description lora_options("LoRA");
  add_lora_options(lora_options);
  po::options_description memory_options("Preparation, memory and parallelism");
  add_memory_options(memory_options);
  memory_options.add_options()
      ("prefetch", po::value<bool>()->default_value(true), "gather the next block while this one computes (1|0)")
      ("bucket-mb", po::value<double>()->default_value(train.bucket_mb), "gradient all-reduce fusion bucket size")
      ("overlap-reduce", po::value<bool>()->default_value(true), "reduce buckets during backward (1|0)")
      ("check-every", po::value<int64_t>()->default_value(train.check_every),
       "compare adapter checksums across ranks every K steps (0: never)")
      ("threads", po::value<int>()->default_value(0), "compute threads per rank (0: cores / ranks on the node)")
      ("backend", po::value<std::string>()->default_value("auto"), "collectives: auto | mpi | nccl")
      ("collective-timeout", po::value<double>()->default_value(cluster::kDefaultCollectiveTimeoutSeconds),
       "seconds one wait for the other ranks may take before the job is aborted (0: no bound)");
  po::options_description general("General");
  general.add_options()("help,h", "show this help")
      ("progress", po::value<std::string>()->default_value("auto"), "auto | bar | lines")("config", po::value<std::string>(), "INI file with any of these options");
  po::options_description all("qlora train options");
  all.add(data_options).add(schedule_options).add(lora_options).add(memory_options).add(general);
  const auto values = parse(arguments, all, "train");
  if (values.count("help")) {
    print_help("usage: [mpirun -np N | srun] qlora train [--model model.h5 --data corpus/] [options]", all);
    return 0;
  }

  train.data_path = values.count("data") ? values["data"].as<std::string>() : "";
  train.eval_data_path = values.count("eval-data") ? values["eval-data"].as<std::string>() : "";
  train.eval_fraction = values["eval-fraction"].as<double>();
  train.lr_schedule = values["lr-schedule"].as<std::string>();
  train.warmup_steps = values["warmup-steps"].as<int64_t>();
  train.eval_every = values["eval-every"].as<int64_t>();
  train.eval_batches = values["eval-batches"].as<int64_t>();
  train.save_every = values["save-every"].as<int64_t>();
  train.keep_checkpoints = values["keep-checkpoints"].as<int>();
  train.resume = values["resume"].as<std::string>();
  train.resume_mismatch = values["resume-mismatch"].as<std::string>();
  train.overwrite = values["overwrite"].as<bool>();
  train.max_bad_steps = values["max-bad-steps"].as<int>();
  train.progress = values["progress"].as<std::string>();
  if (!train.resume.empty() && train.resume != "auto" && !std::filesystem::is_directory(train.resume))
    throw UserError("--resume " + train.resume + ": no such checkpoint folder",
                    "use --resume auto or a runs/NAME/checkpoints/step-K folder");
  read_job_options(values, train);
  read_example_options(values, train.examples);
  train.out_dir = values["out"].as<std::string>();
  train.steps = values["steps"].as<int64_t>();
  train.learning_rate = values["lr"].as<double>();
  train.weight_decay = values["weight-decay"].as<double>();
  train.max_grad_norm = values["max-grad-norm"].as<double>();
  train.seed = values["seed"].as<uint64_t>();
  train.prefetch = values["prefetch"].as<bool>();
  train.bucket_mb = values["bucket-mb"].as<double>();
  train.overlap_reduce = values["overlap-reduce"].as<bool>();
  train.check_every = values["check-every"].as<int64_t>();
  train.threads = values["threads"].as<int>();
  const std::string backend = values["backend"].as<std::string>();
  if (backend != "auto" && backend != "mpi" && backend != "nccl")
    throw UserError("--backend must be auto, mpi or nccl");
  if (backend == "nccl")
    throw UserError("--backend nccl needs CUDA tensors, and this build trains on the CPU",
                    "use --backend mpi (or auto); the NCCL backend is compiled for GPU builds");
  const double collective_timeout = values["collective-timeout"].as<double>();
  if (!std::isfinite(collective_timeout) || collective_timeout < 0)
    throw UserError("--collective-timeout must be 0 (no bound) or a positive number of seconds",
                    "e.g. --collective-timeout 600");
  context.communicator.set_collective_timeout(collective_timeout);
  validate_options(train, context.layout.world);

  const bool embedded_demo = !values.count("model");
  if (embedded_demo) train.model_path = ensure_demo_model(context.communicator, context.layout, 1234);
  if (std::filesystem::exists(train.out_dir) && !std::filesystem::is_directory(train.out_dir))
    throw UserError("--out " + train.out_dir + " exists and is not a folder");

  const int threads = assign_threads(context.layout, train.threads);
  const auto nodes = cluster::describe_nodes(context.comm, context.layout);
  std::ostringstream banner;
  banner << "qlora train: " << context.layout.world << " rank" << (context.layout.world > 1 ? "s" : "") << " ("
         << context.layout.launcher << ", backend " << context.communicator.backend() << "), " << threads
         << " thread" << (threads > 1 ? "s" : "") << " per rank\n";
  for (const auto& line : nodes) banner << "  " << line << "\n";
  banner << "  model " << (embedded_demo ? "embedded synthetic tiny (" + train.model_path + ")" : train.model_path)
         << "\n  data  " << (train.data_path.empty() ? "embedded Austen excerpt (Pride and Prejudice, ch. 1-6)" : train.data_path)
         << "\n  steps " << train.steps << ", global batch " << train.global_batch << " x " << train.sequence_length
         << " tokens, lr " << train.learning_rate << ", checkpointing " << checkpointing_name(train.prepare) << ", out "
         << train.out_dir;
  train.banner = banner.str();
  train.resolved_config = dump_json(resolved_options(values), 2) + "\n";
  // SLURM's --signal (and a user's kill) ask for a checkpoint before the job ends.
  std::signal(SIGTERM, request_stop);
  std::signal(SIGUSR1, request_stop);
  run_training(train, context.communicator);
  return 0;
}

// ---- generate ------------------------------------------------------------------------------------

int run_generate(const std::vector<std::string>& arguments, CommandContext& context) {
  GenerateOptions generate;
  po::options_description options("qlora generate options");
  options.add_options()
      ("help,h", "show this help")
      ("model", po::value<std::string>(), "model store (model.h5)")
      ("adapter", po::value<std::string>()->default_value(""), "PEFT adapter folder (qlora's or PEFT's)")
      ("prompt", po::value<std::string>(), "raw text to continue, streamed to stdout")
      ("input", po::value<std::string>(), "JSONL file: each line {\"prompt\": TEXT} or {\"messages\": [...]}; prints "
                                          "one JSON line each with \"completion\" added")
      ("chat", po::bool_switch(), "interactive chat on stdin through the model's chat template")
      ("chat-template", po::value<std::string>()->default_value(""), "Jinja chat template file (default: the model's)")
      ("add-bos", po::bool_switch(), "prepend the tokenizer's bos token to raw prompts")
      ("max-new-tokens", po::value<int64_t>()->default_value(generate.max_new_tokens), "most tokens generated per answer")
      ("temperature", po::value<double>()->default_value(generate.sampling.temperature), "0: greedy")
      ("top-p", po::value<double>()->default_value(generate.sampling.top_p), "nucleus sampling (1: off)")
      ("seed", po::value<uint64_t>()->default_value(0), "sampling seed")
      ("threads", po::value<int>()->default_value(0), "compute threads per rank (0: the node's cores / its ranks)");
  const auto values = parse(arguments, options, "generate");
  if (values.count("help")) {
    print_help("usage: [mpirun -np N] qlora generate --model model.h5 [--adapter DIR] (--prompt TEXT | --chat | "
               "--input FILE.jsonl)",
               options);
    return 0;
  }
  if (!values.count("model"))
    throw UserError("--model is required", "e.g. qlora generate --model model.h5 --prompt \"Once upon a time\"");
  const int modes = static_cast<int>(values.count("prompt")) + static_cast<int>(values.count("input")) +
                    (values["chat"].as<bool>() ? 1 : 0);
  if (modes != 1) throw UserError("give exactly one of --prompt, --input and --chat", "see `qlora generate --help`");
  generate.model_path = values["model"].as<std::string>();
  generate.adapter_dir = values["adapter"].as<std::string>();
  if (values.count("prompt")) generate.prompt = values["prompt"].as<std::string>();
  if (values.count("input")) generate.input_path = values["input"].as<std::string>();
  generate.chat = values["chat"].as<bool>();
  generate.chat_template_path = values["chat-template"].as<std::string>();
  generate.add_bos = values["add-bos"].as<bool>();
  generate.max_new_tokens = values["max-new-tokens"].as<int64_t>();
  generate.sampling.temperature = values["temperature"].as<double>();
  generate.sampling.top_p = values["top-p"].as<double>();
  generate.sampling.seed = values["seed"].as<uint64_t>();
  assign_threads(context.layout, values["threads"].as<int>());
  return run_generation(generate, context.communicator);
}

}  // namespace qlora::launcher
