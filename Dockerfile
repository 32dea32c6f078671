# nemo_dvpo on an NGC PyTorch container: the container's CUDA torch, Transformer Engine and apex stay, and
# so does every package the container pins in its pip constraints; setup.sh adds megatron-core,
# megatron-bridge and the rest (requirements*.txt).
#
#   docker build -t nemo_dvpo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it \
#       -v /models:/models -v "$PWD/runs:/workspace/nemo_dvpo/runs" nemo_dvpo
#
# For Slurm with pyxis/enroot: `enroot import -o nemo_dvpo.sqsh dockerd://nemo_dvpo` (README, "Docker").
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NEMO_DVPO_CACHE=/workspace/nemo_dvpo/.cache
WORKDIR /workspace/nemo_dvpo

# Dependencies first, so that a change to the code alone reuses this layer.
COPY requirements.txt requirements-nodeps.txt requirements-cpu.txt setup.sh pyproject.toml README.md ./
COPY nemo_dvpo ./nemo_dvpo
RUN ./setup.sh
COPY . .
