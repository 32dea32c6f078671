"""Per-token values for a rollout from a frozen value model: the ``ValueScorer`` interface (and rewards from it).

DVPO's only learning signal is a frozen Global Value Model. Whether it runs in this process at the
policy's layout, on its own tensor-parallel groups, or behind an HTTP server on other GPUs is a
deployment choice, so the recipe talks to a :class:`ValueScorer`:

* ``values(tokens, lengths) -> (batch, seq)`` fp32 values, 0 past each row's length. Collective over the
  caller's model-parallel group: every rank of the group calls it with the group's rollout.
* ``info``: what the scorer was trained on (:class:`ScorerInfo`), so a mismatch with the policy - another
  vocabulary, tokenizer or chat template - is refused before the first step instead of silently
  producing values for tokens the GVM never saw.

:class:`LocalValueModel` runs a value-model checkpoint (a GVM, a reward model) in this process;
:class:`nemo_dvpo.serving.gvm_client.RemoteGVM` asks a server (``examples/serve_gvm.py``) - it lives beside the
server, which owns the wire protocol, and serving sits above this package. Both score with
:func:`nemo_dvpo.models.value_model.sequence_values`, so they return the same bits. A reward model is a value
model read at each response's last token: :class:`RewardScorer` turns any value scorer into one.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch

from nemo_dvpo.utils.errors import CheckpointError, ConfigError, NemoDvpoError


class ScorerUnavailable(NemoDvpoError):
    """A scorer that could not answer (a GVM server that stayed away after every retry): the run stops at a
    checkpoint it can resume from, rather than failing."""


@dataclass(frozen=True)
class ScorerInfo:
    """What a value scorer expects of its inputs, and what is known of its values."""

    kind: str                             # "gvm" or "reward_model"
    checkpoint: str                       # where it was loaded from (a path, or the server's checkpoint id)
    vocab_size: int
    tokenizer_fingerprint: str            # :func:`tokenizer_fingerprint` of the tokenizer it was trained with
    chat_template: bool                   # trained on chat-templated prompts
    chat_template_fingerprint: Optional[str]
    value_stats: Optional[dict] = None    # mean/std of its values on its training responses
    eval_accuracy: Optional[dict] = None  # held-out pairwise accuracy recorded at training time

    def to_json(self) -> dict:
        return asdict(self)


class ValueScorer(Protocol):
    info: ScorerInfo

    def values(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per-token values (batch, seq) of right-padded sequences of ``lengths`` tokens."""


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the token -> id map and the special tokens: equal exactly when two tokenizers encode alike."""
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return _digest({"vocab": sorted(tokenizer.get_vocab().items()), "special": special})


def chat_template_fingerprint(tokenizer) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    return _digest(template) if template else None


def check_scorer_matches_policy(info: ScorerInfo, tokenizer, vocab_size: int, chat_template: bool,
                                where: str) -> None:
    """Refuse a scorer that would see different tokens than the policy produces, naming the difference."""
    if info.vocab_size != vocab_size:
        raise CheckpointError(f"the GVM at {where} has vocabulary size {info.vocab_size}, the policy {vocab_size}: "
                              "GVM and policy must share the tokenizer")
    if info.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        raise CheckpointError(f"the GVM at {where} was trained with another tokenizer than the policy's "
                              f"(fingerprint {info.tokenizer_fingerprint} vs {tokenizer_fingerprint(tokenizer)})")
    if info.chat_template != chat_template:
        raise ConfigError(f"data.chat_template={chat_template} but the GVM at {where} was trained with "
                          f"chat_template={info.chat_template}: they must see the same tokens")
    if chat_template and info.chat_template_fingerprint != chat_template_fingerprint(tokenizer):
        raise CheckpointError(f"the GVM at {where} was trained with another chat template than the policy's")


def value_model_info(path: str, kinds: tuple[str, ...] = ("gvm",)) -> ScorerInfo:
    """The :class:`ScorerInfo` of a value-model checkpoint folder (its metadata and saved tokenizer), which must
    be of one of ``kinds``."""
    from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_metadata, read_checkpoint_model_config
    from nemo_dvpo.models.sources import load_tokenizer

    metadata = read_checkpoint_metadata(path)
    if metadata["kind"] not in kinds:
        raise CheckpointError(f"{path} holds a {metadata['kind']!r} checkpoint, not a "
                              f"{' or '.join(repr(kind) for kind in kinds)} one")
    model_cfg = read_checkpoint_model_config(path)
    if model_cfg.tokenizer is None:
        raise CheckpointError(f"the GVM checkpoint {path} holds no tokenizer")
    tokenizer = load_tokenizer(model_cfg.tokenizer)
    gvm = metadata.get("gvm") or {}
    return ScorerInfo(kind=metadata["kind"], checkpoint=str(path), vocab_size=model_cfg.vocab_size,
                      tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                      chat_template=bool(gvm.get("chat_template", True)),
                      chat_template_fingerprint=chat_template_fingerprint(tokenizer),
                      value_stats=gvm.get("value_stats"), eval_accuracy=gvm.get("eval_accuracy"))


class LocalValueModel:
    """A frozen value-model checkpoint in this process: at the current (policy) layout, or on its own groups.

    ``tensor_parallel=None`` builds it at the global tensor/pipeline layout; a number builds it on process
    groups of its own at that TP size without pipeline stages (:func:`standalone_model_groups`).
    ``offload`` keeps its weights in CPU memory between forward passes (GPU only).
    """

    def __init__(self, path: str, precision: str, seq_length: int, *, kinds: tuple[str, ...] = ("gvm",),
                 tensor_parallel: Optional[int] = None, rows: int = 8, bucket: int = 64, offload: bool = False):
        from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config
        from nemo_dvpo.checkpointing.model_checkpoint import load_value_model
        from nemo_dvpo.models.value_model import canonical_length
        from nemo_dvpo.training.offload import move_parameters, offload_enabled

        self.info = value_model_info(path, kinds)
        model_cfg = read_checkpoint_model_config(path)
        self.groups = None if tensor_parallel is None else _own_groups(model_cfg, tensor_parallel)
        # Built for a multiple of ``bucket``: every sequence up to ``seq_length`` has its canonical shape.
        self.model = load_value_model(model_cfg, init_from=path, seq_length=canonical_length(seq_length, bucket),
                                       pg_collection=self.groups)
        for module in self.model:
            module.eval()
            module.requires_grad_(False)
        self.rows, self.bucket, self.offload = rows, bucket, offload
        if offload_enabled(offload):
            move_parameters(self.model, "cpu")

    def values(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from nemo_dvpo.models.value_model import sequence_values
        from nemo_dvpo.training.offload import offloaded

        with offloaded(self.model, enabled=self.offload):
            return sequence_values(self.model, tokens, lengths, rows=self.rows, bucket=self.bucket,
                                   pg_collection=self.groups)


class RewardScorer:
    """A reward model's scores: the value of each sequence's last token (``lengths - 1``), one per row."""

    def __init__(self, scorer: ValueScorer):
        self.scorer = scorer
        self.info = scorer.info

    def scores(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        values = self.scorer.values(tokens, lengths)
        return values.gather(1, (lengths.to(values.device) - 1).clamp(min=0)[:, None]).squeeze(1)


def _own_groups(model_cfg, tensor_parallel: int):
    import torch.distributed as dist

    from nemo_dvpo.utils.distributed import (
        ParallelConfig,
        print_rank_zero,
        standalone_model_groups,
        validate_parallel_layout,
    )

    try:
        validate_parallel_layout(dist.get_world_size(), ParallelConfig(tensor_parallel, 1),
                                 num_attention_heads=model_cfg.num_attention_heads,
                                 num_query_groups=model_cfg.num_query_groups)
    except ConfigError as error:
        raise ConfigError(f"gvm_tensor_model_parallel_size={tensor_parallel}: {error}") from None
    print_rank_zero(f"[dvpo] the GVM runs at its own layout: tensor-parallel {tensor_parallel}, data-parallel "
                    f"{dist.get_world_size() // tensor_parallel}, no pipeline parallelism")
    return standalone_model_groups(tensor_parallel)


def frozen_value_model(path: str, kinds: tuple[str, ...], cfg, policy_cfg, tokenizer, **kwargs) -> LocalValueModel:
    """A frozen GVM or reward model in this process for an RL run (``cfg``: its
    :class:`~nemo_dvpo.rlhf.config.PolicyRunConfig`), refused unless it reads the policy's tokens."""
    scorer = LocalValueModel(path, policy_cfg.precision, cfg.seq_length, kinds=kinds,
                             rows=cfg.rollout.forward_micro_batch_size, offload=cfg.offload_frozen_models, **kwargs)
    check_scorer_matches_policy(scorer.info, tokenizer, policy_cfg.vocab_size, cfg.data.chat_template, where=path)
    return scorer


@contextmanager
def stop_on_outage(save: Callable[[int], Path], completed: int) -> Iterator[None]:
    """A value or reward server that stays unreachable ends the run with a checkpoint after the last full step
    (``completed`` steps, written by ``save``), and an error that says how to continue."""
    try:
        yield
    except ScorerUnavailable as error:
        saved = save(completed) if completed > 0 else None
        where = (f"with a checkpoint after step {completed} ({saved})" if saved else
                 "before its first step (nothing to save)")
        raise NemoDvpoError(f"{error}. The run stopped {where}: restart the server, then run the same command "
                            "with resume=true to continue") from None
