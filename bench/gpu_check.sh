#!/usr/bin/env bash
# One prepared GPU check for issue 18 (bench/gpu_check.py): kernel parity on the device, the Llama-3.1-8B QLoRA
# step vs HF PEFT + bitsandbytes (+ Liger when installed) at 2k and 8k tokens, the longest context under a
# 24 GiB cap; one table of ratios, JSON lines in bench/results/gpu_check.jsonl. At most 8 minutes.
#
#   bash bench/gpu_check.sh                      # everything, on a GPU
#   bash bench/gpu_check.sh --skip context       # gpu_check.py's options pass through (--budget-s, --seqs, ...)
#
# Python: $PYTHON, else .venv/bin/python when present, else python3. Packages the machine lacks (the lent
# H200 image has no bitsandbytes or pydantic) travel as wheels in $WHEELS (default .whl/): they are installed
# into /tmp/peftlab-site with pip --no-index (nothing is downloaded). Nothing outside the repository changes.
# What the check imports beyond that image (read off sys.modules of a --smoke run): bitsandbytes, pydantic,
# pydantic-core, annotated-types, typing-inspection, and typing-extensions >= 4.16 (pydantic 2.14 needs it; the
# image's may be older: installed here it shadows the image's, which is backward compatible); liger-kernel is
# optional (its side runs when it imports). Fetch them on a machine with the index, for the image's Python 3.12 /
# x86-64 (see the device notes), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     bitsandbytes==0.50.2 pydantic pydantic-core annotated-types typing-inspection typing-extensions
# (keep the versions the local .venv has: `.venv/bin/pip freeze | grep -i -E "pydantic|annotated|typing"`). The
# bitsandbytes 0.50.2 wheel is 43 MB: with the checkout the carried tree stays under the device's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=${WHEELS:-.whl}
missing() {
  "$PY" -P -c '
import importlib.util
need = ["torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic", "yaml", "safetensors"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))'
}
lacking=$(missing)
if [ -n "$lacking" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then  # only what is missing brings the wheels in
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peftlab-site \
    "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/peftlab-site${PYTHONPATH:+:$PYTHONPATH}
  lacking=$(missing)
fi
if [ -n "$lacking" ]; then
  echo "gpu_check.sh: missing Python packages: $lacking; carry their wheels in $WHEELS/ (see the script header)" >&2
  exit 2
fi
# found is not importable (a carried wheel that needs a newer dependency than the image has): seconds, not minutes,
# to learn it, with the versions in the log
"$PY" -P -c '
import importlib.metadata as md
import bitsandbytes, peft, pydantic, torch, transformers, triton, yaml  # noqa: F401
names = ["torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "pydantic", "typing_extensions"]
print("gpu_check.sh:", ", ".join(f"{n} {md.version(n)}" for n in names), flush=True)' || {
  echo "gpu_check.sh: a package is found but does not import (above); carry a matching wheel in $WHEELS/" >&2
  exit 2
}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter
# 8 minutes in all: gpu_check.py plans its stages within --budget-s (default 450 s) and appends each stage's
# records as soon as the stage ends, so what finished is kept even if the hard stop below fires (SIGINT: the
# table of what finished is still printed). A shorter rerun sets both, e.g.
#   GPU_CHECK_HARD_STOP_S=200 bash bench/gpu_check.sh --skip parity,dequant --budget-s 170
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_HARD_STOP_S:-480}" "$PY" -P bench/gpu_check.py "$@"
