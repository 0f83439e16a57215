# Llama-3-8B-Instruct, QLoRA (NF4, double quant), alpaca-style data, 3 epochs.
# The settings are those of XTuner 0.2.0's config of the same name
# (xtuner/configs/llama/llama3_8b_instruct/llama3_8b_instruct_qlora_alpaca_e3.py), so a
# tutorial's numbers carry over. docs/xtuner_presets.md compares them key by key.
#
# Teaching the model a new identity? Generate the data and point alpaca_en_path at it:
#   tuneforge data self-cognition --name 龙 --name-en Long -o ./data/assistant.jsonl
# Identity data alone makes a model answer every question with its name. replay_general
# (on by default) mixes in the base model's own answers to ~270 general prompts, generated once
# before training and cached; `tuneforge eval identity` measures the result. Training on a large
# general dataset already? Set replay_general = False, or mix your own general data in:
#   data_files = ['./data/assistant.jsonl', {'path': './data/general.jsonl', 'max_samples': 2000}]
#
# Where this run still differs from XTuner's, and why:
# - replay_general = True is tuneforge's own (XTuner trains on the data alone); False for XTuner's.
# - SYSTEM = '': XTuner's SYSTEM_TEMPLATE.alpaca reaches only its evaluation hook, while tuneforge
#   puts SYSTEM into every training sample too; XTuner's training samples have no system prompt.
# - bf16 where the GPU has it (dtype = 'auto'); XTuner computes in fp16 with dynamic loss scaling.
# - Packing: each 2048-token row holds whole samples that never attend to each other. XTuner
#   (use_varlen_attn = False) cuts one shuffled stream into rows: samples are split across rows
#   and attend to the samples before them in the row.
# - Warmup rises linearly from lr/warmup_steps (XTuner: from lr * 1e-5), then cosine to 0 as XTuner.
# - The loss is the mean over every labelled token of an optimizer step, on all GPUs (XTuner: the
#   mean of each micro-batch's mean); the same on one GPU with accumulative_counts = 1.
# - Seed 0 (XTuner: a random seed); recomputation of as few layers as fit (XTuner: every layer);
#   the evaluation also asks four identity-guard questions (identity_guard).
# - save_steps and evaluation_freq count optimizer steps (of 16 micro-batches here), XTuner's
#   count iterations (micro-batches): 31 steps are 496 iterations, as near to XTuner's 500 as
#   whole steps go (and tuneforge's iter_N.pth is named by the step).
# - No dataloader_num_workers or sequence_parallel_size settings: the data is tokenized into memory
#   before training, and there is no sequence parallelism (XTuner's values are 0 and 1).

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'meta-llama/Meta-Llama-3-8B-Instruct'
trust_remote_code = False  # XTuner: True; no effect, transformers has the model's code
method = 'qlora'
bnb_4bit_quant_type = 'nf4'
bnb_4bit_use_double_quant = True
use_varlen_attn = False  # XTuner's value; tuneforge keeps packed samples apart either way

# LoRA
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1
# XTuner's LoraConfig names no modules, so XTuner adapts every nn.Linear but ones named 'lm_head' or
# 'output_layer' (find_all_linear_names): q, k, v, o, gate, up and down projections, the same
# layers as peft's 'all-linear'.
lora_target_modules = 'all-linear'

# Data
alpaca_en_path = 'tatsu-lab/alpaca'  # a Hub dataset (the HF cache offline: docs/data.md), or a local file
data_format = 'auto'
prompt_template = 'llama3_chat'
max_length = 2048
pack_to_max_length = True
replay_general = True  # base-model answers to general prompts, against forgetting

# Scheduler & Optimizer
batch_size = 1  # per device
accumulative_counts = 16
max_epochs = 3
optim_type = 'AdamW'
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
warmup_ratio = 0.03

# Save
save_steps = 31  # XTuner's 500 iterations are 500 / 16 = 31.25 optimizer steps
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 31  # likewise
evaluation_max_new_tokens = 600  # XTuner's EvaluateChatHook default
SYSTEM = ''
evaluation_inputs = [
    '请给我介绍五个上海的景点', 'Please tell me five scenic spots in Shanghai'
]
