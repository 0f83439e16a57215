#!/usr/bin/env bash
# The personal-assistant pipeline on the bundled model, as the README lists it:
# identity data -> copy-cfg -> train -> convert pth_to_hf -> convert merge -> chat.
set -euo pipefail
DIR=${1:-demo}
BASE=HuggingFaceTB/SmolLM2-135M-Instruct
CFG=smollm2_135m_instruct_lora_assistant
ASK=$'请介绍一下你自己\nPlease introduce yourself\nPlease tell me five scenic spots in Shanghai'
mkdir -p "$DIR" && cd "$DIR"
start=$(date +%s)

echo "== 0. the base model, before training"
printf '%s\n' "$ASK" | tuneforge chat "$BASE" --max-new-tokens 60

echo "== 1. identity data"
tuneforge data self-cognition --name 龙 --name-en Long -o ./data/assistant.jsonl
echo "== 2. config"
tuneforge copy-cfg "$CFG" ./
echo "== 3. train"
tuneforge train "./${CFG}_copy.py" --deepspeed deepspeed_zero2 --work-dir ./work_dirs/assistTuner
echo "== 4. convert the checkpoint to a PEFT adapter"
tuneforge convert pth_to_hf "./${CFG}_copy.py" ./work_dirs/assistTuner/iter_60.pth ./hf
echo "== 5. merge it into the base model"
tuneforge convert merge "$BASE" ./hf ./merged --max-shard-size 2GB
pipeline=$(( $(date +%s) - start ))

echo "== 6. chat with the merged model"
printf '%s\n' "$ASK" | tuneforge chat ./merged --max-new-tokens 60

echo "== 7. measure: identity on held-out questions, hijacked general questions"
tuneforge eval identity ./merged --name 龙 --name-en Long

echo
echo "Pipeline (data, train, convert, merge) took ${pipeline}s."
echo "Merged model: $(pwd)/merged"
echo "Loss plot:    $(pwd)/work_dirs/assistTuner/loss.png"
echo "Chat with it: tuneforge chat $(pwd)/merged"
