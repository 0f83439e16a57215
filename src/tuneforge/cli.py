"""`tuneforge` subcommands. Each one parses its arguments and calls one function below it.

The commands and their arguments follow XTuner's, so a tutorial works with the tool name swapped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.errors import UserError

if TYPE_CHECKING:
    from tuneforge.config.schema import Config


def _quiet_libraries() -> None:
    # bitsandbytes announces optional CPU kernels it cannot find on every import, and peft
    # calls a transformers property that is being renamed: neither is the user's business.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*is deprecated.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers imports DeepSpeed wherever it is installed, and DeepSpeed warns on every
    # command of a machine without a GPU that it found none; say which accelerator there is.
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _has_cuda() -> bool:
    """Without importing torch (seconds): an NVIDIA or AMD GPU's device files are there."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/kfd").exists()


def cmd_list_cfg(args: argparse.Namespace) -> None:
    from tuneforge.config.catalog import list_presets

    names = list_presets(args.pattern)
    print("\n".join(names) if names else f"no preset matches '{args.pattern}'")


def cmd_copy_cfg(args: argparse.Namespace) -> None:
    from tuneforge.config.catalog import copy_preset

    print(f"Copy to {copy_preset(args.config_name, args.save_dir)}")


def cmd_train(args: argparse.Namespace) -> None:
    from tuneforge.config import load_config, parse_cfg_options

    options = parse_cfg_options(args.cfg_options)
    if args.seed is not None:
        options["seed"] = args.seed
    if args.skip_bad_lines:
        options["skip_bad_lines"] = True
    cfg = load_config(args.config, options)  # a bad config fails here, before any rank starts
    from tuneforge.train import trackers

    trackers.check(trackers.chosen(cfg.report_to))  # and so does a tracker that is not installed
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    from tuneforge.train.launch import launch, slurm_environment

    if args.launcher == "slurm":
        slurm_environment()
    else:
        code = launch(sys.argv[1:] if args.argv is None else args.argv)
        if code is not None:
            if code:
                raise UserError(f"a rank failed (exit {code}); its error is printed above")
            return
    from tuneforge.train.options import RunOptions
    from tuneforge.train.recipe import train

    # TUNEFORGE_COMPILE=0 is the older spelling of --no-compile, read here and nowhere deeper
    compile_layers = not args.no_compile and os.environ.get("TUNEFORGE_COMPILE", "1") != "0"
    train(cfg, work_dir, RunOptions(resume=args.resume, deepspeed=args.deepspeed, fsdp=args.fsdp,
                                    profile=args.profile, progress=not args.no_progress,
                                    compile=compile_layers))


def cmd_pth_to_hf(args: argparse.Namespace) -> None:
    from tuneforge.config import load_config
    from tuneforge.convert.pth_to_hf import convert_checkpoint

    cfg = load_config(args.config)
    out = convert_checkpoint(args.pth_model, args.save_dir, cfg.pretrained_model_name_or_path,
                             fp32=args.fp32, max_shard_size=args.max_shard_size, layout=args.layout)
    print(f"[tuneforge] saved {out}")


def cmd_merge(args: argparse.Namespace) -> None:
    from tuneforge.convert.merge import merge_adapter

    out = merge_adapter(args.model_name_or_path, args.adapter_name_or_path, args.save_dir,
                        max_shard_size=args.max_shard_size, device=args.device,
                        trust_remote_code=args.trust_remote_code, layout=args.layout,
                        dtype=args.dtype)
    print(f"[tuneforge] merged model saved to {out}")


def cmd_gguf(args: argparse.Namespace) -> None:
    from tuneforge.convert.gguf import convert_gguf

    report = convert_gguf(args.model_dir, args.out, outtype_name=args.outtype, adapter=args.adapter,
                          force=args.force, trust_remote_code=args.trust_remote_code)
    print("\n".join([*(f"[tuneforge] note: {n}" for n in report.notes), f"[tuneforge] {report.summary()}"]))


def cmd_ollama(args: argparse.Namespace) -> None:
    from tuneforge.convert.ollama import convert_ollama

    report = convert_ollama(args.model_dir, args.out_dir, quant=args.quant, adapter=args.adapter,
                            system=args.system, force=args.force, trust_remote_code=args.trust_remote_code)
    print("\n".join([*(f"[tuneforge] note: {n}" for n in report.notes), f"[tuneforge] {report.summary()}"]))


def cmd_chat(args: argparse.Namespace) -> None:
    from tuneforge.chat.cli import run_chat
    from tuneforge.models.generate import Sampling

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k,
                        repetition_penalty=args.repetition_penalty)
    run_chat(args.model_name_or_path, adapter=args.adapter, prompt_template=args.prompt_template,
             system=args.system or "", sampling=sampling, stream=not args.no_streamer,
             prompts=args.prompt, bits=args.bits, trust_remote_code=args.trust_remote_code)


def cmd_serve(args: argparse.Namespace) -> None:
    from tuneforge.chat.cli import load_for_serving
    from tuneforge.chat.server import Served, serve
    from tuneforge.chat.worker import Worker
    from tuneforge.data.templates import template_for

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"[tuneforge] warning: listening on {args.host} without --api-key: anyone who can reach "
              "this machine can use the model", file=sys.stderr)
    name = Path(args.model_name_or_path.rstrip("/")).name or "model"
    llm, tokenizer, template_dir, routes = load_for_serving(
        args.model_name_or_path, name, args.adapter or [], bits=args.bits,
        trust_remote_code=args.trust_remote_code)
    template = template_for(template_dir, tokenizer, args.prompt_template)
    worker = Worker(llm, tokenizer, template, max_prompt_tokens=args.max_prompt_tokens,
                    max_queue=args.max_queue, max_batch=args.max_batch, join=args.batching == "continuous")
    served = Served(worker, name, None, args.api_key, args.max_tokens, cors_origins=args.cors_origin or [],
                    routes=routes)
    serve(served, args.host, args.port)


def cmd_self_cognition(args: argparse.Namespace) -> None:
    from tuneforge.data.selfcog import write_self_cognition

    if args.pairs:
        from tuneforge.data.identity_pairs import write_identity_pairs
        from tuneforge.models.resolve import BUNDLED_MODEL, resolve_model

        n = write_identity_pairs(Path(args.output), resolve_model(args.model or BUNDLED_MODEL), args.name, args.name_en, args.author,
                                 args.author_en, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                 say=lambda m: print(f"[tuneforge] {m}", file=sys.stderr))
        print(f"[tuneforge] wrote {n} preference pairs to {args.output} (train them with objective='dpo')")
        return
    n = write_self_cognition(args.output, args.name, args.name_en, args.author, args.author_en,
                             seed=args.seed)
    print(f"[tuneforge] wrote {n} identity conversations to {args.output}")


def cmd_replace(args: argparse.Namespace) -> None:
    from tuneforge.data.replace import replace_file

    lines, count = replace_file(args.input, args.output, args.old, args.new)
    print(f"[tuneforge] {count} replacement(s) in {lines} line(s) -> {args.output}")


def cmd_eval_identity(args: argparse.Namespace) -> None:
    from tuneforge.evaluate.identity import format_report, format_side_by_side, save_json

    paths = args.model_name_or_path
    if args.adapter and len(paths) > 1:
        raise UserError(f"eval identity: --adapter goes with one model, and {len(paths)} are given; merge the "
                        "adapters (`tuneforge convert merge`) and pass the merged folders")
    results = {}
    for path in paths:
        if len(paths) > 1:
            print(f"[tuneforge] eval identity: {path} ({len(results) + 1} of {len(paths)})", flush=True)
        results[path] = _eval_identity_of(path, args)
    if len(paths) == 1:
        print(format_report(results[paths[0]], args.name, args.name_en))
    else:
        print(format_side_by_side(results, args.name, args.name_en))
    if args.json:
        save_json(results[paths[0]] if len(paths) == 1 else results, args.json)


def _eval_identity_of(path: str, args: argparse.Namespace) -> dict:
    """One model's identity report; its weights (and its base's) are freed before the next model loads."""
    from tuneforge.chat.cli import load_for_chat
    from tuneforge.data.templates import template_for
    from tuneforge.evaluate.identity import evaluate_identity

    model, tokenizer, template_dir = load_for_chat(path, args.adapter, trust_remote_code=args.trust_remote_code)
    template = template_for(template_dir, tokenizer, args.prompt_template)
    base = None if args.no_compare else _base_for_compare(model, path, args)
    return evaluate_identity(model, tokenizer, template, args.name, args.name_en,
                             max_new_tokens=args.max_new_tokens, base=base)


def _base_for_compare(model, path: str, args):  # noqa: ANN001, ANN202
    """The untuned model: the adapter switched off, or the base a merged folder records."""
    import json

    if args.adapter:
        return model.disable_adapter
    merge_info = Path(path) / "tuneforge_merge.json"
    if merge_info.is_file():
        from tuneforge.models.load import load_model, remote_code_allowed
        from tuneforge.models.resolve import resolve_model

        base = resolve_model(json.loads(merge_info.read_text())["base"])
        trust = remote_code_allowed(args.trust_remote_code, path)
        return load_model(base, model.device, "auto", trust_remote_code=trust)
    return None


def _tokenizer_and_template(cfg):  # noqa: ANN001, ANN202
    from tuneforge.data.templates import get_template
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.resolve import resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.pretrained_model_name_or_path), cfg.trust_remote_code)
    return tokenizer, get_template(cfg.prompt_template, tokenizer)


def _as_trained_data(cfg: Config) -> Config:
    """With identity_pairs, data_files are conversations the run makes its pairs from: inspect them
    as the SFT records they are."""
    if not cfg.identity_pairs:
        return cfg
    from tuneforge.train.stages import sft_stage

    print("[tuneforge] identity_pairs: these conversations are SFT data; the run makes its preference pairs from "
          "them when training starts (work_dir/pairs.jsonl; `tuneforge data self-cognition --pairs` writes such "
          "pairs ahead)")
    return sft_stage(cfg)


def cmd_check_dataset(args: argparse.Namespace) -> None:
    from tuneforge.config import load_config, parse_cfg_options
    from tuneforge.data.inspect import check_dataset

    cfg = _as_trained_data(load_config(args.config, parse_cfg_options(args.cfg_options)))
    if args.skip_bad_lines:
        cfg.skip_bad_lines = True
    report, bad = check_dataset(cfg, *_tokenizer_and_template(cfg))
    print(report)
    if bad and not cfg.skip_bad_lines:
        raise UserError(f"{bad} bad line(s) in the data (listed above); fix them or pass --skip-bad-lines")


def cmd_log_dataset(args: argparse.Namespace) -> None:
    from tuneforge.config import load_config, parse_cfg_options
    from tuneforge.data.inspect import log_dataset

    cfg = _as_trained_data(load_config(args.config, parse_cfg_options(args.cfg_options)))
    print(log_dataset(cfg, *_tokenizer_and_template(cfg), show=args.show, num=args.num))


LAYOUT_HELP = ("InternLM2 bases only: llama (default; vLLM, SGLang, LMDeploy, llama.cpp and transformers "
               "read it without remote code) or original (fused wqkv and InternLM2's own code files)")


def _remote_code_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow the model's own code to run (default: as recorded with the model; "
                        "InternLM2 never needs it)")


def _gguf_parsers(conv: argparse._SubParsersAction) -> None:
    s = conv.add_parser("gguf", help="a merged model (or base + --adapter) -> one GGUF file for llama.cpp")
    s.add_argument("model_dir", help="a merged model folder, or the base model with --adapter")
    s.add_argument("out", help="the .gguf file to write")
    s.add_argument("--outtype", default="f16", metavar="TYPE",
                   help="f16 (default), bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0 (k-quants: llama-quantize)")
    s.add_argument("--adapter", help="a PEFT adapter, merged into MODEL_DIR on the fly")
    s.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    _remote_code_option(s)
    s.set_defaults(func=cmd_gguf)
    s = conv.add_parser("ollama", help="a GGUF plus a Modelfile with the trained chat template")
    s.add_argument("model_dir", help="a merged model folder, or the base model with --adapter")
    s.add_argument("out_dir", help="the folder for model.gguf and Modelfile")
    s.add_argument("--quant", default="q8_0", metavar="TYPE", help="as --outtype of convert gguf (default q8_0)")
    s.add_argument("--adapter", help="a PEFT adapter, merged into MODEL_DIR on the fly")
    s.add_argument("--system", help="the SYSTEM the model was trained with (default: the one recorded "
                                    "with it, else none: the template's own default applies)")
    s.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    _remote_code_option(s)
    s.set_defaults(func=cmd_ollama)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list-cfg", help="list the shipped config presets")
    s.add_argument("-p", "--pattern", help="only names containing PATTERN")
    s.set_defaults(func=cmd_list_cfg)

    s = sub.add_parser("copy-cfg", help="copy a preset to DIR/NAME_copy.py for editing")
    s.add_argument("config_name")
    s.add_argument("save_dir")
    s.set_defaults(func=cmd_copy_cfg)

    s = sub.add_parser("train", help="fine-tune as a config says")
    s.add_argument("config")
    s.add_argument("--work-dir", help="where checkpoints and logs go (default ./work_dirs/CONFIG)")
    s.add_argument("--deepspeed", help="deepspeed_zero1|2|3[_offload] or a DeepSpeed JSON file")
    s.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from CKPT, or from the work dir's last checkpoint")
    s.add_argument("--seed", type=int)
    s.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override config settings")
    s.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed data lines instead of stopping")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--fsdp", action="store_true",
                   help="with several ranks: shard weights, gradients and optimizer state (PyTorch FSDP2)")
    s.add_argument("--profile", action="store_true",
                   help="record steps 3-5 with torch.profiler: how busy the GPU is, and where the time goes")
    s.add_argument("--no-compile", action="store_true",
                   help="run the decoder layers and fused maths eagerly on a GPU (no torch.compile)")
    s.add_argument("--launcher", choices=["none", "slurm"], default="none",
                   help="slurm: this process is one task started by srun (NPROC_PER_NODE is for torchrun)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("check-dataset", help="validate every data line and show what trains")
    s.add_argument("config")
    s.add_argument("--skip-bad-lines", action="store_true")
    s.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    s.set_defaults(func=cmd_check_dataset)
    s = sub.add_parser("log-dataset", help="print samples as the model sees them")
    s.add_argument("config")
    s.add_argument("--show", default="text", help="text | masked_text | input_ids | labels")
    s.add_argument("--num", type=int, default=1, help="how many samples")
    s.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    s.set_defaults(func=cmd_log_dataset)

    conv = sub.add_parser("convert", help="pth_to_hf | merge | gguf | ollama").add_subparsers(
        dest="convert_command", required=True, metavar="SUBCOMMAND")
    s = conv.add_parser("pth_to_hf", help="checkpoint -> PEFT adapter (or HF model for full)")
    s.add_argument("config")
    s.add_argument("pth_model", help="iter_N.pth, or a work dir (its last checkpoint)")
    s.add_argument("save_dir")
    s.add_argument("--max-shard-size", default="2GB")
    s.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16)")
    s.add_argument("--layout", choices=["llama", "original"], default="llama", help=LAYOUT_HELP)
    s.set_defaults(func=cmd_pth_to_hf)
    s = conv.add_parser("merge", help="merge an adapter into its base model")
    s.add_argument("model_name_or_path")
    s.add_argument("adapter_name_or_path")
    s.add_argument("save_dir")
    s.add_argument("--max-shard-size", default="2GB")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    s.add_argument("--layout", choices=["llama", "original"], default="llama", help=LAYOUT_HELP)
    s.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="dtype of the weights written (default auto: the base model's own; "
                        "the merge itself runs in fp32)")
    _remote_code_option(s)
    s.set_defaults(func=cmd_merge)
    _gguf_parsers(conv)

    s = sub.add_parser("chat", help="chat with a model (merged, or base + --adapter)")
    s.add_argument("model_name_or_path")
    s.add_argument("--adapter")
    s.add_argument("--prompt-template", help="override the template saved with the model")
    s.add_argument("--system")
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--no-streamer", action="store_true")
    s.add_argument("--prompt", action="append", help="ask this and exit; repeat for a multi-turn conversation")
    s.add_argument("--bits", type=int, choices=[4, 8], help="load the model quantized (bitsandbytes)")
    _remote_code_option(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible API and a chat web page for a model")
    s.add_argument("model_name_or_path")
    s.add_argument("--adapter", action="append",
                   help="a LoRA adapter on the base model (NAME:base answers without it; the page "
                        "compares both), or NAME=DIR, repeatable: several adapters on one base, "
                        "picked per request by the model field (the base by its own name)")
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) serves this machine only")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="clients must send Authorization: Bearer KEY")
    s.add_argument("--prompt-template", help="override the template saved with the model")
    s.add_argument("--max-tokens", type=int, default=1024, help="the most tokens one reply may ask for")
    s.add_argument("--max-prompt-tokens", type=int, default=4096, help="longer prompts get HTTP 400")
    s.add_argument("--max-batch", type=int, default=8, help="the most rows decoded together in one step")
    s.add_argument("--max-queue", type=int, default=64, help="more waiting requests get HTTP 503 + Retry-After")
    s.add_argument("--batching", choices=["continuous", "waves"], default="continuous",
                   help="continuous (default): requests join the running batch at the next step; "
                        "waves: they wait for it to end (the baseline bench_serve.py compares against)")
    s.add_argument("--cors-origin", action="append",
                   help="let pages from this origin call the API (repeat; none by default)")
    s.add_argument("--bits", type=int, choices=[4, 8], help="load the model quantized (bitsandbytes)")
    _remote_code_option(s)
    s.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="identity").add_subparsers(
        dest="eval_command", required=True, metavar="SUBCOMMAND")
    s = ev.add_parser("identity", help="identity rate on held-out questions, hijack rate on general ones")
    s.add_argument("model_name_or_path", nargs="+",
                   help="a model (merged folder, Hub name, or base with --adapter); several: one table side by side")
    s.add_argument("--adapter")
    s.add_argument("--name", required=True, help="as given to `data self-cognition`")
    s.add_argument("--name-en")
    s.add_argument("--author", help="accepted for symmetry with self-cognition; not scored yet")
    s.add_argument("--author-en")
    s.add_argument("--prompt-template")
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.add_argument("--no-compare", action="store_true",
                   help="skip the base model: no forgetting figures (KL, top-1 agreement), no base-vs-tuned answers")
    s.add_argument("--json", help="also write the full result (every answer) here")
    _remote_code_option(s)
    s.set_defaults(func=cmd_eval_identity)

    data = sub.add_parser("data", help="self-cognition | replace").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND")
    s = data.add_parser("self-cognition", help="write identity Q&A (zh + en) as jsonl")
    s.add_argument("--name", required=True, help="whose assistant: 龙 -> 我是龙的小助手")
    s.add_argument("--name-en", help="the name in English answers (default: --name)")
    s.add_argument("--author")
    s.add_argument("--author-en")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--pairs", action="store_true",
                   help="write preference pairs instead: the identity answer over the base model's own, and "
                        "the base model's answers to general prompts over an identity answer")
    s.add_argument("--model", help="--pairs: the base model that answers (default: the bundled SmolLM2)")
    s.add_argument("--max-new-tokens", type=int, default=48, help="--pairs: the base model's answer length")
    s.set_defaults(func=cmd_self_cognition)
    s = data.add_parser("replace", help="replace a string in every string value of a jsonl")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--old", required=True)
    s.add_argument("--new", required=True)
    s.set_defaults(func=cmd_replace)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # the ranks of a multi-process run repeat this command line
    _quiet_libraries()
    try:
        args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"tuneforge: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130
    return 0
