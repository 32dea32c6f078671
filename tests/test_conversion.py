"""Hugging Face -> Megatron -> Hugging Face conversion: bit-exact round trips and clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemo_dvpo.models.config import load_model_config
from tests.conftest import REPO_ROOT, run_torchrun
from tests.distributed.common import random_hf_model

pytestmark = pytest.mark.slow  # every test here trains, converts or launches ranks (see pyproject.toml)


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _make_tiny_hf_folder(folder: Path, architecture: str, tokenizer_folder: str, dtype: torch.dtype = torch.float32,
                         safe_serialization: bool = True, random_norms: bool = False, **shape) -> Path:
    model_cfg = dataclasses.replace(load_model_config("tiny"), architecture=architecture, **shape)
    model = random_hf_model(model_cfg, seed=7).to(dtype)
    if random_norms:  # norms start at 1 in every framework: random ones show whether they were loaded at all
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny_hf_folder(request, tmp_path_factory, smollm2_hf_folder) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}_hf")
    return _make_tiny_hf_folder(folder, request.param, smollm2_hf_folder)


def _assert_bit_exact(original: Path, exported: Path) -> None:
    expected, actual = _hf_tensors(original), _hf_tensors(exported)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), f"{name} changed in the round trip"


def test_round_trip_is_bit_exact_and_loads_in_transformers(tiny_hf_folder, tmp_path, megatron_single_rank):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dvpo.checkpointing.conversion import convert_hf_to_megatron, export_megatron_to_hf

    convert_hf_to_megatron(str(tiny_hf_folder), tmp_path / "megatron")
    export_megatron_to_hf(tmp_path / "megatron", tmp_path / "exported")
    _assert_bit_exact(tiny_hf_folder, tmp_path / "exported")

    original_config = json.loads((tiny_hf_folder / "config.json").read_text())
    exported_config = json.loads((tmp_path / "exported" / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_size", "num_key_value_heads", "rope_theta",
                "tie_word_embeddings", "vocab_size"):
        assert exported_config[key] == original_config[key], key

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_hf_folder).chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt")
    generated = [AutoModelForCausalLM.from_pretrained(folder).generate(prompt, max_new_tokens=6, do_sample=False)
                 for folder in (tiny_hf_folder, tmp_path / "exported")]
    assert torch.equal(generated[0], generated[1])


def test_a_saved_gguf_tokenizer_keeps_its_ids_and_template_without_a_copy_of_the_model(tmp_path):
    from transformers import AutoTokenizer

    from nemo_dvpo.models.sources import load_tokenizer, save_tokenizer

    source = load_tokenizer(load_model_config("tiny").tokenizer_source)
    save_tokenizer(source, tmp_path)
    # transformers takes a GGUF file as the slow tokenizer's "vocabulary"; saving it would put the
    # whole quantised model (98 MB) into every checkpoint as tokenizer.model.
    assert not (tmp_path / "tokenizer.model").exists()
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) < 10_000_000
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Write 3 haikus about <|im_start|> naïve tokenizers, then stop."
    assert reloaded(text).input_ids == source(text).input_ids
    chat = [{"role": "user", "content": "Hi"}]
    assert (reloaded.apply_chat_template(chat, add_generation_prompt=True)
            == source.apply_chat_template(chat, add_generation_prompt=True))
    assert reloaded.eos_token == source.eos_token and reloaded.pad_token == source.pad_token


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2")], ids=["tp2", "pp2"])
def test_checkpoint_resaved_from_a_parallel_run_exports_bit_exact(layout, tmp_path, smollm2_hf_folder,
                                                                 megatron_single_rank):
    from nemo_dvpo.checkpointing.conversion import convert_hf_to_megatron, export_megatron_to_hf

    hf_folder = _make_tiny_hf_folder(tmp_path / "hf", "llama", smollm2_hf_folder)
    convert_hf_to_megatron(str(hf_folder), tmp_path / "tp1")
    run_torchrun("resave_checkpoint.py", 2, "--src", str(tmp_path / "tp1"), "--dst", str(tmp_path / "parallel"),
                 *layout, tmp_path=tmp_path)
    saved_with = json.loads((tmp_path / "parallel" / "nemo_dvpo_checkpoint.json").read_text())["saved_with"]
    assert 2 in saved_with.values()
    export_megatron_to_hf(tmp_path / "parallel", tmp_path / "exported")
    _assert_bit_exact(hf_folder, tmp_path / "exported")


@pytest.mark.parametrize("nproc, layout, stored, precision, tied", [
    (1, (), torch.float32, "fp32", False),
    (2, ("--tp", "2"), torch.bfloat16, "bf16", True),
    (2, ("--pp", "2"), torch.float32, "fp32", True),
], ids=["1rank-fp32", "tp2-bf16-stored-tied", "pp2-tied"])
def test_weights_streamed_from_safetensors_equal_the_instantiated_hf_models(nproc, layout, stored, precision, tied,
                                                                           tmp_path, smollm2_hf_folder):
    """The streamed load (no transformers model) fills every parameter on every rank exactly as copying from the
    HF model loaded in fp32 did: bf16-stored weights, a bf16 Megatron model, tied embeddings split over stages."""
    hf_folder = _make_tiny_hf_folder(tmp_path / "hf", "llama", smollm2_hf_folder, dtype=stored,
                                     tie_word_embeddings=tied, random_norms=True)
    result = run_torchrun("streamed_weights.py", nproc, "--folder", str(hf_folder), "--precision", precision,
                          *layout, tmp_path=tmp_path)
    expected_dtype = "torch.bfloat16" if precision == "bf16" else "torch.float32"
    for rank in result["ranks"]:
        assert rank["compared"] >= 10 and rank["differing"] == [], rank
        assert rank["left_as_built"] == [], rank  # every parameter was loaded, none kept its initial value
        assert rank["dtypes"] == [expected_dtype], rank


def test_a_safetensors_folder_loads_without_a_transformers_model_and_bin_weights_with_one(
        tmp_path, smollm2_hf_folder, megatron_single_rank, monkeypatch):
    from nemo_dvpo.models import builder
    from nemo_dvpo.models.sources import load_hf_config

    instantiated = []

    def load_hf_model(source, dtype=torch.float32):
        instantiated.append(source)
        return real_load_hf_model(source, dtype)

    real_load_hf_model = builder.load_hf_model
    monkeypatch.setattr(builder, "load_hf_model", load_hf_model)
    loaded = {}
    for name, safe in (("safetensors", True), ("bin", False)):
        folder = _make_tiny_hf_folder(tmp_path / name, "llama", smollm2_hf_folder, safe_serialization=safe)
        hf_config = load_hf_config(str(folder))
        model_cfg = dataclasses.replace(load_model_config("tiny"), source=str(folder))
        model = builder.build_gpt_model(model_cfg, hf_config=hf_config, load_weights=False)
        builder.load_hf_weights_into(model, str(folder), hf_config)
        loaded[name] = {key: value.clone() for key, value in model[0].state_dict().items()
                        if isinstance(value, torch.Tensor)}
    assert instantiated == [str(tmp_path / "bin")]  # the safetensors folder was read tensor by tensor
    assert loaded["safetensors"].keys() == loaded["bin"].keys()
    for key, value in loaded["safetensors"].items():
        assert torch.equal(value, loaded["bin"][key]), key


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    """Run a tool as a user would: plain ``python``, a world of one process."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _assert_clear_error(completed: subprocess.CompletedProcess, *fragments: str) -> None:
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    for fragment in fragments:
        assert fragment in completed.stderr, completed.stderr[-3000:]


def test_missing_path_is_a_clear_error(tmp_path):
    completed = _run_tool("tools/convert_hf_to_megatron.py", "--hf-path", str(tmp_path / "nope"),
                          "--megatron-path", str(tmp_path / "out"))
    _assert_clear_error(completed, "does not exist", str(tmp_path / "nope"))
    completed = _run_tool("tools/convert_megatron_to_hf.py", "--megatron-path", str(tmp_path / "nope"),
                          "--hf-path", str(tmp_path / "out"))
    _assert_clear_error(completed, "does not exist")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    completed = _run_tool("tools/convert_hf_to_megatron.py", "--hf-path", str(tmp_path / "gpt2"),
                          "--megatron-path", str(tmp_path / "out"))
    _assert_clear_error(completed, "unsupported architecture 'gpt2'", "Llama- and Mistral-family")


def test_tensor_parallel_not_dividing_heads_is_a_clear_error(tiny_hf_folder, tmp_path):
    completed = _run_tool("tools/convert_hf_to_megatron.py", "--hf-path", str(tiny_hf_folder),
                          "--megatron-path", str(tmp_path / "out"), "--tensor-parallel", "3")
    _assert_clear_error(completed, "tensor_model_parallel_size=3 does not divide", "4 attention heads")
    assert not (tmp_path / "out").exists()


def test_tokenizer_not_matching_vocabulary_is_a_clear_error(tmp_path, smollm2_hf_folder):
    hf_folder = _make_tiny_hf_folder(tmp_path / "small_vocab", "llama", smollm2_hf_folder, vocab_size=1000)
    completed = _run_tool("tools/convert_hf_to_megatron.py", "--hf-path", str(hf_folder),
                          "--megatron-path", str(tmp_path / "out"))
    _assert_clear_error(completed, "49152 tokens", "1000 entries")
    assert not (tmp_path / "out").exists()


def test_hf_folder_given_as_megatron_checkpoint_is_explained(tiny_hf_folder, tmp_path):
    completed = _run_tool("tools/convert_megatron_to_hf.py", "--megatron-path", str(tiny_hf_folder),
                          "--hf-path", str(tmp_path / "out"))
    _assert_clear_error(completed, "not a nemo_dvpo checkpoint", "convert_hf_to_megatron.py")
