#!/usr/bin/env bash
# The packages bench_side_by_side.py needs on the lent GPU machine beyond its image (torch,
# transformers, peft, accelerate, triton, pyarrow are there): Liger, Unsloth with what it imports,
# and tuneforge's pydantic and bitsandbytes. Wheels go to .whl-unsloth/, their unpacked and
# trimmed contents to .carry/site.tar.gz (under the 64 MiB a device call may carry); on the
# machine: mkdir -p /tmp/site && tar xzf .carry/site.tar.gz -C /tmp/site, then PYTHONPATH=/tmp/site.
# Trimmed: Unsloth's web app (studio/), torchao's two large CUDA extensions and its tests, and
# every bitsandbytes library but the CUDA 13.0 one.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
wheels=.whl-unsloth
mkdir -p "$wheels" .carry
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$wheels" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 multiprocess==0.70.19 dill==0.4.1 \
  torchao==0.18.0 cut_cross_entropy==25.1.1 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 \
  shtab==1.13.0 msgspec==0.23.0 structlog==26.1.0 json5==0.17.3 nest_asyncio==1.6.0 liger-kernel==0.8.5 \
  pydantic==2.13.4 pydantic_core==2.46.4 annotated_types==0.8.0 typing_inspection==0.4.5 bitsandbytes==0.50.2
stage=$(mktemp -d)
for w in "$wheels"/*.whl; do unzip -qo "$w" -d "$stage"; done
rm -rf "$stage/studio" "$stage/test" "$stage/torchao/_C_cutlass_90a.abi3.so" "$stage"/torchao/_C_mxfp8.*.so
find "$stage/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' -delete
tar czf .carry/site.tar.gz -C "$stage" .
rm -rf "$stage"
du -b .carry/site.tar.gz
