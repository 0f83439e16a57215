# InternLM2.5-7B-Chat, QLoRA (NF4, double quant), alpaca-style data, 3 epochs.
# The settings are XTuner's for its config of the same name, so a tutorial's numbers carry over.
#
# Teaching the model a new identity? Generate the data and point alpaca_en_path at it:
#   tuneforge data self-cognition --name 龙 --name-en Long -o ./data/assistant.jsonl
# Identity data alone makes a model answer every question with its name. replay_general
# (on by default) mixes in the base model's own answers to ~270 general prompts, generated once
# before training and cached; `tuneforge eval identity` measures the result. Training on a large
# general dataset already? Set replay_general = False, or mix your own general data in:
#   data_files = ['./data/assistant.jsonl', {'path': './data/general.jsonl', 'max_samples': 2000}]

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'internlm/internlm2_5-7b-chat'
trust_remote_code = True
method = 'qlora'
bnb_4bit_quant_type = 'nf4'
bnb_4bit_use_double_quant = True

# LoRA
lora_r = 64
lora_alpha = 16
lora_dropout = 0.1
lora_target_modules = 'all-linear'

# Data
alpaca_en_path = 'tatsu-lab/alpaca'
data_format = 'auto'
prompt_template = 'internlm2_chat'
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
save_steps = 500
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = ''
evaluation_inputs = [
    '请给我介绍五个上海的景点', 'Please tell me five scenic spots in Shanghai'
]
