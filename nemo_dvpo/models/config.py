"""Model presets: the shape of a Llama/Mistral-family GPT and where its weights come from.

A preset (``nemo_dvpo/conf/model/<name>.yaml``) names a ``source`` for the weights - a Hugging Face folder, a
hub id, a ``.gguf`` file, or ``package://<python package>/<file>.gguf`` for a model that ships
inside an installed package - and the architecture's shape. Any preset can also be built with
random weights (``source: null`` or ``random_init: true``) for shape checks and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from nemo_dvpo.utils.config import from_dict
from nemo_dvpo.utils.errors import ConfigError
from nemo_dvpo.utils.paths import CONF_DIR

PRESET_DIR = CONF_DIR / "model"

Architecture = Literal["llama", "mistral"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    # The preset's (or Hugging Face folder's) name, recorded in checkpoints.
    name: str
    # The Hugging Face model family the weights load from and export to (LlamaForCausalLM, MistralForCausalLM).
    architecture: Architecture
    # Transformer layers.
    num_layers: int
    # Width of the residual stream.
    hidden_size: int
    # Width of the SwiGLU MLP's hidden layer.
    ffn_hidden_size: int
    # Query heads per layer.
    num_attention_heads: int
    # Key/value heads (grouped-query attention; num_attention_heads for plain multi-head attention).
    num_query_groups: int
    # Rows of the embedding and the output layer.
    vocab_size: int
    # The context length in tokens.
    max_position_embeddings: int
    # RoPE's base (theta).
    rotary_base: float = 10000.0
    # RMSNorm's epsilon.
    norm_epsilon: float = 1e-5
    # Share the input embedding's weights with the output layer.
    tie_word_embeddings: bool = False
    # Llama 3.1-style RoPE scaling (the Hugging Face config's rope_scaling; null: none).
    rope_scaling: Optional[dict] = None
    # Mistral's sliding-window attention width in tokens (null: full causal attention).
    sliding_window: Optional[int] = None
    # Where the weights come from; null means random initialisation.
    source: Optional[str] = None
    # Where the tokenizer comes from; defaults to ``source``.
    tokenizer: Optional[str] = None
    # Build with random weights even when a source is named (shape checks, benchmarks).
    random_init: bool = False
    # Parameter / compute precision. bf16 and fp16 wrap the model in Megatron's Float16Module.
    precision: Precision = "fp32"
    # Activation recomputation in training: "full" keeps only each transformer layer's input during the
    # forward pass and recomputes the layer in backward (Megatron's uniform full recompute, one layer per
    # checkpoint) - activation memory of one layer instead of all of them, for about one more forward pass.
    # Frozen models (reference, GVM, reward model) and generation run without gradients and are unaffected.
    activation_recompute: Literal["none", "full"] = "none"
    # The beginning-of-sequence token; null takes it from the tokenizer.
    bos_token_id: Optional[int] = None
    # The end-of-sequence token; null takes it from the tokenizer.
    eos_token_id: Optional[int] = None
    # More entries for the Hugging Face config written on export (they override the derived ones).
    extra_hf_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokenizer_source(self) -> Optional[str]:
        return self.tokenizer or self.source

    @property
    def loads_weights(self) -> bool:
        return self.source is not None and not self.random_init

    def to_hf_config(self):
        """The equivalent ``transformers`` config, which megatron-bridge maps to Megatron."""
        from transformers import LlamaConfig, MistralConfig

        common: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_epsilon,
            rope_theta=self.rotary_base,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            dtype="float32" if self.precision == "fp32" else
            ("bfloat16" if self.precision == "bf16" else "float16"),
        )
        if self.bos_token_id is not None:
            common["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            common["eos_token_id"] = self.eos_token_id
        common.update(self.extra_hf_config)
        if self.architecture == "llama":
            config = LlamaConfig(rope_scaling=self.rope_scaling, attention_bias=False, mlp_bias=False, **common)
            config.architectures = ["LlamaForCausalLM"]
        else:
            config = MistralConfig(sliding_window=self.sliding_window, **common)
            config.architectures = ["MistralForCausalLM"]
        return config

    @classmethod
    def from_hf_config(cls, hf_config, name: str = "hf", **overrides: Any) -> "ModelConfig":
        """The shape of an existing ``transformers`` Llama or Mistral config."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in ("llama", "mistral"):
            architectures = getattr(hf_config, "architectures", None) or [model_type]
            raise ConfigError(
                f"unsupported architecture {architectures[0]!r} (model_type={model_type!r}); "
                "nemo_dvpo supports Llama- and Mistral-family causal LMs"
            )
        values = dict(
            name=name,
            architecture=model_type,
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            ffn_hidden_size=hf_config.intermediate_size,
            num_attention_heads=hf_config.num_attention_heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            vocab_size=hf_config.vocab_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            rotary_base=float(getattr(hf_config, "rope_theta", 10000.0)),
            norm_epsilon=float(getattr(hf_config, "rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            rope_scaling=getattr(hf_config, "rope_scaling", None),
            sliding_window=getattr(hf_config, "sliding_window", None) if model_type == "mistral" else None,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=_first_token_id(getattr(hf_config, "eos_token_id", None)),
        )
        values.update(overrides)
        return cls(**values)

    SHAPE_FIELDS = ("architecture", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "tie_word_embeddings")
    # How a model runs, not what it is: the caller's choice, over what a checkpoint was saved with.
    RUN_SETTINGS = ("precision", "activation_recompute")

    def differing_shape_fields(self, other: "ModelConfig") -> list[str]:
        """The fields that decide the weights' shapes and differ between the two configs."""
        return [name for name in self.SHAPE_FIELDS if getattr(self, name) != getattr(other, name)]

    def shape_mismatches(self, other: "ModelConfig") -> list[str]:
        return [f"{name}: {getattr(self, name)} vs {getattr(other, name)}"
                for name in self.differing_shape_fields(other)]


def _first_token_id(token_id: Any) -> Optional[int]:
    if isinstance(token_id, (list, tuple)):
        return int(token_id[0]) if token_id else None
    return None if token_id is None else int(token_id)


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_model_config(preset_or_path: str | Path | dict, **overrides: Any) -> ModelConfig:
    """A ``ModelConfig`` from a preset name, a YAML path, or a mapping (e.g. the Hydra ``model`` node)."""
    from omegaconf import OmegaConf

    if isinstance(preset_or_path, dict) or OmegaConf.is_config(preset_or_path):
        data = OmegaConf.to_container(OmegaConf.create(preset_or_path), resolve=True) \
            if OmegaConf.is_config(preset_or_path) else dict(preset_or_path)
        where = "model"
    else:
        path = Path(preset_or_path)
        if path.suffix not in (".yaml", ".yml"):
            path = PRESET_DIR / f"{preset_or_path}.yaml"
            if not path.exists():
                raise ConfigError(
                    f"unknown model preset {str(preset_or_path)!r}; available: {', '.join(available_presets())}"
                )
        elif not path.exists():
            raise ConfigError(f"model config file {path} does not exist")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        where = f"{path}: model"
    data.update(overrides)
    return from_dict(ModelConfig, data, where)
