"""An XTuner 0.x config, as a tutorial user holds it, is read without xtuner or mmengine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_cache import alpaca, hub_snapshot, offline_env
from waits import tuneforge

from tuneforge.config import load_config
from tuneforge.config.xtuner import is_xtuner_config, read_xtuner_config
from tuneforge.errors import UserError

# The tutorial's internlm2_chat_1_8b_qlora_alpaca_e3_copy.py after its edits (model path,
# data_files, evaluation_inputs), trimmed of comments.
XTUNER_CONFIG = '''
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import (AutoModelForCausalLM, AutoTokenizer,
                          BitsAndBytesConfig)

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
from xtuner.engine.hooks import (DatasetInfoHook, EvaluateChatHook,
                                 VarlenAttnArgsToMessageHubHook)
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.parallel.sequence import SequenceParallelSampler
from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = MODEL
use_varlen_attn = False

# Data
alpaca_en_path = DATA
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 256
pack_to_max_length = True

# parallel
sequence_parallel_size = 1

# Scheduler & Optimizer
batch_size = 1  # per_device
accumulative_counts = 2
accumulative_counts *= sequence_parallel_size
dataloader_num_workers = 0
max_epochs = 3
optim_type = AdamW
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # grad clip
warmup_ratio = 0.03

# Save
save_steps = 300
save_total_limit = 3  # Maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 300
SYSTEM = SYSTEM_TEMPLATE.alpaca
evaluation_inputs = ['请介绍一下你自己', 'Please introduce yourself']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
        torch_dtype=torch.float16,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.float16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type='nf4')),
    lora=dict(
        type=LoraConfig,
        r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        bias='none',
        task_type='CAUSAL_LM'))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
alpaca_en = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path='json', data_files=dict(train=alpaca_en_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=None,
    template_map_fn=dict(
        type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=use_varlen_attn)

sampler = SequenceParallelSampler \\
    if sequence_parallel_size > 1 else DefaultSampler
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=alpaca_en,
    sampler=dict(type=sampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(
        type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='float16')

param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True)
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template)
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)
'''


def _write(tmp_path, model, data, text=XTUNER_CONFIG):
    path = tmp_path / "internlm2_chat_1_8b_qlora_alpaca_e3_copy.py"
    path.write_text(text.replace("MODEL", repr(str(model))).replace("DATA", repr(str(data))))
    return path


def test_the_settings_xtuner_would_use_are_taken(tmp_path, identity_data):
    path = _write(tmp_path, "/models/internlm2-chat-1_8b", identity_data)
    assert is_xtuner_config(path.read_text())
    settings, report = read_xtuner_config(path)
    assert settings["method"] == "qlora" and settings["lora_r"] == 64 and settings["lora_alpha"] == 16
    assert settings["lora_dropout"] == 0.1 and settings["bnb_4bit_quant_type"] == "nf4"
    assert settings["data_files"] == str(identity_data) and settings["data_format"] == "auto"
    assert settings["prompt_template"] == "internlm2_chat" and settings["max_length"] == 256
    assert settings["accumulative_counts"] == 2 and settings["lr"] == 2e-4 and settings["max_norm"] == 1
    assert settings["warmup_ratio"] == pytest.approx(0.03) and settings["max_epochs"] == 3
    assert settings["save_steps"] == 300 and settings["save_total_limit"] == 3
    assert settings["evaluation_inputs"] == ["请介绍一下你自己", "Please introduce yourself"]
    assert "SYSTEM" in report.ignored and "torch_dtype" in report.ignored and "env_cfg" in report.ignored
    cfg = load_config(path)
    assert cfg.method == "qlora" and cfg.data_files == str(identity_data)
    # no target_modules: XTuner adapts every linear layer but lm_head/output_layer, so InternLM2's
    # head ('output') too; loaded as Llama that is lm_head, which peft's 'all-linear' leaves out
    assert "lm_head" in settings["lora_target_modules"] and "q_proj" in settings["lora_target_modules"]


def test_without_target_modules_other_models_keep_all_linear(tmp_path, identity_data):
    settings, _ = read_xtuner_config(_write(tmp_path, "/models/Meta-Llama-3-8B-Instruct", identity_data))
    assert "lora_target_modules" not in settings


@pytest.mark.parametrize(("switch", "variant"), [("use_dora=True", "dora"), ("use_rslora=True", "rslora"),
                                               ("init_lora_weights='olora'", "olora")])
def test_peft_lora_switches_become_the_lora_variant(tmp_path, identity_data, switch, variant):
    text = XTUNER_CONFIG.replace("task_type='CAUSAL_LM'))", f"task_type='CAUSAL_LM', {switch}))")
    settings, _ = read_xtuner_config(_write(tmp_path, "/models/Meta-Llama-3-8B-Instruct", identity_data, text))
    assert settings["lora_variant"] == variant


@pytest.mark.parametrize(("edit", "needle"), [
    (("task_type='CAUSAL_LM'))", "task_type='CAUSAL_LM', use_dora=True, use_rslora=True))"),
     "lora sets dora and rslora; tuneforge trains one lora_variant at a time"),
    (("dataset_map_fn=None", "dataset_map_fn=lambda example: example"), "only XTuner's own map functions"),
    (("sequence_parallel_size = 1", "sequence_parallel_size = 2"), "sequence parallelism is not supported"),
    (("optim_type = AdamW", "optim_type = SGD"), "AdamW or AdamW8bit"),
])
def test_what_cannot_be_mapped_is_refused_clearly(tmp_path, identity_data, edit, needle):
    text = XTUNER_CONFIG.replace(*edit)
    text = text.replace("from torch.optim import AdamW", "from torch.optim import SGD, AdamW")
    with pytest.raises(UserError, match=needle):
        load_config(_write(tmp_path, "m", identity_data, text))


@pytest.mark.slow
def test_an_xtuner_config_trains_the_bundled_model(bundled_path, identity_data, tmp_path):
    path = _write(tmp_path, bundled_path, identity_data)
    work = tmp_path / "work"
    # 3 QLoRA steps of the bundled model took 320 s in a loaded `make test`; the limit scales (tests/waits.py)
    proc = tuneforge("train", str(path), "--work-dir", str(work), "--no-progress", "--cfg-options", "max_steps=3",
                     "replay_general=False", "identity_guard=False", "evaluation_inputs=[]", seconds=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "XTuner config: took" in proc.stderr and "ignored" in proc.stderr
    assert (work / "iter_3.pth").is_file()
    adapter = tmp_path / "adapter"
    conv = tuneforge("convert", "pth_to_hf", str(path), str(work / "iter_3.pth"), str(adapter), seconds=300)
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert (adapter / "adapter_config.json").is_file()


def _concat(text: str, second_fn: str, style: str) -> str:
    """The config with a second dataset of alpaca_zh records, both under a ConcatDataset (as
    XTuner's *_alpaca_enzh_* configs do), written in STYLE: 'list' (datasets=[...], XTuner's
    current form) or 'dict' (datasets_cfg=dict(...), its earlier one)."""
    second = ("alpaca_zh = dict(\n    type=process_hf_dataset,\n"
              "    dataset=dict(type=load_dataset, path='json', data_files=dict(train='zh.json')),\n"
              f"    tokenizer=tokenizer,\n    max_length=max_length,\n    dataset_map_fn={second_fn},\n"
              "    pack_to_max_length=pack_to_max_length)\n\n")
    concat = ("train_dataset = dict(type=ConcatDataset, datasets=[alpaca_en, alpaca_zh])\n"
              if style == "list" else
              "train_dataset = dict(type=ConcatDataset, datasets_cfg=dict(alpaca_en=alpaca_en, alpaca_zh=alpaca_zh))\n")
    text = text.replace("sampler = SequenceParallelSampler", second + concat + "sampler = SequenceParallelSampler")
    text = text.replace("    dataset=alpaca_en,\n    sampler=", "    dataset=train_dataset,\n    sampler=")
    text = text.replace("from xtuner.dataset.map_fns import alpaca_map_fn,",
                        f"from xtuner.dataset import ConcatDataset\nfrom xtuner.dataset.map_fns import alpaca_map_fn, {second_fn},")
    return text.replace("dataset_map_fn=None,\n    template_map_fn", "dataset_map_fn=alpaca_map_fn,\n    template_map_fn")


@pytest.mark.parametrize("style", ["list", "dict"])
def test_a_concat_dataset_becomes_one_data_files_entry_per_dataset_with_its_own_format(tmp_path, identity_data, style):
    path = _write(tmp_path, "m", identity_data, _concat(XTUNER_CONFIG, "alpaca_zh_map_fn", style))
    settings, _ = read_xtuner_config(path)
    assert settings["data_files"] == [{"path": str(identity_data), "format": "alpaca_map_fn"},
                                      {"path": "zh.json", "format": "alpaca_zh_map_fn"}]
    assert "data_format" not in settings and "alpaca_en_path" not in settings
    cfg = load_config(path)
    assert [(s.path, s.format) for s in cfg.data_sources] == [(str(identity_data), "alpaca_map_fn"),
                                                              ("zh.json", "alpaca_zh_map_fn")]


@pytest.mark.parametrize(("visualizer", "report_to"), [
    # XTuner's documented form, and mmengine's with the backends by name and a local one
    ("dict(type=Visualizer, vis_backends=[dict(type=TensorboardVisBackend)])", ["tensorboard"]),
    ("dict(type=Visualizer, vis_backends=[dict(type=WandbVisBackend, init_kwargs=dict(project='p')), "
     "dict(type=TensorboardVisBackend)])", ["wandb", "tensorboard"]),
    ("dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend'), dict(type='MLflowVisBackend'), "
     "dict(type=SwanlabVisBackend)])", ["mlflow", "swanlab"]),
    ("dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])", []),
])
def test_the_visualizer_backends_become_report_to(tmp_path, identity_data, visualizer, report_to):
    text = XTUNER_CONFIG.replace("visualizer = None", (
        "from mmengine.visualization import Visualizer, TensorboardVisBackend, WandbVisBackend\n"
        "from swanlab.integration.mmengine import SwanlabVisBackend\n"
        f"visualizer = {visualizer}"))
    settings, report = read_xtuner_config(_write(tmp_path, "m", identity_data, text))
    assert settings["report_to"] == report_to and "visualizer" not in report.ignored
    assert load_config(_write(tmp_path, "m", identity_data, text)).report_to == report_to
    if "init_kwargs" in visualizer:
        assert "WandbVisBackend init_kwargs" in report.ignored


def test_no_visualizer_keeps_the_default_trackers_and_another_backend_is_reported(tmp_path, identity_data):
    settings, report = read_xtuner_config(_write(tmp_path, "m", identity_data))  # visualizer = None
    assert "report_to" not in settings and "default" in report.ignored["visualizer"]
    text = XTUNER_CONFIG.replace("visualizer = None", "visualizer = dict(type='Visualizer', "
                                 "vis_backends=[dict(type='ClearMLVisBackend')])")
    settings, report = read_xtuner_config(_write(tmp_path, "m", identity_data, text))
    assert settings["report_to"] == [] and "ClearMLVisBackend" in "".join(report.ignored)


def test_a_scheduler_given_by_its_name_as_a_string_is_read(tmp_path, identity_data):
    text = XTUNER_CONFIG.replace("type=LinearLR,", "type='LinearLR',")
    settings, _ = read_xtuner_config(_write(tmp_path, "m", identity_data, text))
    assert settings["warmup_ratio"] == pytest.approx(0.03)


def test_the_summary_shows_the_values_in_force_after_cfg_options(tmp_path, identity_data, capsys):
    cfg = load_config(_write(tmp_path, "m", identity_data), {"max_length": 512, "lr": 1e-5})
    said = capsys.readouterr().err
    assert cfg.max_length == 512
    assert "max_length=512 (--cfg-options)" in said and "lr=1e-05 (--cfg-options)" in said
    assert "max_length=256" not in said and "accumulative_counts=2" in said


def test_a_concat_of_alpaca_and_alpaca_zh_trains_each_file_as_xtuner_maps_it(tmp_path, tokenizer):
    """The enzh tutorial's shape: English alpaca records in a .json list, Chinese ones (the *_zh
    fields) as JSON Lines in a .json file; each trained as XTuner's own map function makes it."""
    from tuneforge.data.formats import load_samples
    from tuneforge.data.inspect import marked_render
    from tuneforge.data.templates import get_template

    en = tmp_path / "en.json"
    en.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "Blue."},
                              {"instruction": "Skip me", "input": "", "output": "<nooutput>"}]))
    zh = tmp_path / "zh.json"
    zh.write_text(json.dumps({"instruction_zh": "说一种颜色。", "input_zh": "天空", "output_zh": "蓝色。"},
                             ensure_ascii=False) + "\n")
    text = _concat(XTUNER_CONFIG, "alpaca_zh_map_fn", "list").replace("'zh.json'", repr(str(zh)))
    cfg = load_config(_write(tmp_path, "m", en, text), {"SYSTEM": ""})
    template = get_template(cfg.prompt_template, tokenizer)
    rendered = [marked_render(template, tokenizer, cfg, s)
                for src in cfg.data_sources for s in load_samples(Path(src.path), src.format)]
    bos = tokenizer.bos_token  # internlm2_chat opens with the BOS token (this tokenizer's is <|im_start|>)
    assert rendered == [
        # alpaca_map_fn always joins instruction and input: an empty input leaves a newline;
        # its <nooutput> record is dropped, as XTuner drops it
        f"{bos}<|im_start|>user\nName a colour.\n<|im_end|>\n<|im_start|>assistant\n⟦Blue.<|im_end|>⟧\n",
        f"{bos}<|im_start|>user\n说一种颜色。\n天空<|im_end|>\n<|im_start|>assistant\n⟦蓝色。<|im_end|>⟧\n",
    ]


def test_a_map_function_that_is_not_chat_sft_stops_before_the_first_record(tmp_path, tokenizer, identity_data):
    from tuneforge.data.dataset import build_rows
    from tuneforge.data.templates import get_template

    for fn, needle in (("llava_map_fn", "image"), ("pretrain_map_fn", "raw text"), ("nope_map_fn", "not a map function")):
        text = XTUNER_CONFIG.replace("dataset_map_fn=None", f"dataset_map_fn={fn}").replace(
            "import alpaca_map_fn,", f"import alpaca_map_fn, {fn},")
        cfg = load_config(_write(tmp_path, "m", identity_data, text), {"skip_bad_lines": True})
        with pytest.raises(UserError, match=rf"{identity_data.name}: dataset_map_fn={fn}: .*{needle}"):
            build_rows(cfg, tokenizer, get_template(cfg.prompt_template, tokenizer), use_cache=False)


def _seed(text: str = XTUNER_CONFIG) -> str:
    """The config as XTuner ships it, before the tutorial's edits: the data by its Hub name
    (alpaca_en_path = 'tatsu-lab/alpaca', read by load_dataset(path=alpaca_en_path)) and mapped
    by alpaca_map_fn."""
    text = text.replace("dataset=dict(type=load_dataset, path='json', data_files=dict(train=alpaca_en_path))",
                        "dataset=dict(type=load_dataset, path=alpaca_en_path)")
    return text.replace("dataset_map_fn=None,\n    template_map_fn", "dataset_map_fn=alpaca_map_fn,\n    template_map_fn")


def test_the_seed_configs_load_dataset_by_name_becomes_a_dataset_name(tmp_path):
    path = _write(tmp_path, "m", "tatsu-lab/alpaca", _seed())
    settings, _ = read_xtuner_config(path)
    assert settings["data_files"] == "tatsu-lab/alpaca" and settings["data_format"] == "alpaca_map_fn"
    # load_dataset's name, split, data_files and streaming choose the entry's part of the dataset
    text = _seed().replace("path=alpaca_en_path)", "path=alpaca_en_path, name='en', split='train[:100]', "
                           "data_files=dict(train='data/en-*.parquet'), streaming=True)")
    settings, _ = read_xtuner_config(_write(tmp_path, "m", "tatsu-lab/alpaca", text))
    assert settings["data_files"] == [{"path": "tatsu-lab/alpaca", "subset": "en", "split": "train[:100]",
                                       "data_files": "data/en-*.parquet", "streaming": True}]
    assert "alpaca_en_path" not in settings  # the entry replaces the alias
    cfg = load_config(_write(tmp_path, "m", "tatsu-lab/alpaca", text), {"max_steps": 5})
    assert (cfg.data_sources[0].subset, cfg.data_sources[0].streaming) == ("en", True)


def test_the_seed_config_offline_names_the_fix_then_trains_once_the_cache_holds_the_dataset(tiny_model_dir, tmp_path):
    path = _write(tmp_path, tiny_model_dir, "tatsu-lab/alpaca", _seed())
    home, work = tmp_path / "hf", tmp_path / "work"
    args = ("train", str(path), "--work-dir", str(work), "--no-progress", "--cfg-options", "method=lora",
            "max_steps=2", "replay_general=False", "identity_guard=False", "evaluation_inputs=[]")
    proc = tuneforge(*args, env=offline_env(home), cwd=tmp_path, seconds=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "dataset 'tatsu-lab/alpaca' not found" in last and "hf download --repo-type dataset tatsu-lab/alpaca" in last
    assert str(home / "hub" / "datasets--tatsu-lab--alpaca") in last
    # a tiny stand-in where `hf download --repo-type dataset tatsu-lab/alpaca` puts the real one
    hub_snapshot(home / "hub", "tatsu-lab/alpaca", {"train": [alpaca(16)]})
    proc = tuneforge(*args, env=offline_env(home), cwd=tmp_path, seconds=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16 samples from 1 dataset(s)" in proc.stdout and (work / "iter_2.pth").is_file()
