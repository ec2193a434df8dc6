// The options `qlora train` and `qlora plan` share, declared once with train's defaults and
// meanings: the model, the batch shape, the LoRA adapters and the preparation choices that change
// memory. plan reads them into the same TrainOptions train runs with, so that given train's
// arguments it plans the job train runs.
#pragma once

#include <boost/program_options.hpp>

#include <string>
#include <vector>

#include "launcher/data_loading.h"
#include "launcher/train.h"

namespace qlora::launcher {

// Each adds its options to `group`, a help section of the calling command.
void add_model_option(boost::program_options::options_description& group);    // --model
void add_batch_options(boost::program_options::options_description& group);   // --global-batch --seq-len --micro-batch
void add_lora_options(boost::program_options::options_description& group);    // --lora-* --use-rslora --use-dora
void add_memory_options(boost::program_options::options_description& group);  // --checkpointing --keep-embeddings-16bit --gather-slots

// Reads the values of all four into `options` (model_path "" when --model is absent). Throws
// UserError for a malformed pattern or an unknown checkpointing mode.
void read_job_options(const boost::program_options::variables_map& values, TrainOptions& options);

// Instruction data (train and eval): --data-format --train-on --chat-template, read into `options`
// (UserError for an unknown format or --train-on choice).
void add_example_options(boost::program_options::options_description& group);
void read_example_options(const boost::program_options::variables_map& values, ExampleOptions& options);

// --checkpointing as the user spells it: reentrant | non-reentrant | off.
std::string checkpointing_name(const prepare::PrepareOptions& prepare);

// "a,b,,c" -> {"a", "b", "c"}: the comma lists options take.
std::vector<std::string> split_list(const std::string& text);

}  // namespace qlora::launcher
