"""The methods vLLM's workers gain for weight refits (``worker_extension_cls``), run inside vLLM's worker.

This module runs in the vLLM environment (``.venv-vllm``), not the trainer's: it imports only torch and the
standard library. vLLM imports it by its top-level name ``vllm_worker_extension`` (the worker puts this
folder on ``sys.path`` and ``PYTHONPATH``, so vLLM's own worker processes find it too); importing it as
``nemo_dvpo.inference.vllm_worker_extension`` would import ``nemo_dvpo`` and with it megatron, which the
vLLM environment does not have.

Each method is called through ``LLM.collective_rpc(name, args=...)`` on every vLLM worker; ``self`` is vLLM's
worker, whose ``model_runner.model`` is the served model and whose ``load_weights`` takes Hugging Face names
(it fuses q/k/v and gate/up itself and shards by its own tensor-parallel rank).

Refit paths:
- ``load_from_shared_memory`` (CPU, tested): the tensors lie in a POSIX shared-memory segment the trainer
  filled; the worker maps it and copies each tensor out once (the reload may hold it past the call).
- ``load_from_cuda_ipc`` (GPU, colocated; UNTESTED until a device is lent): one packed CUDA buffer per bucket,
  shared by CUDA IPC handles (torch.multiprocessing's ``reduce_tensor``), as NeMo-RL's
  ``update_weights_via_ipc_zmq`` and veRL's colocated refit do.
- ``init_weight_group`` / ``load_from_broadcast`` (GPU, engine on its own GPUs; UNTESTED until a device is
  lent): an NCCL group between the trainer's rank 0 (rank 0 of the group) and every vLLM worker; the trainer
  broadcasts one packed bucket at a time, as NeMo-RL's ``update_weights_from_collective`` and vLLM's
  ``examples/offline_inference/rlhf.py`` do. The group is plain torch ``ProcessGroupNCCL`` on a ``TCPStore``
  so that the trainer side needs only torch, not vllm.
"""

from __future__ import annotations

import gc
from datetime import timedelta
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Sequence

import torch

# (name, dtype name, shape, byte offset in the buffer) for every tensor of one bucket.
Entry = tuple[str, str, Sequence[int], int]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in a refit bucket")
    return dtype


def views_of(buffer: torch.Tensor, entries: Sequence[Entry]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into a flat uint8 ``buffer`` laid out by ``entries`` (no copy)."""
    weights = []
    for name, dtype_name, shape, offset in entries:
        dtype = _dtype(dtype_name)
        count = 1
        for size in shape:
            count *= int(size)
        nbytes = count * dtype.itemsize
        if offset + nbytes > buffer.numel():
            raise ValueError(f"refit entry {name!r} ends at byte {offset + nbytes}, past the buffer's "
                             f"{buffer.numel()} bytes")
        weights.append((name, buffer[offset:offset + nbytes].view(dtype).view(*shape)))
    return weights


def open_shared_memory(name: str) -> shared_memory.SharedMemory:
    """Map the trainer's segment without taking ownership of it.

    Python 3.11's ``SharedMemory`` registers every segment it opens with this process's resource tracker,
    which would unlink the trainer's segment when this process exits (and warn about a "leak"); the trainer
    owns and unlinks it, so the registration is withdrawn.
    """
    segment = shared_memory.SharedMemory(name=name, create=False)
    resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001 - the name the tracker holds
    return segment


class RefitExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls="vllm_worker_extension.RefitExtension"``.

    A refit is ``begin_refit``, one ``load_from_*`` per bucket, ``end_refit``: vLLM's in-place layerwise
    reload (what its own ``Worker.reload_weights`` runs in one call). Loading into the served parameters
    directly is not possible: after loading, vLLM converts some layers to kernel formats (the CPU linear
    layers repack their weights) and drops the checkpoint-format weight loaders. The reload puts every layer
    back in checkpoint format, buffers the weights each layer receives until it has all of them, then loads,
    re-processes, and copies the result into the original storage (so KV caches and compiled graphs that
    hold those tensors stay valid). Layers a refit does not touch keep their weights.
    """

    def _model(self):
        return self.model_runner.get_model()

    def begin_refit(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._model())

    def end_refit(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._model(), self.vllm_config.model_config)
            self._reprocess_tied_output_layers()

    def _reprocess_tied_output_layers(self) -> None:
        """Rebuild what vLLM derived from the tied output layer's weight.

        With tied embeddings the checkpoint has no ``lm_head.weight``, so the reload never visits the output
        layer and leaves it as it was - its weight is the embedding's tensor, refilled in place, but on CPU its
        GEMM runs from a packed copy of that weight made when the model was loaded (vLLM's
        ``dispatch_cpu_unquantized_gemm``): the logits would keep coming from the old weights. Re-running the
        embedding method's post-load processing repacks from the current weight (a no-op on GPUs).
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        for module in self._model().modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod) and getattr(module, "weight", None) is not None:
                method.process_weights_after_loading(module)

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            loaded = self._model().load_weights(weights)
        return len(loaded) if loaded is not None else len(weights)

    def load_from_shared_memory(self, segment_name: str, entries: Sequence[Entry]) -> int:
        """Load one bucket from the shared-memory segment ``segment_name``; returns the parameters loaded."""
        segment = open_shared_memory(segment_name)
        try:
            buffer = torch.frombuffer(segment.buf, dtype=torch.uint8)
            # Copies: the reload keeps a layer's weights until all of them have arrived, possibly in a later
            # bucket, and the trainer refills this segment for the next bucket as soon as this call returns.
            weights = [(name, view.clone()) for name, view in views_of(buffer, entries)]
            count = self._load(weights)
            # The views pin the mapping: drop them before closing it (close() refuses exported buffers).
            del weights, buffer
            return count
        finally:
            segment.close()

    def parameter_checksum(self) -> dict[str, float]:
        """``{name: sum of the parameter}`` of the served model, to check a refit landed (tests). Parameters
        left empty because vLLM holds the layer's weight in a packed kernel format (CPU linear layers) are
        not listed."""
        return {name: float(param.detach().double().sum()) for name, param in
                self._model().named_parameters() if param.numel() > 0}

    # ---- GPU paths: written after NeMo-RL / veRL / vLLM's RLHF example, UNTESTED until a device is lent ----

    def load_from_cuda_ipc(self, handles_by_device: dict[str, Any], entries: Sequence[Entry]) -> int:
        """Colocated refit: rebuild the trainer's packed CUDA buffer from its IPC handle and load from it.

        ``handles_by_device`` maps a device UUID to ``torch.multiprocessing.reductions.reduce_tensor(buffer)``
        made on that device by the trainer rank sharing this GPU (each vLLM worker picks its own GPU's).
        """
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        if uuid not in handles_by_device:
            raise RuntimeError(f"no refit buffer was shared for this worker's GPU {uuid}")
        rebuild, args = handles_by_device[uuid]
        args = list(args)
        # reduce_tensor records the sender's device index; this process may number the same GPU differently.
        args[6] = self.device.index
        buffer = rebuild(*args)
        # Copies, as in load_from_shared_memory: the trainer frees or refills its buffer after this call.
        weights = [(name, view.clone()) for name, view in views_of(buffer, entries)]
        count = self._load(weights)
        torch.cuda.current_stream().synchronize()
        # The trainer reuses the buffer once this call returns: no view may outlive it.
        del weights, buffer
        gc.collect()
        return count

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join the trainer's NCCL group for broadcasts: trainer rank 0 is group rank 0, this worker is
        ``rank_offset + its tensor-parallel rank`` (vLLM's workers follow the trainer's rank 0)."""
        import torch.distributed as dist

        rank = rank_offset + dist.get_rank()
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(minutes=10))
        options = dist.ProcessGroupNCCL.Options()
        self._weight_group = dist.ProcessGroupNCCL(dist.PrefixStore("nemo_dvpo_refit", store), rank, world_size,
                                                   options)

    def load_from_broadcast(self, entries: Sequence[Entry], nbytes: int) -> int:
        """Receive one packed bucket by NCCL broadcast from group rank 0 and load it."""
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("load_from_broadcast before init_weight_group")
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        group.broadcast([buffer], root=0).wait()
        # No copy: this buffer is this call's own, and the views keep it alive while the reload needs them.
        weights = views_of(buffer, entries)
        count = self._load(weights)
        del weights, buffer
        return count
