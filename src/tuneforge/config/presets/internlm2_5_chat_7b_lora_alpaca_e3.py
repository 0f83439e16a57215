# InternLM2.5-7B-Chat, LoRA (bf16 base), alpaca-style data, 3 epochs.
# XTuner 0.2.0 has no config of this name: it trains InternLM2.5-7B-Chat on alpaca with QLoRA
# only (xtuner/configs/internlm/internlm2_5_chat_7b/internlm2_5_chat_7b_qlora_alpaca_e3.py), and
# these are that config's settings without the 4-bit quantization. docs/xtuner_presets.md
# compares them key by key.
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
# - bf16 where the GPU has it (dtype = 'auto'); XTuner's config, unquantized, loads the model in
#   fp16 and computes in fp16 with dynamic loss scaling.
# - Packing: each 2048-token row holds whole samples that never attend to each other. XTuner
#   (use_varlen_attn = False) cuts one shuffled stream into rows: samples are split across rows
#   and attend to the samples before them in the row.
# - InternLM2's fused wqkv is loaded as q_proj, k_proj, v_proj, each with its own rank-64 adapter
#   (XTuner: one adapter on wqkv, whose A matrix q, k and v share).
# - Warmup rises linearly from lr/warmup_steps (XTuner: from lr * 1e-5), then cosine to 0 as XTuner.
# - The loss is the mean over every labelled token of an optimizer step, on all GPUs (XTuner: the
#   mean of each micro-batch's mean); the same on one GPU with accumulative_counts = 1.
# - Seed 0 (XTuner: a random seed); recomputation of as few layers as fit (XTuner: every layer);
#   the evaluation also asks four identity-guard questions (identity_guard).
# - No dataloader_num_workers or sequence_parallel_size settings: the data is tokenized into memory
#   before training, and there is no sequence parallelism (XTuner's values are 0 and 1).

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'internlm/internlm2_5-7b-chat'
trust_remote_code = True
method = 'lora'
use_varlen_attn = False  # XTuner's value; tuneforge keeps packed samples apart either way

# LoRA
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1
# XTuner's LoraConfig names no modules, so XTuner adapts every nn.Linear but ones named 'lm_head' or
# 'output_layer' (find_all_linear_names): for InternLM2, wqkv, wo, w1, w2, w3 and the output head,
# which InternLM2 names 'output'. The same layers by their Llama names (peft's 'all-linear' would
# leave the head out). An adapter on the head turns the fast path's chunked cross-entropy off.
lora_target_modules = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj',
                       'lm_head']

# Data
alpaca_en_path = 'tatsu-lab/alpaca'  # a Hub dataset (the HF cache offline: docs/data.md), or a local file
data_format = 'auto'
prompt_template = 'internlm2_chat'
max_length = 2048
pack_to_max_length = True
replay_general = True  # base-model answers to general prompts, against forgetting

# Scheduler & Optimizer
batch_size = 1  # per device
accumulative_counts = 1
max_epochs = 3
optim_type = 'AdamW'
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
warmup_ratio = 0.03

# Save
save_steps = 500
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
evaluation_max_new_tokens = 600  # XTuner's EvaluateChatHook default
SYSTEM = ''
evaluation_inputs = [
    '请给我介绍五个上海的景点', 'Please tell me five scenic spots in Shanghai'
]
