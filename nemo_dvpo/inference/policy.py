"""A policy loaded for inference from whatever names it: a nemo_dvpo checkpoint, a Hugging Face model
(folder, ``.gguf`` file, ``package://`` source) or a preset name - at the current TP/PP layout.

The one policy loader for generation: the policy server (examples/serve_policy.py), the benchmark evaluation
(tools/eval_benchmarks.py) and the preference-data builder (tools/build_preference_data.py) all load here and
answer prompts with :func:`nemo_dvpo.inference.generation.generate` - or, after :func:`use_vllm_engine`, with
the vLLM engine the loaded weights were refitted into. The ids that end a reply follow the one
EOS rule, :func:`nemo_dvpo.models.sources.special_token_ids` (see :func:`stop_token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nemo_dvpo.utils.errors import ConfigError


@dataclass
class Policy:
    model: Any  # the Megatron model (list of modules) at this rank's layout
    model_cfg: Any  # its nemo_dvpo ModelConfig
    tokenizer: Any  # the Hugging Face tokenizer, with its chat template
    name: str  # what it is called in answers and by the OpenAI API
    eos_token_ids: list[int]  # the ids that end a reply (stop_token_ids)
    max_length: int  # prompt plus reply, in tokens (the length the model was built for)
    # A vLLM engine holding this policy's weights (use_vllm_engine): it draws the replies instead of ``model``.
    engine: Any = None


def is_model_checkpoint(spec: str) -> bool:
    return (Path(spec).expanduser() / "nemo_dvpo_checkpoint.json").is_file()


def policy_model_config(spec):
    """The ModelConfig ``spec`` names (read before distributed start-up: the layout check needs the shape).

    ``spec`` is a checkpoint folder, a Hugging Face folder / .gguf / ``package://`` source, a preset name, or a
    ModelConfig already composed (a Hydra ``model`` node with command-line overrides), taken as it is.
    """
    from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config
    from nemo_dvpo.models.config import ModelConfig, available_presets, load_model_config
    from nemo_dvpo.models.sources import load_hf_config

    if isinstance(spec, ModelConfig):
        return spec
    if not spec:
        raise ConfigError("no model given: a nemo_dvpo checkpoint folder, a Hugging Face folder or a preset name")
    if is_model_checkpoint(spec):
        return read_checkpoint_model_config(spec)
    if spec in available_presets() and not Path(spec).exists():
        return load_model_config(spec)
    return ModelConfig.from_hf_config(load_hf_config(spec), name=Path(spec).stem or spec, source=spec)


def policy_tokenizer(model_cfg):
    """The tokenizer of a policy's ModelConfig (``policy_model_config``): cheap, no weights are read."""
    from nemo_dvpo.models.sources import load_tokenizer

    if model_cfg.tokenizer_source is None:
        raise ConfigError(f"model {model_cfg.name!r} names no tokenizer (set the preset's tokenizer)")
    return load_tokenizer(model_cfg.tokenizer_source)


def stop_token_ids(tokenizer, model_cfg) -> list[int]:
    """The ids that end a reply: the EOS of the one rule (``special_token_ids``: the preset's, else the
    tokenizer's) and, where it differs, the tokenizer's own EOS - a chat model ends its turns with the preset's
    token but can still emit its tokenizer's, and decoding on past it would only produce text after the end."""
    from nemo_dvpo.models.sources import special_token_ids

    eos, _ = special_token_ids(tokenizer, model_cfg)
    return sorted({eos} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def load_policy(spec, parallel, max_length: Optional[int] = None, precision: Optional[str] = None,
                name: Optional[str] = None) -> Policy:
    """Collective: start the distributed state for ``parallel`` and load the model ``spec`` names (any
    :func:`policy_model_config` spec).

    ``max_length`` (prompt plus reply) defaults to what the model builder uses (the model's context,
    capped at 4096 tokens).
    """
    import dataclasses

    from nemo_dvpo.checkpointing.model_checkpoint import load_model_checkpoint
    from nemo_dvpo.models.builder import build_gpt_model, unwrap_model
    from nemo_dvpo.utils.distributed import initialize_distributed

    model_cfg = policy_model_config(spec)
    if precision is not None:
        model_cfg = dataclasses.replace(model_cfg, precision=precision)
    initialize_distributed(parallel, num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    build_kwargs = {"seq_length": max_length} if max_length else {}
    tokenizer = None
    if isinstance(spec, str) and is_model_checkpoint(spec):
        model, model_cfg, tokenizer = load_model_checkpoint(spec, precision=precision, **build_kwargs)
    else:
        model = build_gpt_model(model_cfg, **build_kwargs)
    if tokenizer is None:
        tokenizer = policy_tokenizer(model_cfg)
    module = model[0] if isinstance(model, (list, tuple)) else model
    built_length = unwrap_model(module).max_sequence_length
    return Policy(model=model, model_cfg=model_cfg, tokenizer=tokenizer, name=name or _default_name(spec),
                  eos_token_ids=stop_token_ids(tokenizer, model_cfg), max_length=built_length)


def vllm_dtype(model_cfg) -> str:
    """The vLLM dtype of a model's precision (the engine computes as the Megatron model would)."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[model_cfg.precision]


def use_vllm_engine(policy: Policy, spec, settings) -> Policy:
    """Hand ``policy``'s generation to a vLLM engine (``settings``: a ``VllmEngineConfig``; its own environment and
    process): started on the policy's architecture with random weights, refitted with the weights loaded here -
    so a checkpoint is answered with exactly what was trained, LoRA merged - after which the Megatron copy is
    dropped (the engine holds the weights now). One process: ``settings.tensor_parallel_size`` spreads the
    engine itself over GPUs. An unset ``settings.model`` is the policy's Hugging Face folder; ``max_model_len``
    is the policy's ``max_length``; on CPU an unset thread binding gives the engine this process's threads."""
    import dataclasses
    import gc

    import torch
    import torch.distributed as dist

    from nemo_dvpo.checkpointing.model_checkpoint import load_hf_config_from_checkpoint
    from nemo_dvpo.inference.vllm_engine import VllmEngine, refit_from_policy
    from nemo_dvpo.models.builder import resolve_hf_config
    from nemo_dvpo.models.sources import hf_folder_for

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(f"the vLLM engine answers from one process, this run has {dist.get_world_size()} ranks: "
                          "run without torchrun (the engine's tensor_parallel_size spreads it over GPUs)")
    if isinstance(spec, str) and is_model_checkpoint(spec):
        folder, hf_config = str(Path(spec) / "hf"), load_hf_config_from_checkpoint(spec)
    elif policy.model_cfg.source is not None:
        folder, hf_config = hf_folder_for(policy.model_cfg.source).location, resolve_hf_config(policy.model_cfg)
    else:
        raise ConfigError(f"model {policy.name!r} has no Hugging Face config to start a vLLM engine on "
                          "(a random-weight preset): convert it to a checkpoint first")
    settings = dataclasses.replace(settings, model=settings.model or folder, max_model_len=policy.max_length)
    if not torch.cuda.is_available() and settings.cpu_threads_bind is None:
        # On CPU the engine gets this process's threads (unbound; vLLM's default binding gives it one thread),
        # which sit idle while it answers.
        settings = dataclasses.replace(settings, cpu_threads_bind="nobind",
                                       cpu_threads=settings.cpu_threads or torch.get_num_threads())
    engine = VllmEngine(settings).start()
    try:
        stats = refit_from_policy(engine, policy.model, hf_config)
    except BaseException:
        engine.close()
        raise
    print(f"[vllm] {policy.name}: {stats.tensors} tensors ({stats.bytes / 2**20:.0f} MiB) refitted in "
          f"{stats.seconds:.1f} s; the engine answers from here on", flush=True)
    policy.model, policy.engine = None, engine
    gc.collect()
    return policy


def _default_name(spec) -> str:
    if not isinstance(spec, str):
        return spec.name
    path = Path(spec).expanduser()
    return path.resolve().name if path.exists() else spec
