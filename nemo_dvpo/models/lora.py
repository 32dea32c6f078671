"""LoRA adapters on the Megatron GPT models (megatron-bridge's PEFT), and what training with them needs.

:func:`apply_lora` wraps the chosen linear layers (attention ``linear_qkv`` / ``linear_proj``, MLP ``linear_fc1``
/ ``linear_fc2``) of a built model in megatron-bridge's ``LoRALinear``: the layer's output plus
``alpha / dim * B(A(x))``, with ``A`` and ``B`` tensor-parallel like the layer they adapt and ``B`` zero at the
start, so a fresh adapter leaves the model's outputs unchanged. Every other weight is frozen; only the adapters
(and a value model's head, which is new) train, so Megatron DDP's gradient buffers and the optimizer state cover
only them.

* The reference policy of an RL or DPO run is the policy with its adapters off (:func:`adapters_disabled`): the
  base weights are never updated, so no second copy is kept.
* Training checkpoints hold the whole adapted model - frozen base and adapters - plus ``"lora"`` in their
  metadata, so a run resumes from them exactly and every tool that reads a model checkpoint can still read
  them: loading one into a model without adapters merges the adapters on the fly (see
  :func:`nemo_dvpo.checkpointing.model_checkpoint.load_sharded_weights`).
* Final checkpoints (``run_dir/final``) and Hugging Face exports hold merged weights (:func:`merge_adapters`):
  a plain model that evaluation, serving, ``init_from`` and the conversion tools use unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from nemo_dvpo.utils.errors import ConfigError

# The linear layers of a Llama/Mistral layer that can carry adapters (megatron-core's names).
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    # Train low-rank adapters instead of the weights. In RL and DPO the reference policy is then the policy
    # with its adapters off; a value model's head still trains fully.
    enabled: bool = False
    # Rank of the adapters (a multiple of the tensor-parallel size: A is split across TP ranks along it).
    dim: int = 16
    # The adapter's output is scaled by alpha / dim.
    alpha: float = 32.0
    # Dropout on the adapter's input while training. Above 0 the policy's log-probs in the update are no
    # longer those it sampled with, so PPO's ratio starts away from 1.
    dropout: float = 0.0
    # Layers to adapt: any of linear_qkv, linear_proj, linear_fc1, linear_fc2, or megatron-bridge wildcard
    # patterns over full module names (e.g. "*.layers.0.*.linear_qkv").
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"lora.dim must be >= 1, got {self.dim}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one layer")
        for name in self.target_modules:
            if "*" not in name and name not in LORA_TARGETS:
                raise ConfigError(f"lora.target_modules: unknown layer {name!r}; choose from "
                                  f"{', '.join(LORA_TARGETS)} or give a wildcard pattern")


def _peft():
    from nemo_dvpo.utils import cpu_compat

    lora = cpu_compat.import_megatron_bridge_peft()
    from megatron.bridge.peft.adapter_wrapper import AdapterWrapper

    return lora.LoRA, AdapterWrapper


def _gpt_modules(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
    from nemo_dvpo.models.builder import unwrap_model

    return [unwrap_model(chunk) for chunk in model]


def adapter_modules(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The adapter-wrapped layers of ``model`` (empty without LoRA)."""
    _, AdapterWrapper = _peft()
    return [module for gpt in _gpt_modules(model) for module in gpt.modules() if isinstance(module, AdapterWrapper)]


def has_adapters(model: list[torch.nn.Module]) -> bool:
    return bool(adapter_modules(model))


def lora_config_of(model: list[torch.nn.Module]):
    """The :class:`LoRAConfig` the model's adapters were made with (None without adapters)."""
    return getattr(_gpt_modules(model)[0], "lora_config", None)


def _load_base_keys_into_wrapped_layer(state_dict, prefix, *args) -> None:
    """A load-state-dict pre-hook for an adapter-wrapped layer.

    The wrapper saves the base layer's tensors under the layer's own names (``...linear_qkv.weight``), as a
    model without adapters does - that is what lets checkpoints of either kind share keys - but the base
    layer's parameters now live under ``...linear_qkv.to_wrap.``; torch's loader needs them there.
    """
    for key in [key for key in state_dict if key.startswith(prefix)]:
        rest = key[len(prefix):]
        if not rest.startswith(("to_wrap.", "adapter.")):
            state_dict[f"{prefix}to_wrap.{rest}"] = state_dict.pop(key)


def _contiguous_logits_gradient(output_layer, args, output) -> None:
    """Forward hook on a frozen output layer: its logits' gradient reaches megatron-core's backward contiguous.

    GPTModel returns the output layer's (seq, batch, vocab) logits transposed to (batch, seq, vocab), so their
    gradient comes back as a transposed view, and megatron-core computes the input's gradient as
    ``grad.matmul(weight)``. With a trainable weight torch.matmul folds the 3-D gradient into one matrix product
    (copying it); with a frozen one it does not fold a non-contiguous tensor and runs a batched product over the
    positions, the vocab x hidden weight broadcast to each: the whole weight is read once per position (SmolLM2,
    2-core CPU, 64 positions x 2 rows, profiled: 146 ms against the forward's 27 ms). A contiguous copy of the
    gradient (one logits-sized tensor) makes it one product again; in the peer setting's LoRA update that took
    0.3-0.4 s off 13.5 s and 115-165 MiB off the peak (docs/benchmarks.md, "LoRA's frozen output layer").
    """
    logits = output[0]
    if logits.requires_grad:
        logits.register_hook(torch.Tensor.contiguous)


def apply_lora(model: list[torch.nn.Module], cfg: LoRAConfig) -> list[torch.nn.Module]:
    """Wrap ``cfg.target_modules`` of every chunk in LoRA adapters, in place; freeze everything else.

    Call before Megatron DDP wraps the model (its gradient buffers must cover only what trains). A value
    model's head (a module with ``lora_trains_fully = True``) stays trainable: it is new, there is nothing to
    adapt. The chunks' train/eval modes are left as they were.
    """
    from megatron.core import parallel_state

    LoRA, AdapterWrapper = _peft()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if cfg.dim % tp:
        raise ConfigError(f"lora.dim={cfg.dim} must be a multiple of the tensor-parallel size {tp}")
    modes = [chunk.training for chunk in model]
    peft = LoRA(target_modules=list(cfg.target_modules), dim=cfg.dim, alpha=cfg.alpha, dropout=cfg.dropout)
    # megatron-bridge logs one line per adapted layer on the root logger (hundreds for an 8B model).
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        peft(model, training=True)
    finally:
        logging.disable(previous)
    wrapped = 0
    for gpt in _gpt_modules(model):
        for module in gpt.modules():
            if isinstance(module, AdapterWrapper):
                module._register_load_state_dict_pre_hook(_load_base_keys_into_wrapped_layer)
                wrapped += 1
        for module in gpt.modules():
            if getattr(module, "lora_trains_fully", False):
                module.requires_grad_(True)
        output_layer = getattr(gpt, "output_layer", None)
        if output_layer is not None and not any(param.requires_grad for param in output_layer.parameters()):
            output_layer.register_forward_hook(_contiguous_logits_gradient)
        gpt.lora_config = dataclasses.replace(cfg, enabled=True)
    for chunk, mode in zip(model, modes):
        chunk.train(mode)
    if wrapped == 0:
        raise ConfigError(f"lora.target_modules={list(cfg.target_modules)} matched no layer of the model")
    return model


@contextmanager
def adapters_disabled(model: list[torch.nn.Module]) -> Iterator[list[torch.nn.Module]]:
    """``model`` computing with its base weights only (the LoRA policy's reference), inside the block."""
    modules = adapter_modules(model)
    for module in modules:
        module.disable_adapter_layers()
    try:
        yield model
    finally:
        for module in modules:
            module.enable_adapter_layers()


def _gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """The full tensor of row shards split across ``group`` (rank order), on every rank."""
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _merged_delta(wrapper) -> torch.Tensor:
    """``alpha / dim * B @ A`` for this rank's shard of the wrapped layer's weight.

    A column-parallel layer (qkv, fc1) holds rows of the weight; its adapter's ``B`` holds the same rows and
    ``A`` is split along the rank, so ``A`` is gathered. A row-parallel layer (proj, fc2) holds columns; its
    ``A`` holds the same columns and ``B`` is split along its rows, so ``B`` is gathered.
    """
    adapter = wrapper.adapter
    a, b = adapter.linear_in.weight.float(), adapter.linear_out.weight.float()
    if adapter.input_is_parallel:
        b = _gather_rows(b, adapter.linear_out.tp_group)
    else:
        a = _gather_rows(a, adapter.linear_in.tp_group)
    return (adapter.alpha / adapter.dim) * (b @ a)


@torch.no_grad()
def merge_adapters(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Collective over tensor-parallel ranks: fold the adapters into the weights, in place, and remove them.

    The model is then a plain GPT (or value model) that computes what the adapted one did (up to fp32
    rounding: ``x(W + sBA)^T`` instead of ``xW^T + s(xA^T)B^T``) and saves, exports and serves like any other.
    Its parameters' ``requires_grad`` flags are left as they are.
    """
    _, AdapterWrapper = _peft()
    for gpt in _gpt_modules(model):
        replacements = [(parent, name, child) for parent in gpt.modules()
                        for name, child in parent.named_children() if isinstance(child, AdapterWrapper)]
        for parent, name, wrapper in replacements:
            weight = wrapper.to_wrap.weight
            weight.copy_((weight.float() + _merged_delta(wrapper).to(weight.device)).to(weight.dtype))
            setattr(parent, name, wrapper.to_wrap)
        if hasattr(gpt, "lora_config"):
            del gpt.lora_config
    return model
