"""Run megatron-core (and megatron-bridge) on machines without CUDA.

megatron-core 0.16 assumes a GPU in a few places that matter for us: the model-parallel RNG
tracker reads CUDA generator state, buffers and p2p communication allocate on
``torch.cuda.current_device()``, the optimizer / clip-grad / checkpoint code hard-codes
``device="cuda"``, and the inference controller times itself with ``torch.cuda.Event``.
On a CPU machine (development, CI) we redirect exactly these to the CPU so that the *real*
Megatron code paths, tensor and pipeline parallelism included, run under gloo.

Everything here is a no-op when CUDA is available: :func:`apply` returns ``False`` and touches
nothing. On CPU it is applied once, process-wide, by ``import nemo_dvpo``.

Two fixes are needed on CPU for correctness, not just to avoid errors:

* gloo's ``scatter`` silently sends garbage from non-contiguous input tensors (megatron-bridge
  scatters ``torch.chunk(..., dim=1)`` views of row-parallel weights; on GPU the ``.to("cuda")``
  copy happens to make them contiguous). :func:`_contiguous_scatter` makes the inputs contiguous.
* megatron-bridge imports ``transformer_engine`` unconditionally. :func:`import_megatron_bridge`
  registers an inert placeholder only for the duration of that import, so that megatron-core's own
  "is TE installed?" probes keep answering no.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import time
import types
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_DEVICE_MODE: TorchFunctionMode | None = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_applied() -> bool:
    return _APPLIED


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _to_cpu_device(device: Any) -> Any:
    if _is_cuda_device(device):
        return torch.device("cpu")
    # An integer device index means "cuda:<index>" to torch.
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call in the process.

    Megatron allocates with ``device="cuda"`` / ``device=torch.cuda.current_device()`` and calls
    ``.cuda()`` in optimizer, schedule and checkpoint code; clip_grads asserts that gradients are
    ``torch.cuda.FloatTensor``. Rewriting at the torch-function level fixes all of them without
    forking those modules.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and (
            _is_cuda_device(args[1]) or (isinstance(args[1], int) and not isinstance(args[1], bool))
        ):
            args = (args[0], torch.device("cpu"), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # ``tensor.type()`` with no argument reports the type name; Megatron asserts on the
            # CUDA name. Asking for a conversion (``tensor.type(dtype)``) is passed through.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.type and len(args) > 1 and isinstance(args[1], str):
            args = (args[0], args[1].replace("torch.cuda.", "torch."), *args[2:])
        return func(*args, **kwargs)


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event`` measuring wall-clock time in milliseconds."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: "_CpuEvent") -> float:
        if self._time is None or end_event._time is None:
            raise RuntimeError("elapsed_time() needs both events to be recorded")
        return (end_event._time - self._time) * 1000.0


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event: Any = None) -> _CpuEvent:
        event = event or _CpuEvent()
        event.record()
        return event


class _NullContext:
    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def _get_rng_state_on_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_rng_state_on_cpu(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.Event = _CpuEvent
    cuda.Stream = _CpuStream
    cuda.current_stream = lambda device=None: _CpuStream()
    cuda.stream = _NullContext
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda device: None
    # Memory statistics are GPU-only; report zero instead of raising so that logging code paths
    # run unchanged. Our benchmarks measure process RSS on CPU (see nemo_dvpo.utils.memory).
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda device=None: 0)
    cuda.reset_peak_memory_stats = lambda device=None: None
    nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                 range=_NullContext, mark=lambda *a, **k: None)
    cuda.nvtx = nvtx


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _get_rng_state_on_cpu
    mcore_random._set_cuda_rng_state = _set_rng_state_on_cpu


def _contiguous_scatter(scatter):
    @functools.wraps(scatter)
    def wrapper(tensor, scatter_list=None, src=None, group=None, async_op=False, **kwargs):
        if scatter_list is not None:
            scatter_list = [chunk.contiguous() for chunk in scatter_list]
        return scatter(tensor, scatter_list, src=src, group=group, async_op=async_op, **kwargs)

    wrapper._nemo_dvpo_contiguous = True
    return wrapper


def _patch_gloo_scatter() -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    if not getattr(dist.scatter, "_nemo_dvpo_contiguous", False):
        dist.scatter = _contiguous_scatter(dist.scatter)
    if not getattr(c10d.scatter, "_nemo_dvpo_contiguous", False):
        c10d.scatter = _contiguous_scatter(c10d.scatter)


def _quiet_expected_warnings() -> None:
    """On CPU, megatron-core's "TE/apex not installed, falling back" notices are expected, not news."""
    for message in (r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed.*",
                    r".*legacy GroupedMLP will be deprecated.*",
                    r".*full scope is deprecated.*",
                    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
                    r".*`load_state_dict` is deprecated and will be removed.*"):
        warnings.filterwarnings("ignore", message=message)
    # megatron-bridge logs that CUDA-only fusions are unavailable; on CPU we turn them off ourselves.
    logging.getLogger("megatron.bridge.utils.fusions").setLevel(logging.ERROR)


def _patch_megatron_inference_checks() -> None:
    """The inference loop asserts ``tensor.is_cuda`` before broadcasting logits between pipeline
    stages; on CPU the same broadcast works under gloo, so keep only the not-None check."""
    from megatron.core.inference import communication_utils

    def _is_not_none(tensor: Any) -> None:
        assert tensor is not None

    communication_utils._is_cuda = _is_not_none


def apply() -> bool:
    """Apply the CPU compatibility layer once. Returns True if it is active.

    A no-op (returns False) when CUDA is available.
    """
    global _APPLIED, _DEVICE_MODE
    if cuda_available():
        return False
    if _APPLIED:
        return True
    _quiet_expected_warnings()
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_gloo_scatter()
    _patch_megatron_inference_checks()
    _DEVICE_MODE = _CudaToCpuMode()
    _DEVICE_MODE.__enter__()
    _APPLIED = True
    return True


def _transformer_engine_placeholder() -> dict[str, types.ModuleType]:
    """Inert ``transformer_engine`` modules for megatron-bridge's import-time references.

    Attributes are classes that cannot be instantiated, so ``isinstance`` checks are simply False
    and any real use fails with a clear message.
    """

    def make_module(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__nemo_dvpo_placeholder__ = True

        def __getattr__(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def refuse(*args: Any, **kwargs: Any):
                raise RuntimeError(
                    f"{name}.{attr} was used, but Transformer Engine is not installed "
                    "(it is GPU-only); use the local layer spec on this machine"
                )

            placeholder_cls = type(attr, (), {"__init__": refuse, "__module__": name})
            setattr(module, attr, placeholder_cls)
            return placeholder_cls

        module.__getattr__ = __getattr__
        return module

    root = make_module("transformer_engine")
    pytorch = make_module("transformer_engine.pytorch")
    ops = make_module("transformer_engine.pytorch.ops")
    root.pytorch = pytorch
    pytorch.ops = ops
    return {"transformer_engine": root, "transformer_engine.pytorch": pytorch,
            "transformer_engine.pytorch.ops": ops}


def transformer_engine_available() -> bool:
    try:
        module = importlib.import_module("transformer_engine.pytorch")
    except Exception:
        return False
    return not getattr(module, "__nemo_dvpo_placeholder__", False)


def _import_with_te_placeholder(*names: str) -> list[types.ModuleType]:
    """Import ``names`` with the inert TE modules registered only for the duration of the import."""
    # Import the megatron-core modules that probe for TE first, so they record "no TE".
    importlib.import_module("megatron.core.models.gpt.gpt_layer_specs")
    importlib.import_module("megatron.core.transformer.transformer_layer")
    importlib.import_module("megatron.core.tensor_parallel")
    placeholders = _transformer_engine_placeholder()
    previous = {name: sys.modules.get(name) for name in placeholders}
    sys.modules.update(placeholders)
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@functools.lru_cache(maxsize=None)
def import_megatron_bridge() -> types.ModuleType:
    """Import ``megatron.bridge``, with a transient TE placeholder where TE is absent."""
    if transformer_engine_available():
        return importlib.import_module("megatron.bridge")
    bridge, _ = _import_with_te_placeholder("megatron.bridge", "megatron.bridge.models.conversion.auto_bridge")
    return bridge


@functools.lru_cache(maxsize=None)
def import_megatron_bridge_peft() -> types.ModuleType:
    """Import ``megatron.bridge.peft.lora`` (it imports ``transformer_engine.pytorch`` unconditionally).

    Without TE, megatron-core's TE extension module still imports (its classes become mocks), so the PEFT
    utilities would believe TE is present and ``isinstance``-test layers against those mocks, which raises;
    they are told the truth.
    """
    import_megatron_bridge()
    if transformer_engine_available():
        return importlib.import_module("megatron.bridge.peft.lora")
    lora, peft_utils = _import_with_te_placeholder("megatron.bridge.peft.lora", "megatron.bridge.peft.utils")
    peft_utils.HAVE_TE = False
    return lora
