#!/usr/bin/env bash
# What a lent GPU session carries (bench/GPU.md), made here in one command, before any device call:
#
#   bash bench/gpu_kit.sh
#
# - .whl/: the HTTP stack's wheels that the GPU image lacks (fastapi, starlette, pydantic,
#   pydantic-core for CPython 3.12 x86-64, uvicorn and their missing needs), pinned to the
#   versions this project's tests run with. Only the `serve` stage needs them; gpu.sh installs
#   whatever .whl/ holds. About 3 MiB.
# - .gpu-kit/smollm2-135m-instruct/: the default model's config.json and tokenizer, no weights
#   (538 MB would exceed the 64 MiB a call carries): the `serve` stage draws random weights
#   (bench/serve.py --random-weights). About 3.5 MiB.
#
# Both folders are git-ignored; name them in the device call's `carry`: [".whl", ".gpu-kit"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic_core==2.50.4 uvicorn==0.54.0
annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 typing_extensions==4.16.0
opentelemetry-api==1.45.2"
mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
MODEL=$("$PY" -c "from flexkv.models.provision import provision_default_model as p; print(p())")
KIT=.gpu-kit/smollm2-135m-instruct
mkdir -p "$KIT"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json \
         special_tokens_map.json chat_template.jinja; do
    if [ -f "$MODEL/$f" ]; then cp "$MODEL/$f" "$KIT/"; fi
done
echo "carry: .whl ($(du -sh .whl | cut -f1)), .gpu-kit ($(du -sh .gpu-kit | cut -f1))"
