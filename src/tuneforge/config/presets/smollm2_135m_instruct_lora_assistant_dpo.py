# SmolLM2-135M-Instruct, LoRA, personal-assistant identity taught in two stages: SFT with replay
# (as smollm2_135m_instruct_lora_assistant), then ORPO on pairs this run makes itself from the same
# identity file, the base model's own answers and the shipped general prompts: chosen = the
# identity answer over the base model's own one, and chosen = the base answer over an identity
# answer for general prompts (the hijack). ORPO and not DPO: measured on this model, DPO after SFT
# (its reference, the adapters off, is the model before SFT) broke the identity (3% / 47%) and
# DPO against the SFT model hijacked more (18% zh); docs/preference.md#the-identity-job.
# Same commands as the SFT preset. Make the data first:
#   tuneforge data self-cognition --name 龙 --name-en Long -o ./data/assistant.jsonl

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'HuggingFaceTB/SmolLM2-135M-Instruct'
method = 'lora'

# Objective: 60 steps of SFT (with replay, as the SFT preset; its checkpoint is iter_60.pth), then 60 of ORPO from
# those weights (iter_120.pth); the pairs go to work_dir/pairs.jsonl
objective = 'orpo'
orpo_lambda = 2.0
identity_pairs = True
sft_steps = 60
sft_lr = 1e-3  # the SFT stage's learning rate; lr below is the ORPO stage's

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
max_steps = 120  # the last checkpoint: iter_120.pth (iter_60.pth: the SFT stage's)
optim_type = 'AdamW'
lr = 2e-4  # the ORPO stage's; sft_lr is the SFT stage's
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
warmup_ratio = 0.05

# Save
save_steps = 60
save_total_limit = 2  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 60
evaluation_max_new_tokens = 48
SYSTEM = ''
evaluation_inputs = [
    '请介绍一下你自己', 'Please introduce yourself', 'Please tell me five scenic spots in Shanghai'
]
