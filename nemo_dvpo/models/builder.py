"""Build megatron-core GPT models for a ``ModelConfig`` through megatron-bridge.

The preset is turned into its ``transformers`` config; megatron-bridge maps that config to a
``GPTModelProvider`` (a megatron-core ``TransformerConfig``), which builds the ``GPTModel`` at the
current tensor/pipeline-parallel layout. Weights, when the preset names a source, are loaded
through the same bridge, so the mapping used for loading, exporting and building is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from nemo_dvpo.models import attention
from nemo_dvpo.models.attention import local_layer_spec
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.mlp import lean_swiglu_applies
from nemo_dvpo.models.sources import hf_folder_for, load_hf_config, load_hf_model
from nemo_dvpo.utils import cpu_compat
from nemo_dvpo.utils.errors import ConfigError

# Fusions that need Transformer Engine, apex or CUDA extensions; Megatron refuses them on CPU.
_CPU_UNSUPPORTED_FUSIONS = (
    "apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion",
    "bias_activation_fusion", "bias_dropout_fusion", "persist_layer_norm",
)


def unsupported_fusions(te_spec: bool) -> tuple[str, ...]:
    """The fusions this machine cannot run, which megatron-bridge's Llama/Mistral providers may switch on.

    Without CUDA: all of ``_CPU_UNSUPPORTED_FUSIONS``. With CUDA, those whose kernel comes from a package that is
    missing - megatron refuses them when the model is built rather than falling back: the RoPE fusion needs
    Transformer Engine's kernel (``TransformerConfig`` raises "apply_rope_fusion is not available"); the
    gradient-accumulation fusion needs TE's linear layers (the TE spec) or apex's ``fused_weight_gradient_mlp_cuda``
    (megatron's own linear layers raise); the persistent layer norm needs TE's norm or apex's (the local spec's
    torch norm asserts it is off). A GPU machine without TE and apex (CUDA torch from PyPI) runs the local spec.
    """
    if not torch.cuda.is_available():
        return _CPU_UNSUPPORTED_FUSIONS
    from megatron.core.fusions.fused_layer_norm import HAVE_FUSED_LAYER_NORM
    from megatron.core.models.common.embeddings import rope_utils

    cpu_compat.import_megatron_bridge()
    from megatron.bridge.utils.fusions import can_enable_gradient_accumulation_fusion

    unsupported = []
    if rope_utils.fused_apply_rotary_pos_emb is None:
        unsupported.append("apply_rope_fusion")
    if not te_spec and not can_enable_gradient_accumulation_fusion():
        unsupported.append("gradient_accumulation_fusion")
    if not te_spec and not HAVE_FUSED_LAYER_NORM:
        unsupported.append("persist_layer_norm")
    return tuple(unsupported)


def _bridge_classes():
    cpu_compat.import_megatron_bridge()
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import transformer_engine_layer_spec
    from megatron.bridge.models.hf_pretrained.causal_lm import PreTrainedCausalLM

    return AutoBridge, PreTrainedCausalLM, transformer_engine_layer_spec


def use_transformer_engine() -> bool:
    """TE layer spec when TE imports (GPU containers); the local spec otherwise."""
    return torch.cuda.is_available() and cpu_compat.transformer_engine_available()


def layer_spec_for(kind: str) -> Callable:
    """The layer-spec function of ``kind``: "te" (Transformer Engine: fused layer-norm + linear, TE attention;
    needs CUDA and TE) or "local" (megatron-core's own modules with nemo_dvpo.models.attention's). Passed as
    ``build_gpt_model(..., transformer_layer_spec=layer_spec_for(kind))`` it overrides the automatic choice, so
    one process can build both and compare them (benchmarks/gpu_acceptance.py)."""
    if kind == "local":
        return local_layer_spec
    if kind == "te":
        if not use_transformer_engine():
            raise ConfigError("the Transformer Engine layer spec needs CUDA and transformer_engine; "
                              "this machine has " + ("no CUDA" if not torch.cuda.is_available() else "no TE"))
        return _bridge_classes()[2]
    raise ConfigError(f"unknown layer spec {kind!r}; choose 'te' or 'local'")


def resolve_hf_config(model_cfg: ModelConfig):
    """The HF config to build from: the source's own when weights are loaded, else the preset's."""
    if not model_cfg.loads_weights:
        return model_cfg.to_hf_config()
    hf_config = load_hf_config(model_cfg.source)
    mismatches = model_cfg.shape_mismatches(ModelConfig.from_hf_config(hf_config))
    if mismatches:
        raise ConfigError(
            f"model preset {model_cfg.name!r} does not match the checkpoint at {model_cfg.source}: "
            + "; ".join(mismatches)
        )
    return hf_config


def make_bridge(hf_config, hf_model: Optional[torch.nn.Module] = None, for_export: bool = False,
                name: Optional[str] = None, weights_folder: Optional[str] = None):
    """An AutoBridge for ``hf_config``; with ``hf_model`` it also carries that model's weights, with
    ``weights_folder`` (a folder of safetensors files) it reads them from there, one tensor at a time.

    ``for_export`` attaches a meta-device HF model: exporting needs the HF parameter names (the
    bridge orders its conversion tasks by them) but none of their memory. ``name`` is what the
    bridge's progress bar says it loads from.
    """
    AutoBridge, PreTrainedCausalLM, _ = _bridge_classes()
    if not getattr(hf_config, "architectures", None):
        raise ConfigError(f"the model config has no 'architectures' entry: {hf_config}")
    if not AutoBridge.supports(hf_config):
        raise ConfigError(
            f"unsupported architecture {hf_config.architectures[0]!r}; "
            "nemo_dvpo supports Llama- and Mistral-family causal LMs"
        )
    if weights_folder is not None:
        # No model attached: the bridge's state accessor then reads the folder's safetensors lazily.
        pretrained = PreTrainedCausalLM(model_name_or_path=weights_folder)
        pretrained.config = hf_config
        return AutoBridge(pretrained)
    if hf_model is None and not for_export:
        return AutoBridge.from_hf_config(hf_config)
    pretrained = PreTrainedCausalLM(model_name_or_path=name)
    pretrained._config = hf_config
    if hf_model is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            # Assigned directly: the ``model`` setter would try to move meta tensors to the CPU.
            pretrained._model = AutoModelForCausalLM.from_config(hf_config)
    else:
        pretrained.model = hf_model
    return AutoBridge(pretrained)


def params_dtype(precision: str) -> torch.dtype:
    """The dtype a model of ``model.precision`` holds its parameters in."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_provider(hf_config, model_cfg: ModelConfig, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                  seq_length: Optional[int] = None, **overrides: Any):
    """A finalized megatron-bridge ``GPTModelProvider`` for the current parallel layout."""
    provider = make_bridge(hf_config).to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size = tensor_parallel
    provider.pipeline_model_parallel_size = pipeline_parallel
    provider.sequence_parallel = False
    provider.seq_length = seq_length or min(model_cfg.max_position_embeddings, 4096)
    provider.transformer_layer_spec = layer_spec_for("te" if use_transformer_engine() else "local")
    provider.bf16 = model_cfg.precision == "bf16"
    provider.fp16 = model_cfg.precision == "fp16"
    provider.params_dtype = params_dtype(model_cfg.precision)
    provider.pipeline_dtype = provider.params_dtype
    # Dropout is off: RLHF log-probabilities must be deterministic functions of the weights.
    provider.hidden_dropout = 0.0
    provider.attention_dropout = 0.0
    if model_cfg.activation_recompute == "full":
        provider.recompute_granularity, provider.recompute_method, provider.recompute_num_layers = \
            "full", "uniform", 1
    if not torch.cuda.is_available():
        provider.use_cpu_initialization = True
    for name, value in overrides.items():
        setattr(provider, name, value)
    # After the overrides: they may choose the layer spec, on which the fusions' availability depends.
    for name in unsupported_fusions(te_spec=provider.transformer_layer_spec is not local_layer_spec):
        setattr(provider, name, False)
    if provider.transformer_layer_spec is attention.local_layer_spec and lean_swiglu_applies(provider):
        # Our local spec's SwiGLU keeps only its input for backward (models/mlp.py); megatron's MLP takes an
        # activation module from the spec only under this flag, named for Transformer Engine's. Compared with the
        # function itself, not this module's name for it, which tests and benchmarks rebind to the stock spec.
        provider.use_te_activation_func = True
    provider.finalize()
    return provider


def build_gpt_model(model_cfg: ModelConfig, *, hf_config=None, wrap_with_ddp: bool = False,
                    ddp_config=None, seq_length: Optional[int] = None, load_weights: bool = True,
                    transform: Optional[Callable[[list[torch.nn.Module]], list[torch.nn.Module]]] = None,
                    pg_collection=None, lora=None, **provider_overrides: Any) -> list[torch.nn.Module]:
    """Build the Megatron GPT model (one module per virtual pipeline stage) at the current layout.

    Must be called after :func:`nemo_dvpo.utils.distributed.initialize_distributed`. Order:
    build (wrapped in Float16Module for bf16/fp16), load the weights named by ``model_cfg.source``
    (unless ``load_weights`` is False or the preset asks for random initialisation), apply
    ``transform`` (e.g. replace the output layer with a value head), add LoRA adapters when ``lora``
    (a :class:`nemo_dvpo.models.lora.LoRAConfig`) is enabled, then wrap in Megatron DDP. Wrapping last
    means DDP's gradient buffers cover exactly the final set of trainable parameters.

    ``pg_collection`` (from :func:`nemo_dvpo.utils.distributed.standalone_model_groups`) lays the
    model out on its own process groups instead of the global parallel state.
    """
    from megatron.core import parallel_state

    if pg_collection is None:
        tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
        pipeline_parallel = parallel_state.get_pipeline_model_parallel_world_size()
    else:
        tensor_parallel, pipeline_parallel = pg_collection.tp.size(), pg_collection.pp.size()
    hf_config = hf_config if hf_config is not None else resolve_hf_config(model_cfg)
    provider = make_provider(hf_config, model_cfg, tensor_parallel=tensor_parallel,
                             pipeline_parallel=pipeline_parallel, seq_length=seq_length, **provider_overrides)
    model = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=not torch.cuda.is_available(), pg_collection=pg_collection)
    if load_weights and model_cfg.loads_weights:
        load_hf_weights_into(model, model_cfg.source, hf_config)
    if transform is not None:
        model = transform(model)
    if lora is not None and lora.enabled:
        from nemo_dvpo.models.lora import apply_lora

        model = apply_lora(model, lora)
    if wrap_with_ddp:
        model = wrap_for_training(model, ddp_config)
    return model


def wrap_for_training(model: list[torch.nn.Module], ddp_config=None,
                      local_gradients_on_one_rank: bool = True) -> list[torch.nn.Module]:
    """Megatron DDP around each model chunk (data-parallel replicas start from rank 0's weights), or LocalGradients.

    A model trained on one rank in fp32 gets :class:`nemo_dvpo.models.local_gradients.LocalGradients`
    instead (unless ``local_gradients_on_one_rank`` is False): the same interface, gradients in ``param.grad``
    rather than in a contiguous buffer resident for the whole run. bf16/fp16 models keep DDP's fp32 buffer
    (``param.grad`` would accumulate micro-batches in bf16), and so does ``gradient_accumulation_fusion``
    (its kernels write ``main_grad``).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    from nemo_dvpo.models.local_gradients import LocalGradients, trains_on_one_rank

    ddp_config = ddp_config or DistributedDataParallelConfig()
    config = get_model_config(model[0])
    trained = [param for module in model for param in module.parameters() if param.requires_grad]
    if (local_gradients_on_one_rank and trains_on_one_rank() and len(model) == 1
            and not ddp_config.use_distributed_optimizer and not config.gradient_accumulation_fusion
            and all(param.dtype == torch.float32 for param in trained)):
        return [LocalGradients(config, ddp_config, model[0])]
    wrapped = [
        DistributedDataParallel(config=get_model_config(module), ddp_config=ddp_config, module=module,
                                # Only the first chunk buckets gradients (Megatron's convention for VPP).
                                disable_bucketing=index > 0)
        for index, module in enumerate(model)
    ]
    for module in wrapped:
        module.broadcast_params()
    return wrapped


def load_hf_weights_into(model: list[torch.nn.Module], source: str, hf_config=None) -> None:
    """Copy the weights of the HF/GGUF model at ``source`` into a Megatron model (any TP/PP).

    A folder with safetensors files (a GGUF source's cached folder is one) is read tensor by tensor through
    megatron-bridge's ``SafeTensorsStateSource``, as ``AutoBridge.from_hf_pretrained`` does: no ``transformers``
    model is instantiated, so a rank never holds a full fp32 copy of the model besides its own shard (32 GB for
    Llama-3-8B on every rank). Each tensor is copied into the Megatron parameter as stored (bf16 or fp32), which
    is exactly what loading the HF model in fp32 first gave: widening bf16 is exact, and a bf16 parameter
    rounds fp32 the same way either way. Other sources (``.bin`` weights, hub ids) load the HF model first.
    """
    hf_config = hf_config if hf_config is not None else load_hf_config(source)
    resolved = hf_folder_for(source)
    if resolved.kind == "hf_folder" and any(Path(resolved.location).glob("*.safetensors")):
        make_bridge(hf_config, weights_folder=resolved.location).load_hf_weights(model)
        return
    hf_model = load_hf_model(source, dtype=torch.float32)
    make_bridge(hf_config, hf_model, name=source).load_hf_weights(model)
    del hf_model


def without_data_parallel(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The model chunks without their data-parallel wrappers (Megatron DDP or LocalGradients; Float16Module
    stays). For megatron-core's inference and megatron-bridge's export, which unwrap only the wrapper classes
    they know."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    chunks = []
    for chunk in model:
        while isinstance(chunk, _BaseDataParallel):
            chunk = chunk.module
        chunks.append(chunk)
    return chunks


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def padded_vocab_size(model: list[torch.nn.Module]) -> int:
    """Vocabulary size of the model's output layer (the tokenizer's, padded for TP)."""
    return unwrap_model(model[0]).vocab_size
