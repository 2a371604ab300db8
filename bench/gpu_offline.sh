#!/usr/bin/env bash
# What `bench/gpu.sh` needs on a GPU machine without a package index, in one folder to copy there:
#   DIR/wheels     what genieblue needs, and what that needs in turn, beyond a PyTorch CUDA image
#                  (`bench/requirements.py wheels`: transformers and accelerate, the hub client and
#                  tokenizers, gguf, the server's fastapi / uvicorn / pydantic, ...), each at the version
#                  installed on this machine, where the tests ran, for CPython 3.12 (PYTHON_VERSION) on
#                  x86-64 Linux (about 33 MB);
#   DIR/tokenizer  the built-in base's tokenizer (it ships inside a wheel that machine does not have).
# Run it on a machine with a package index and genieblue installed, then there:
#
#   bench/gpu_offline.sh DIR
#   WHEELS=DIR/wheels TOKENIZER=DIR/tokenizer bench/gpu.sh OUT
set -euo pipefail
DIR=${1:?usage: bench/gpu_offline.sh DIR}
platforms=()
for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 "$(dirname "$0")/requirements.py" wheels | while read -r pinned; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DIR/wheels" "$pinned"
done
python3 -c "import sys; from genieblue.model import load_tokenizer; load_tokenizer(None).save_pretrained(sys.argv[1])" \
  "$DIR/tokenizer"
du -sh "$DIR/wheels" "$DIR/tokenizer"
