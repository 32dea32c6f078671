# shellcheck shell=bash
# Sourced by the sbatch scripts in this folder: where the code is, how a step is launched (one task per
# GPU, optionally inside the NGC image through pyxis/enroot), NCCL settings, and the requeue on status 75.
#
# Environment (all optional):
#   NEMO_DVPO_DIR     the repository (default: the folder sbatch was called from)
#   PYTHON            the interpreter (default: python; e.g. .venv/bin/python outside a container)
#   CONTAINER_IMAGE   an enroot image (e.g. the .sqsh from `enroot import`); needs the pyxis plugin
#   CONTAINER_MOUNTS  pyxis mounts (default: this repository at the same path, so the job runs this
#                     checkout's code with the image's packages; add data and run folders, comma-separated)
#   CONTAINER_WORKDIR where the job runs in the container (default: this repository; /workspace/nemo_dvpo
#                     runs the image's own copy of the code)
#   MAX_REQUEUES      how often a run stopped at a checkpoint (status 75) is requeued (default 3)
set -euo pipefail
cd "${NEMO_DVPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
PYTHON=${PYTHON:-python}

# NCCL and CUDA settings Megatron jobs want; any already set in the environment win.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Rank, world size and the rendezvous (first host of the step's nodes, a port from the job and step
# ids) come from SLURM_* variables inside nemo_dvpo; export MASTER_ADDR / MASTER_PORT to override.

CONTAINER_ARGS=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}"
                    --container-workdir="${CONTAINER_WORKDIR:-$PWD}")
fi

# run_step [srun options --] SCRIPT ARGS...: one srun step of an entry point. A run that stopped at a
# checkpoint on a signal (status 75: Slurm's --signal ahead of the time limit, a preemption) requeues
# the job, which then continues with resume=true.
run_step() {
    local srun_args=()
    if [[ " $* " == *" -- "* ]]; then
        while [ "$1" != "--" ]; do srun_args+=("$1"); shift; done
        shift
    fi
    local status=0
    srun --kill-on-bad-exit=1 "${srun_args[@]}" "${CONTAINER_ARGS[@]}" "$PYTHON" "$@" || status=$?
    if [ "$status" -eq 75 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUES:-3}" ]; then
        echo "[slurm] the run stopped at a checkpoint (status 75): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
