"""XTuner 0.x's DPO and ORPO configs are read as tuneforge's preference objectives (issue 21)."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl
from waits import tuneforge

from tuneforge.config import load_config
from tuneforge.config.xtuner import read_xtuner_config
from tuneforge.data.pairs import to_pair
from tuneforge.errors import UserError

# PART 2 to 5 of XTuner's DPO and ORPO configs, the same in the three files below but for the
# model and the dataset, which each head sets (re-typed and trimmed of comments and of the
# hooks tuneforge reports as XTuner runtime).
TAIL = '''
tokenizer = dict(type=AutoTokenizer.from_pretrained,
                 pretrained_model_name_or_path=pretrained_model_name_or_path,
                 trust_remote_code=True, padding_side='right')
MODEL_DICT
train_dataset = DATASET_DICT
train_dataloader = dict(batch_size=batch_size, num_workers=dataloader_num_workers, dataset=train_dataset,
                        sampler=dict(type=DefaultSampler, shuffle=True),
                        collate_fn=dict(type=preference_collate_fn, use_varlen_attn=use_varlen_attn))
optim_wrapper = dict(type=AmpOptimWrapper,
                     optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
                     clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
                     accumulative_counts=accumulative_counts, loss_scale='dynamic', dtype='float16')
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs, end=max_epochs,
         convert_to_iter_based=True)]
train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)
custom_hooks = [dict(type=EvaluateChatHook, tokenizer=tokenizer, every_n_iters=evaluation_freq,
                     evaluation_inputs=evaluation_inputs, system=SYSTEM, prompt_template=prompt_template)]
if use_varlen_attn:
    custom_hooks += [dict(type=VarlenAttnArgsToMessageHubHook)]
default_hooks = dict(checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps,
                                     max_keep_ckpts=save_total_limit))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl'))
visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)
'''

IMPORTS = '''
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer
from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
from xtuner.dataset.preference_dataset import build_preference_dataset, load_jsonl_dataset, orpo_dpo_mix_40k_map_fn
from xtuner.engine.hooks import EvaluateChatHook, VarlenAttnArgsToMessageHubHook
from xtuner.engine.runner import TrainLoop
from xtuner.model.dpo import DPO
from xtuner.model.orpo import ORPO
from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE
'''

RUNTIME = '''
batch_size = 1
accumulative_counts = 16
dataloader_num_workers = 0
max_epochs = 3
optim_type = AdamW
lr = LR
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1
warmup_ratio = 0.03
save_steps = 500
save_total_limit = 2
evaluation_freq = 500
SYSTEM = SYSTEM_TEMPLATE.alpaca
evaluation_inputs = ['Please tell me five scenic spots in Shanghai']
'''

# InternLM/xtuner xtuner/configs/dpo/internlm/internlm2_chat_1_8b_dpo_full.py, PART 1 and its model
# and dataset (re-typed)
DPO_FULL = IMPORTS + '''
pretrained_model_name_or_path = 'internlm/internlm2-chat-1_8b-sft'
use_varlen_attn = False
dpo_loss_type = 'sigmoid'  # One of ['sigmoid', 'hinge', 'ipo', 'kto_pair', 'sppo_hard', 'nca_pair', 'robust']
loss_beta = 0.1
label_smoothing = 0.0
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 2048
''' + RUNTIME.replace("LR", "5e-7") + TAIL.replace("MODEL_DICT", '''
model = dict(type=DPO, use_varlen_attn=use_varlen_attn, loss_type=dpo_loss_type, beta=loss_beta,
             label_smoothing=label_smoothing,
             llm=dict(type=AutoModelForCausalLM.from_pretrained,
                      pretrained_model_name_or_path=pretrained_model_name_or_path, trust_remote_code=True))
''').replace("DATASET_DICT", '''dict(
    type=build_preference_dataset,
    dataset=dict(type=load_dataset, path='mlabonne/orpo-dpo-mix-40k'),
    tokenizer=tokenizer, max_length=max_length, dataset_map_fn=orpo_dpo_mix_40k_map_fn,
    is_dpo=True, is_reward=False, reward_token_id=-1, num_proc=32,
    use_varlen_attn=use_varlen_attn, shuffle_before_pack=True)''')

# InternLM/xtuner xtuner/configs/dpo/internlm/internlm2_chat_1_8b_dpo_full_varlenattn.py (re-typed):
# no beta or label_smoothing (XTuner's defaults, 0.1 and 0), lr 2e-5, pairs packed into rows
DPO_VARLEN = IMPORTS + '''
pretrained_model_name_or_path = 'internlm/internlm2-chat-1_8b-sft'
use_varlen_attn = True
dpo_loss_type = 'sigmoid'  # Should be one of ['sigmoid', 'hinge', 'ipo', 'kto_pair']
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 2048
''' + RUNTIME.replace("LR", "2e-5") + TAIL.replace("MODEL_DICT", '''
model = dict(type=DPO, use_varlen_attn=use_varlen_attn, loss_type=dpo_loss_type,
             llm=dict(type=AutoModelForCausalLM.from_pretrained,
                      pretrained_model_name_or_path=pretrained_model_name_or_path, trust_remote_code=True))
''').replace("DATASET_DICT", '''dict(
    type=build_preference_dataset,
    dataset=dict(type=load_dataset, path='mlabonne/orpo-dpo-mix-40k'),
    tokenizer=tokenizer, max_length=max_length, dataset_map_fn=orpo_dpo_mix_40k_map_fn,
    is_dpo=True, is_reward=False, reward_token_id=-1, num_proc=32, use_varlen_attn=use_varlen_attn,
    max_packed_length=max_length * 2,  # len(chosen) + len(rejected)
    shuffle_before_pack=True, seed=42)''')

# InternLM/xtuner xtuner/configs/orpo/internlm/internlm2_chat_1_8b_orpo_full.py (re-typed): ORPO
# with no beta (XTuner's default 0.1); ORPO_BETA is where a user sets it
ORPO_FULL = IMPORTS + '''
pretrained_model_name_or_path = 'internlm/internlm2-chat-1_8b-sft'
use_varlen_attn = False
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 2048
''' + RUNTIME.replace("LR", "2e-5") + TAIL.replace("MODEL_DICT", '''
model = dict(type=ORPO, use_varlen_attn=use_varlen_attn, ORPO_BETA
             llm=dict(type=AutoModelForCausalLM.from_pretrained,
                      pretrained_model_name_or_path=pretrained_model_name_or_path, trust_remote_code=True))
''').replace("DATASET_DICT", '''dict(
    type=build_preference_dataset,
    dataset=dict(type=load_dataset, path='mlabonne/orpo-dpo-mix-40k'),
    tokenizer=tokenizer, max_length=max_length, dataset_map_fn=orpo_dpo_mix_40k_map_fn,
    is_dpo=True, is_reward=False, reward_token_id=-1, num_proc=32,
    use_varlen_attn=use_varlen_attn, shuffle_before_pack=True, seed=42)''')

# The dataset of InternLM/xtuner xtuner/configs/dpo/internlm/internlm2_chat_1_8b_dpo_full_varlenattn_jsonl_dataset.py
# (re-typed), its paths left for the test to fill in
JSONL_DATASET = '''dict(
    type=build_preference_dataset,
    dataset=dict(type=load_jsonl_dataset, data_files=DATA_FILES),
    tokenizer=tokenizer, max_length=max_length, dataset_map_fn=None,
    is_dpo=True, is_reward=False, reward_token_id=-1, num_proc=32,
    use_varlen_attn=use_varlen_attn, max_packed_length=max_packed_length, shuffle_before_pack=True)'''

# The LoRA/QLoRA part of InternLM/xtuner xtuner/configs/dpo/internlm/internlm2_chat_7b_dpo_qlora_varlenattn.py
QLORA_LLM = '''trust_remote_code=True,
                      quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True, load_in_8bit=False,
                                               bnb_4bit_use_double_quant=True, bnb_4bit_quant_type='nf4')),
             lora=dict(type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.1, bias='none', task_type='CAUSAL_LM'))'''


def _write(tmp_path, text, name="internlm2_chat_1_8b_dpo_full_copy.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_xtuners_dpo_full_config_is_dpo_on_the_hub_dataset(tmp_path):
    settings, report = read_xtuner_config(_write(tmp_path, DPO_FULL))
    assert settings["objective"] == "dpo" and settings["dpo_loss"] == "sigmoid" and settings["beta"] == 0.1
    assert settings["method"] == "full" and settings["lr"] == 5e-7
    assert settings["data_files"] == "mlabonne/orpo-dpo-mix-40k" and "data_format" not in settings
    # one pair a sample, each side cut to 2048 by XTuner: a row of both sides together here
    assert settings["max_length"] == 4096 and settings["pack_to_max_length"] is False
    # XTuner renders pairs with the tokenizer's own chat template; its prompt_template is the eval hook's
    assert "prompt_template" not in settings and "tokenizer's chat template" in report.ignored["prompt_template"]
    assert "tokenizer's chat template" in report.ignored["SYSTEM"]
    assert "max_length per side" in report.ignored
    # the PART 1 names the model dict reads are not reported as unknown settings
    assert not {"dpo_loss_type", "loss_beta", "label_smoothing"} & set(report.ignored)
    cfg = load_config(_write(tmp_path, DPO_FULL))
    assert (cfg.objective, cfg.dpo_loss, cfg.beta, cfg.prompt_template) == ("dpo", "sigmoid", 0.1, "auto")


def test_xtuners_varlen_dpo_config_packs_pairs_into_rows_of_max_packed_length(tmp_path):
    settings, _ = read_xtuner_config(_write(tmp_path, DPO_VARLEN))
    assert settings["objective"] == "dpo" and settings["dpo_loss"] == "sigmoid" and "beta" not in settings
    assert settings["use_varlen_attn"] is True and settings["pack_to_max_length"] is True
    assert settings["max_length"] == 4096 and settings["lr"] == 2e-5
    cfg = load_config(_write(tmp_path, DPO_VARLEN))
    assert cfg.beta is None  # tuneforge's default, 0.1, as XTuner's
    # without max_packed_length XTuner packs into rows of 16384 tokens
    text = DPO_VARLEN.replace("max_packed_length=max_length * 2,", "")
    assert read_xtuner_config(_write(tmp_path, text))[0]["max_length"] == 16384


@pytest.mark.parametrize(("beta", "lam"), [("", None), ("beta=0.25,", 0.25)])
def test_xtuners_orpo_config_is_orpo_with_its_beta_as_orpo_lambda(tmp_path, beta, lam):
    # XTuner's ORPO loss is nll - beta * log sigmoid(log odds ratio): beta is orpo_lambda
    settings, _ = read_xtuner_config(_write(tmp_path, ORPO_FULL.replace("ORPO_BETA", beta)))
    assert settings["objective"] == "orpo" and settings.get("orpo_lambda") == lam and "beta" not in settings
    assert settings["data_files"] == "mlabonne/orpo-dpo-mix-40k" and settings["max_length"] == 4096
    cfg = load_config(_write(tmp_path, ORPO_FULL.replace("ORPO_BETA", beta)))
    assert cfg.objective == "orpo" and cfg.orpo_lambda == lam and cfg.beta is None


def test_a_ref_llm_that_is_the_trained_model_is_the_reference_tuneforge_uses(tmp_path):
    text = DPO_FULL.replace("label_smoothing=label_smoothing,", "label_smoothing=label_smoothing, ref_llm=dict("
                            "type=AutoModelForCausalLM.from_pretrained, "
                            "pretrained_model_name_or_path=pretrained_model_name_or_path),")
    assert read_xtuner_config(_write(tmp_path, text))[0]["objective"] == "dpo"


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_the_other_dpo_losses_tuneforge_trains_are_taken(tmp_path, loss):
    text = DPO_FULL.replace("dpo_loss_type = 'sigmoid'", f"dpo_loss_type = {loss!r}")
    assert read_xtuner_config(_write(tmp_path, text))[0]["dpo_loss"] == loss


def test_a_qlora_dpo_config_maps_its_lora_as_sft_ones_do(tmp_path):
    text = DPO_FULL.replace("from transformers import AutoModelForCausalLM, AutoTokenizer",
                            "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig")
    text = text.replace("trust_remote_code=True))\n", QLORA_LLM + "\n", 1)
    settings, _ = read_xtuner_config(_write(tmp_path, text))
    assert settings["objective"] == "dpo" and settings["method"] == "qlora"
    assert (settings["lora_r"], settings["lora_alpha"], settings["bnb_4bit_quant_type"]) == (64, 16, "nf4")


def test_the_jsonl_dataset_variant_reads_its_files(tmp_path):
    text = DPO_VARLEN.replace("max_length = 2048", "max_length = 2048\nmax_packed_length = max_length * 2")
    text = text.split("train_dataset = ")[0] + "train_dataset = " + JSONL_DATASET.replace(
        "DATA_FILES", "['/your/jsonl/path/here.jsonl', '/your/another/jsonl/path/here.jsonl']") + \
        "\ntrain_dataloader" + text.split("\ntrain_dataloader", 1)[1]
    settings, _ = read_xtuner_config(_write(tmp_path, text))
    assert settings["data_files"] == ["/your/jsonl/path/here.jsonl", "/your/another/jsonl/path/here.jsonl"]
    assert settings["max_length"] == 4096 and settings["objective"] == "dpo"
    folder = text.replace("data_files=['/your/jsonl/path/here.jsonl', '/your/another/jsonl/path/here.jsonl']",
                          "data_dir='/your/jsonl/dir', suffix='.jsonl'")
    assert read_xtuner_config(_write(tmp_path, folder))[0]["data_files"] == "/your/jsonl/dir"


@pytest.mark.parametrize(("edit", "needle"), [
    (("dpo_loss_type = 'sigmoid'", "dpo_loss_type = 'kto_pair'"),
     "model.loss_type (dpo_loss_type) = 'kto_pair' (one of XTuner's kto_pair, sppo_hard, nca_pair, robust): "
     "tuneforge trains the DPO losses 'sigmoid', 'ipo', 'hinge'; set dpo_loss_type to one of them"),
    (("dpo_loss_type = 'sigmoid'", "dpo_loss_type = 'robust'"), "('robust' with label_smoothing = 0 is 'sigmoid')"),
    (("label_smoothing = 0.0", "label_smoothing = 0.1"),
     "model.label_smoothing = 0.1: tuneforge's DPO losses have no label smoothing; set label_smoothing = 0.0"),
    (("is_reward=False", "is_reward=True"), "train_dataset is_reward=True: tuneforge does not train reward models"),
    (("dataset_map_fn=orpo_dpo_mix_40k_map_fn", "dataset_map_fn=intel_orca_dpo_map_fn"),
     "rename each record's 'question' to 'instruction'"),
    (("type=DPO,", "type=SupervisedFinetune,"), "but model is not dict(type=DPO) or dict(type=ORPO)"),
    (("type=DPO,", "type=RewardModel,"), "model = dict(type=RewardModel): tuneforge does not train reward models"),
    (("label_smoothing=label_smoothing,", "label_smoothing=label_smoothing, ref_llm=dict(type=AutoModelForCausalLM."
      "from_pretrained, pretrained_model_name_or_path='internlm/internlm2-chat-7b-sft'),"),
     "model.ref_llm = 'internlm/internlm2-chat-7b-sft': tuneforge's DPO reference is the model before training"),
])
def test_what_tuneforge_cannot_train_is_one_clear_line(tmp_path, edit, needle):
    text = DPO_FULL.replace(*edit).replace("orpo_dpo_mix_40k_map_fn\n", "orpo_dpo_mix_40k_map_fn, intel_orca_dpo_map_fn\n")
    text = text.replace("from xtuner.model.dpo import DPO", "from xtuner.model.dpo import DPO\nfrom xtuner.model import "
                        "RewardModel, SupervisedFinetune")
    with pytest.raises(UserError) as err:
        load_config(_write(tmp_path, text))
    line = str(err.value)
    assert needle in line and "\n" not in line and line.startswith(str(tmp_path)), line


def test_orpo_dpo_mix_records_are_read_as_its_map_function_reads_them():
    # a record shaped as mlabonne/orpo-dpo-mix-40k's (and argilla's ultrafeedback sets): whole
    # conversations, and the question again as a string; orpo_dpo_mix_40k_map_fn keeps chosen's
    # turns but the last as the prompt and each side's last answer
    user = {"role": "user", "content": "What is 2+2?"}
    record = {"source": "x", "prompt": "What is 2+2?", "question": "What is 2+2?",
              "chosen": [user, {"role": "assistant", "content": "4"}],
              "rejected": [user, {"role": "assistant", "content": "5"}]}
    pair = to_pair(json.loads(json.dumps(record)), "f.jsonl:1")
    assert [m.content for m in pair.chosen] == ["What is 2+2?", "4"]
    assert [m.content for m in pair.rejected] == ["What is 2+2?", "5"]
    assert [m.role for m in pair.chosen] == ["user", "assistant"] and pair.chosen[-1].loss


@pytest.mark.parametrize(("config", "objective"), [(DPO_FULL, "dpo"), (ORPO_FULL.replace("ORPO_BETA", "beta=0.2,"), "orpo")])
def test_an_xtuner_preference_config_trains_the_tiny_model(tiny_model_dir, tmp_path, config, objective):
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": f"question {i}"}],
         "chosen": [{"role": "assistant", "content": f"good answer {i}"}],
         "rejected": [{"role": "assistant", "content": f"bad {i} answer"}]} for i in range(4)])
    text = config.replace("'internlm/internlm2-chat-1_8b-sft'", repr(str(tiny_model_dir)))
    text = text.replace("max_length = 2048", "max_length = 64").replace(
        "dataset=dict(type=load_dataset, path='mlabonne/orpo-dpo-mix-40k')",
        f"dataset=dict(type=load_jsonl_dataset, data_files=[{str(data)!r}])").replace(
        "dataset_map_fn=orpo_dpo_mix_40k_map_fn", "dataset_map_fn=None")
    path = _write(tmp_path, text)
    work = tmp_path / "work"
    proc = tuneforge("train", str(path), "--work-dir", str(work), "--no-progress", "--cfg-options", "max_steps=2",
                     "lr=1e-3", "replay_general=False", "identity_guard=False", "evaluation_inputs=[]", seconds=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"objective='{objective}'" in proc.stderr
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 2 and all("margin" in r for r in steps)
    if objective == "dpo":  # DPO's log 2 at step 1: the policy is its reference
        assert "dpo_loss='sigmoid'" in proc.stderr and steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    else:
        assert "orpo_lambda=0.2" in proc.stderr
    assert (work / "iter_2.pth").exists()
