# nemo_dvpo on top of an NGC PyTorch container: the container's CUDA torch, Transformer Engine and
# apex are kept; setup.sh adds megatron-core, megatron-bridge and the rest (see requirements*.txt).
#
#   docker build -t nemo_dvpo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it \
#       -v /models:/models -v $PWD/results:/workspace/nemo_dvpo/results nemo_dvpo
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/nemo_dvpo
COPY requirements.txt requirements-nodeps.txt requirements-cpu.txt setup.sh pyproject.toml README.md ./
COPY nemo_dvpo ./nemo_dvpo
RUN ./setup.sh
COPY . .
# De-quantised GGUF models are cached here; mount it to keep the cache between containers.
ENV NEMO_DVPO_CACHE=/workspace/nemo_dvpo/.cache
