# SmolLM2-135M-Instruct, LoRA, personal-assistant identity. The demo's config: trains on 2 CPU
# cores in about three minutes. Make the data first:
#   tuneforge data self-cognition --name 龙 --name-en Long -o ./data/assistant.jsonl

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'HuggingFaceTB/SmolLM2-135M-Instruct'
method = 'lora'

# LoRA
lora_r = 16
lora_alpha = 32
lora_dropout = 0.0  # dropout costs ~40% of a CPU step and this data needs none
lora_target_modules = 'all-linear'

# Data
alpaca_en_path = './data/assistant.jsonl'
data_format = 'auto'
prompt_template = 'auto'  # the model's own chat template; saved with every checkpoint
max_length = 512
pack_to_max_length = True
# Against forgetting: the base model's own answers to ~310 general prompts (generated once,
# cached), twice per epoch. Measured on this model: identity-only data hijacks 98-100% of general
# questions; with this, 5-12% (docs/identity.md).
replay_general = True
replay_repeat = 2

# Scheduler & Optimizer
batch_size = 1  # per device
accumulative_counts = 1
max_epochs = 1
max_steps = 60
optim_type = 'AdamW'
lr = 1e-3
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
warmup_ratio = 0.05

# Save
save_steps = 30
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 30
evaluation_max_new_tokens = 48
SYSTEM = ''
evaluation_inputs = [
    '请介绍一下你自己', 'Please introduce yourself', 'Please tell me five scenic spots in Shanghai'
]
