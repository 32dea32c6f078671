"""Preference data for the Global Value Model: records -> token sequences, each with one scalar label.

DVPO's GVM (stage 1) regresses a value at every response token onto a sequence-level label placed
on the last response token (see ``nemo_dvpo.algorithms.gvm``). This module turns preference data
into exactly those training sequences::

    data = load_preference_data(path, config, tokenizer, eos_token_id=model_eos)  # or load_preference_splits
    for position, index in enumerate(data.order(epoch, seed)): ...                # resumable order
    batch = collate_value_batch([data[i] for i in batch_indices], pad_token_id)    # ValueBatch

``config`` (:class:`PreferenceDataConfig`) says how any source is processed; the path is separate,
so a training and an evaluation file share one config.

Schemas (extra columns are ignored):

* **pairwise** - ``prompt``, ``chosen``, ``rejected``. ``chosen``/``rejected`` are the response
  strings, or whole conversations whose final ``assistant`` message is the response and whose
  earlier messages are the prompt (the ``HuggingFaceH4/ultrafeedback_binarized`` layout, where
  ``prompt`` is a string that repeats the user turn). A pair gives two sequences sharing a
  ``pair_id``: chosen with label +1.0, rejected with label -1.0 (the paper's labels; no pairwise loss).
  Every pair must keep the one pairing rule of :mod:`nemo_dvpo.data.pairing` - two different responses,
  the chosen one scored higher where ``chosen_score``/``rejected_score`` are given, no response in two
  pairs of one prompt - the rule the shipped pairs were built by; the first pair that breaks it stops
  the load with its file and line.
* **scored** - ``prompt``, ``response``, ``score``: one sequence labelled with the score (the paper's
  instruction setting, where a reward model scored each response).

Invalid records (wrong types, empty responses, a pair that breaks the pairing rule, a non-finite score, a
``prompt`` that contradicts its conversation, ...) stop the load with a message naming file, line, row and field,
or with ``skip_invalid`` are skipped and counted per reason.

Tokens: the GVM must value exactly the tokens the policy produces, so a sequence is laid out like a
policy rollout (``nemo_dvpo.inference.generation.GenerationOutput``)::

    prompt_ids   = apply_chat_template(tokenizer, prompt_messages)    # ends with the assistant header
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [eos_token_id]
    input_ids    = prompt_ids + response_ids

The response is tokenized on its own, as the policy generates it: token by token after the
assistant header, never merged with the prompt's last token. With ``chat_template: false`` the
prompt is plain text encoded as ``examples/generate.py`` encodes it (``tokenizer(prompt).input_ids``,
which adds a BOS token where the tokenizer does).

Over-long sequences (``max_length``) are dropped, or with ``overlong: truncate_prompt`` lose prompt
tokens from the left; responses are never cut, and both sequences of a pair are treated alike.

Trajectory conditioning (the paper's tau, off by default): with ``trajectory_context: k`` each record's
prompt is preceded by ``k`` other (prompt, response) pairs of the same data set as earlier chat turns,
so the GVM can condition on how "the policy" answered other questions. For each record, ``k``
distinct prompts other than its own are drawn with a generator seeded by ``(seed, record index)``,
and for each one of its responses (chosen or rejected alike: tau shows behaviour, not quality);
both sequences of a pair get the same context; the record's own system messages stay first. The
paper describes tau as optional and the authors' code does not use it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import numbers
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence, get_args

import numpy as np
import torch

from nemo_dvpo.data.pairing import PairingViolation, PairLedger, check_pair
from nemo_dvpo.data.readers import DataFormat, SourceRecord, iter_source_records
from nemo_dvpo.data.splits import assign_by_key, epoch_order, split_counts
from nemo_dvpo.inference.chat import apply_chat_template, encode_prompt
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError

Schema = Literal["auto", "pairwise", "scored"]
OverlongPolicy = Literal["drop", "truncate_prompt"]
Message = dict  # {"role": str, "content": str}

CHOSEN_LABEL = 1.0
REJECTED_LABEL = -1.0
_MESSAGES = "a string or a list of {role, content} messages"


@dataclass
class PreferenceDataConfig:
    """How preference data becomes GVM training sequences (``data.processing`` of the GVM recipe).

    The data's path (a .jsonl/.json/.parquet file, a save_to_disk folder, a folder of data files per
    split, or a hub id) is passed to the load functions beside this config.
    """

    # How the data is stored: "auto" (from the path: .jsonl, .json, .parquet, a save_to_disk or data-file
    # folder, else a hub id), or "jsonl", "json", "parquet", "disk", "hub".
    format: DataFormat = "auto"
    # The split of a DatasetDict, hub dataset or folder of split files; null when there is only one.
    # The load functions take a split argument that overrides it (train and eval from one source).
    split: Optional[str] = None
    # "auto" detects pairwise (chosen/rejected) or scored (response/score) from the first record.
    schema: Schema = "auto"
    # Format prompts with the tokenizer's chat template, as the policy sees them (false: plain text).
    chat_template: bool = True
    # Longest sequence (prompt + response + EOS) in tokens; null for no limit.
    max_length: Optional[int] = 1024
    # Over-long sequences: "drop" them, or "truncate_prompt" - cut the prompt from the left (never the
    # response), keeping at least min_prompt_tokens, and drop the record if even that does not fit.
    overlong: OverlongPolicy = "drop"
    # The fewest prompt tokens "truncate_prompt" keeps.
    min_prompt_tokens: int = 8
    # Skip malformed records (counted per reason and reported) instead of stopping at the first one.
    skip_invalid: bool = False
    # Number of other (prompt, response) pairs prepended as earlier chat turns (the paper's tau).
    trajectory_context: int = 0
    # Seeds the trajectory-context draws and the held-out split of load_preference_splits.
    seed: int = 0
    # Read only the first N records (smoke tests); null reads everything.
    max_records: Optional[int] = None

    def __post_init__(self) -> None:
        for name, choices in (("format", DataFormat), ("schema", Schema), ("overlong", OverlongPolicy)):
            if getattr(self, name) not in get_args(choices):
                raise ConfigError(f"data.{name}: expected one of {get_args(choices)}, got {getattr(self, name)!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2 (a prompt token and EOS) or null, "
                              f"got {self.max_length}")
        if self.min_prompt_tokens < 1:
            raise ConfigError(f"data.min_prompt_tokens must be >= 1, got {self.min_prompt_tokens}")
        if self.trajectory_context < 0:
            raise ConfigError(f"data.trajectory_context must be >= 0, got {self.trajectory_context}")
        if self.trajectory_context and not self.chat_template:
            raise ConfigError("data.trajectory_context > 0 needs data.chat_template: true "
                              "(the context pairs are earlier chat turns)")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError(f"data.max_records must be >= 1 or null, got {self.max_records}")


# --------------------------------------------------------------------------------------------------
# Records: validated, not yet tokenized
# --------------------------------------------------------------------------------------------------

class InvalidRecord(NemoDvpoError):
    """A record that does not fit its schema. ``reason`` is the short key skipped records are counted by."""

    def __init__(self, reason: str, field_name: Optional[str], detail: str):
        self.reason = reason
        self.field_name = field_name
        super().__init__(f"field {field_name!r}: {detail}" if field_name else detail)


@dataclass(frozen=True)
class PreferenceRecord:
    """One valid record: a prompt conversation and the response(s) the GVM learns to value.

    ``prompt`` is the chat before the response; a string prompt becomes one user message.
    ``responses``/``labels`` are ``(chosen, rejected)``/``(+1, -1)`` for a pair and
    ``(response,)``/``(score,)`` for a scored record. ``index`` is the record's 0-based position among
    all records read from the source (invalid ones included); ``where`` locates it for messages.
    """

    prompt: list[Message]
    responses: tuple[str, ...]
    labels: tuple[float, ...]
    index: int
    where: str

    @property
    def is_pair(self) -> bool:
        return len(self.responses) == 2

    @functools.cached_property
    def prompt_key(self) -> str:
        """Equal for equal prompts (up to surrounding whitespace): what splits by prompt group on."""
        canonical = [[m["role"], m["content"].strip()] for m in self.prompt]
        return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()


@dataclass
class PreferenceDataStats:
    """What happened to the records of one load; ``summary()`` is the line that gets reported."""

    records_read: int = 0
    # reason -> number of records skipped for it (only with skip_invalid; otherwise the first one raises)
    records_invalid: dict[str, int] = field(default_factory=dict)
    # records (a pair counts once) whose sequences did not fit max_length, also under truncate_prompt
    records_dropped_over_long: int = 0
    # records whose prompt was cut from the left to fit max_length
    records_truncated: int = 0
    records_kept: int = 0
    samples: int = 0

    @property
    def records_skipped_invalid(self) -> int:
        return sum(self.records_invalid.values())

    def count_invalid(self, reason: str) -> None:
        self.records_invalid[reason] = self.records_invalid.get(reason, 0) + 1

    def read_summary(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.records_invalid.items()))
        return (f"read {self.records_read} records, skipped {self.records_skipped_invalid} invalid"
                + (f" ({reasons})" if reasons else ""))

    def tokenize_summary(self) -> str:
        return (f"kept {self.records_kept} records ({self.samples} sequences), dropped "
                f"{self.records_dropped_over_long} over-long, truncated {self.records_truncated} prompts")

    def summary(self) -> str:
        return f"{self.read_summary()}; {self.tokenize_summary()}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _required(fields: dict, name: str) -> Any:
    if fields.get(name) is None:
        raise InvalidRecord("missing_field", name, "missing")
    return fields[name]


def _messages(value: Any, field_name: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise InvalidRecord("wrong_type", field_name, f"expected {_MESSAGES}, got {_short(value)}")
    for position, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise InvalidRecord("wrong_type", f"{field_name}[{position}]",
                                f"expected a {{role, content}} message with string values, got {_short(message)}")
    # Only role and content reach the chat template: extra keys must not change the tokens.
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_response(value: Any, field_name: str) -> tuple[Optional[list[Message]], str]:
    """(conversation before the response or None, response text) of a chosen/rejected/response field."""
    if isinstance(value, str):
        prefix, text = None, value
    elif isinstance(value, list):
        messages = _messages(value, field_name)
        if messages[-1]["role"] != "assistant":
            raise InvalidRecord("wrong_type", field_name, "the last message is the response and must have role "
                                f"'assistant', got role {messages[-1]['role']!r}")
        prefix, text = messages[:-1] or None, messages[-1]["content"]
    else:
        raise InvalidRecord("wrong_type", field_name, f"expected {_MESSAGES}, got {_short(value)}")
    if not text.strip():
        raise InvalidRecord("empty_response", field_name, "the response is empty")
    return prefix, text


def _resolve_prompt(fields: dict, conversations: list[tuple[str, Optional[list[Message]]]]) -> list[Message]:
    """The prompt conversation: the messages before the response(s), or the ``prompt`` field.

    Where both exist they must agree - a ``prompt`` column that does not belong to its conversation
    means misaligned data, which must not train silently.
    """
    prefixes = [(name, prefix) for name, prefix in conversations if prefix is not None]
    for name, prefix in prefixes[1:]:
        if prefix != prefixes[0][1]:
            raise InvalidRecord("inconsistent_prompt", name,
                                f"the conversation before the response differs from the one in {prefixes[0][0]!r}")
    raw = fields.get("prompt")
    if raw is not None and not isinstance(raw, (str, list)):
        raise InvalidRecord("wrong_type", "prompt", f"expected {_MESSAGES}, got {_short(raw)}")
    if prefixes:
        prompt = prefixes[0][1]
        if isinstance(raw, str):
            agrees = any(m["role"] == "user" and m["content"].strip() == raw.strip() for m in prompt)
        else:
            agrees = raw is None or _messages(raw, "prompt") == prompt
        if not agrees:
            raise InvalidRecord("inconsistent_prompt", "prompt",
                                f"does not match the conversation in {prefixes[0][0]!r}")
    elif raw is None:
        raise InvalidRecord("missing_field", "prompt", "missing (the responses are plain strings, so they do not "
                            "carry the prompt)")
    else:
        prompt = [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw, "prompt")
    if prompt[-1]["role"] != "user":
        raise InvalidRecord("wrong_type", "prompt", "the prompt conversation must end with a user message, got role "
                            f"{prompt[-1]['role']!r}")
    if not any(m["content"].strip() for m in prompt if m["role"] != "system"):
        raise InvalidRecord("empty_prompt", "prompt", "the prompt is empty")
    return prompt


def detect_schema(fields: dict, where: str) -> str:
    """'pairwise' or 'scored', from the fields a record has."""
    if "chosen" in fields and "rejected" in fields:
        return "pairwise"
    if "response" in fields and "score" in fields:
        return "scored"
    raise NemoDvpoError(f"{where}: cannot tell the schema from the fields {sorted(fields)}: expected "
                        "prompt/chosen/rejected (pairwise) or prompt/response/score (scored); set data.schema")


def parse_preference_record(fields: dict, schema: str, index: int, where: str) -> PreferenceRecord:
    """Validate one record of ``schema`` ('pairwise' or 'scored'); raises :class:`InvalidRecord`."""
    if schema == "pairwise":
        chosen_prefix, chosen = _split_response(_required(fields, "chosen"), "chosen")
        rejected_prefix, rejected = _split_response(_required(fields, "rejected"), "rejected")
        prompt = _resolve_prompt(fields, [("chosen", chosen_prefix), ("rejected", rejected_prefix)])
        try:
            check_pair(chosen, rejected, fields)
        except PairingViolation as violation:
            raise InvalidRecord(violation.reason, violation.field_name, violation.detail) from None
        return PreferenceRecord(prompt, (chosen, rejected), (CHOSEN_LABEL, REJECTED_LABEL), index, where)
    if schema == "scored":
        prefix, response = _split_response(_required(fields, "response"), "response")
        prompt = _resolve_prompt(fields, [("response", prefix)])
        score = _required(fields, "score")
        if not isinstance(score, numbers.Real) or isinstance(score, bool) or not math.isfinite(float(score)):
            raise InvalidRecord("bad_score", "score", f"expected a finite number, got {_short(score)}")
        return PreferenceRecord(prompt, (response,), (float(score),), index, where)
    raise ValueError(f"unknown schema {schema!r}")


def _reject(error: InvalidRecord, where: str, skip_invalid: bool, stats: PreferenceDataStats) -> None:
    if not skip_invalid:
        raise NemoDvpoError(f"{where}: {error}") from None
    stats.count_invalid(error.reason)


def iter_preference_records(source: Iterable[SourceRecord], schema: Schema, skip_invalid: bool,
                            stats: PreferenceDataStats) -> Iterator[tuple[SourceRecord, PreferenceRecord]]:
    """Validate source records; yield each valid one with its source. Counts go into ``stats``.

    With ``schema="auto"`` the first record that is a mapping decides the schema for all records. Pairs are
    checked against the pairing rule (:mod:`nemo_dvpo.data.pairing`) one by one and across the source: a pair
    that reuses a response of an earlier pair of its prompt is the violation, named with both places.
    """
    resolved = None if schema == "auto" else schema
    ledger = PairLedger()
    for index, record in enumerate(source):
        stats.records_read += 1
        try:
            if record.decode_error is not None:
                raise InvalidRecord("invalid_json", None, record.decode_error)
            if not isinstance(record.fields, dict):
                raise InvalidRecord("not_an_object", None, f"expected a record with named fields, got "
                                    f"{_short(record.fields)}")
            resolved = resolved or detect_schema(record.fields, record.where)
            parsed = parse_preference_record(record.fields, resolved, index, record.where)
            if parsed.is_pair:
                try:
                    ledger.add(parsed.prompt_key, *parsed.responses, where=record.where)
                except PairingViolation as violation:
                    raise InvalidRecord(violation.reason, violation.field_name, violation.detail) from None
        except InvalidRecord as error:
            _reject(error, record.where, skip_invalid, stats)
            continue
        yield record, parsed


def read_preference_records(path: str, config: PreferenceDataConfig,
                            split: Optional[str] = None) -> tuple[list[PreferenceRecord], PreferenceDataStats]:
    """All valid records of ``path`` in source order, and the read counts.

    ``split`` overrides ``config.split`` (a training and an evaluation split of one source).
    """
    stats = PreferenceDataStats()
    split = config.split if split is None else split
    source = itertools.islice(iter_source_records(path, config.format, split), config.max_records)
    records = [record for _, record in iter_preference_records(source, config.schema, config.skip_invalid, stats)]
    if not records:
        raise NemoDvpoError(f"{path}: no valid preference records ({stats.read_summary()})")
    return records, stats


# --------------------------------------------------------------------------------------------------
# Tokenized samples
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq on numpy arrays is element-wise: compare input_ids explicitly
class ValueSample:
    """One GVM training sequence: ``input_ids[:prompt_length]`` is the prompt, the rest the response.

    ``input_ids`` is a read-only int32 numpy array (a fraction of the memory of a list of Python ints;
    convert with ``.tolist()`` where a list is needed). The response ends with the EOS token, which is
    where the label sits. ``pair_id`` (the record's index) and ``is_chosen`` are set for pairwise records
    and None for scored ones; ``record_index`` points back at the source record.
    """

    input_ids: np.ndarray
    prompt_length: int
    label: float
    pair_id: Optional[int]
    is_chosen: Optional[bool]
    record_index: int

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


@dataclass
class TokenizedPreferenceData:
    """GVM training sequences, map-style (``len``, ``[i]``), with the counts of how they were made.

    The two sequences of a pair are adjacent, chosen first. :meth:`order` gives each epoch's
    deterministic sample order (pairs kept together), so ``(epoch, position)`` is a complete data
    position for resuming.
    """

    samples: list[ValueSample]
    stats: PreferenceDataStats

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ValueSample:
        return self.samples[index]

    def __iter__(self) -> Iterator[ValueSample]:
        return iter(self.samples)

    @functools.cached_property
    def groups(self) -> list[list[int]]:
        """Sample indices per record: ``[chosen, rejected]`` for a pair, ``[sample]`` for a scored record."""
        groups: list[list[int]] = []
        for index, sample in enumerate(self.samples):
            if groups and self.samples[groups[-1][0]].record_index == sample.record_index:
                groups[-1].append(index)
            else:
                groups.append([index])
        return groups

    def order(self, epoch: int, seed: int) -> list[int]:
        """Sample indices of epoch ``epoch``: records shuffled by ``(seed, epoch)``, pairs adjacent.

        Resume mid-epoch with ``order(epoch, seed)[position:]``; nothing else (no RNG state) is needed.
        Data-parallel ranks take disjoint slices of the same order.
        """
        return epoch_order(self.groups, epoch, seed)


def _eos_id(tokenizer, eos_token_id: Optional[int]) -> int:
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if not isinstance(eos, int) or isinstance(eos, bool) or eos < 0:
        raise ConfigError(f"need an end-of-sequence token id (the tokenizer has {tokenizer.eos_token_id!r}); "
                          f"pass eos_token_id, got {eos_token_id!r}")
    return eos


class _TrajectoryContext:
    """Draws the ``k`` context (prompt, response) pairs of each record (see the module docstring)."""

    def __init__(self, records: Sequence[PreferenceRecord], k: int, seed: int):
        self.k, self.seed = k, seed
        self.pairs_by_prompt: dict[str, list[tuple[list[Message], str]]] = {}
        for record in records:
            for response in record.responses:
                self.pairs_by_prompt.setdefault(record.prompt_key, []).append((record.prompt, response))
        self.prompt_keys = list(self.pairs_by_prompt)  # first-appearance order: deterministic
        if len(self.prompt_keys) <= k:
            raise ConfigError(f"data.trajectory_context={k} needs at least {k + 1} distinct prompts; "
                              f"the data has {len(self.prompt_keys)}")

    def messages(self, record: PreferenceRecord) -> list[Message]:
        rng = random.Random(f"nemo_dvpo.trajectory_context:{self.seed}:{record.index}")
        # k + 1 distinct prompts, so that k remain once the record's own prompt is taken out.
        drawn = [self.prompt_keys[i] for i in rng.sample(range(len(self.prompt_keys)), self.k + 1)]
        context_keys = [key for key in drawn if key != record.prompt_key][: self.k]
        turns: list[Message] = []
        for key in context_keys:
            prompt, response = rng.choice(self.pairs_by_prompt[key])
            turns += [m for m in prompt if m["role"] != "system"] + [{"role": "assistant", "content": response}]
        leading_system = 0
        while leading_system < len(record.prompt) and record.prompt[leading_system]["role"] == "system":
            leading_system += 1
        return record.prompt[:leading_system] + turns + record.prompt[leading_system:]


def _prompt_ids(tokenizer, record: PreferenceRecord, chat_template: bool,
                context: Optional[_TrajectoryContext]) -> list[int]:
    messages = record.prompt if context is None else context.messages(record)
    if chat_template:
        return apply_chat_template(tokenizer, messages)
    if len(messages) != 1:
        raise InvalidRecord("needs_chat_template", "prompt", "a conversation of several messages needs the chat "
                            "template (data.chat_template: true)")
    return encode_prompt(tokenizer, messages[0]["content"], use_chat_template=False)


def _encode_responses(tokenizer, records: Sequence[PreferenceRecord]) -> Iterator[list[list[int]]]:
    """Content token ids of each record's responses (no special tokens), in record order.

    Encoded a chunk of texts per call: the Rust tokenizer encodes a batch on all cores, with the same
    ids as one text at a time.
    """
    chunk_records = 512
    for start in range(0, len(records), chunk_records):
        chunk = records[start:start + chunk_records]
        ids = iter(tokenizer([text for record in chunk for text in record.responses],
                             add_special_tokens=False)["input_ids"])
        for record in chunk:
            yield [list(next(ids)) for _ in record.responses]


def _response_ids(content_ids: list[int], eos: int, field_name: str, tokenizer) -> list[int]:
    if eos in content_ids:
        # The policy's response ends at its first EOS; one in the middle is a sequence it never produces.
        raise InvalidRecord("eos_in_response", field_name, f"the response text contains the end-of-sequence token "
                            f"{tokenizer.convert_ids_to_tokens(eos)!r}")
    return content_ids + [eos]


def _kept_prompt_length(prompt_length: int, response_lengths: Sequence[int],
                        config: PreferenceDataConfig) -> Optional[int]:
    """How many prompt tokens (from the right) all sequences of a record keep; None drops the record.

    The longest response decides, and every sequence of a pair keeps the same prompt tokens, so the
    two sequences still differ only in their responses. Responses are never cut.
    """
    longest = max(response_lengths)
    if config.max_length is None or prompt_length + longest <= config.max_length:
        return prompt_length
    room = config.max_length - longest
    if config.overlong == "drop" or room < config.min_prompt_tokens:
        return None
    return room


def tokenize_preference_records(records: Sequence[PreferenceRecord], tokenizer, config: PreferenceDataConfig,
                                eos_token_id: Optional[int] = None, stats: Optional[PreferenceDataStats] = None,
                                label: str = "preference data") -> TokenizedPreferenceData:
    """Tokenize records into GVM sequences (prompt template + response + EOS), fitting ``max_length``.

    ``eos_token_id`` is the id the policy's responses end with - pass the model's (its generation
    config's); it defaults to the tokenizer's. ``stats`` (from reading) is updated in place; without
    it a fresh one counts ``records`` as read. ``label`` names the data in error messages.
    """
    eos = _eos_id(tokenizer, eos_token_id)
    if config.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.chat_template is true but the tokenizer has no chat template")
    stats = stats if stats is not None else PreferenceDataStats(records_read=len(records))
    context = (_TrajectoryContext(records, config.trajectory_context, config.seed)
               if config.trajectory_context else None)
    samples: list[ValueSample] = []
    for record, content_ids in zip(records, _encode_responses(tokenizer, records)):
        response_fields = ("chosen", "rejected") if record.is_pair else ("response",)
        try:
            prompt_ids = _prompt_ids(tokenizer, record, config.chat_template, context)
            response_ids = [_response_ids(ids, eos, name, tokenizer) for ids, name in zip(content_ids, response_fields)]
        except InvalidRecord as error:
            _reject(error, record.where, config.skip_invalid, stats)
            continue
        kept = _kept_prompt_length(len(prompt_ids), [len(ids) for ids in response_ids], config)
        if kept is None:
            stats.records_dropped_over_long += 1
            continue
        if kept < len(prompt_ids):
            prompt_ids = prompt_ids[len(prompt_ids) - kept:]
            stats.records_truncated += 1
        for position, (ids, label) in enumerate(zip(response_ids, record.labels)):
            input_ids = np.asarray(prompt_ids + ids, dtype=np.int32)
            input_ids.flags.writeable = False
            samples.append(ValueSample(
                input_ids=input_ids, prompt_length=len(prompt_ids), label=label,
                pair_id=record.index if record.is_pair else None,
                is_chosen=(position == 0) if record.is_pair else None,
                record_index=record.index,
            ))
        stats.records_kept += 1
    stats.samples = len(samples)
    if not samples:
        raise NemoDvpoError(f"{label}: no sequence is left to train on ({stats.summary()}); "
                            "check data.max_length and data.overlong")
    return TokenizedPreferenceData(samples, stats)


def _report(line: str) -> None:
    from nemo_dvpo.utils.distributed import print_rank_zero

    print_rank_zero(f"[data] {line}")


def load_preference_data(path: str, config: PreferenceDataConfig, tokenizer, eos_token_id: Optional[int] = None,
                         split: Optional[str] = None) -> TokenizedPreferenceData:
    """Read, validate and tokenize ``path``; report one summary line (rank 0)."""
    records, stats = read_preference_records(path, config, split)
    data = tokenize_preference_records(records, tokenizer, config, eos_token_id, stats, label=path)
    _report(f"{path}: {data.stats.summary()}")
    return data


def split_by_prompt(records: Sequence[PreferenceRecord], held_out_fraction: float,
                    seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train, held-out) records; every record of a prompt lands on the same side.

    ``held_out_fraction`` is a fraction of the distinct prompts (at least one, and at least one left for
    training). A prompt's side depends only on the prompt and ``seed``, not on the record order.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ConfigError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    keys = {record.prompt_key for record in records}
    if len(keys) < 2:
        raise NemoDvpoError(f"splitting by prompt needs at least 2 distinct prompts, the data has {len(keys)}")
    _, held_out = split_counts(len(keys), [1.0 - held_out_fraction, held_out_fraction])
    held_out = min(max(held_out, 1), len(keys) - 1)
    side = assign_by_key(keys, {"train": len(keys) - held_out, "held_out": held_out}, seed)
    return ([r for r in records if side[r.prompt_key] == "train"],
            [r for r in records if side[r.prompt_key] == "held_out"])


@dataclass
class PreferenceSplits:
    """Train and held-out sequences cut from one source by prompt; ``read_stats`` counts the reading."""

    train: TokenizedPreferenceData
    held_out: TokenizedPreferenceData
    read_stats: PreferenceDataStats


def load_preference_splits(path: str, config: PreferenceDataConfig, tokenizer, held_out_fraction: float,
                           eos_token_id: Optional[int] = None, split: Optional[str] = None) -> PreferenceSplits:
    """Read ``path`` once, split the records by prompt (seed ``config.seed``), tokenize each side.

    Splitting before tokenizing keeps trajectory context inside each side: a training sequence never
    shows a held-out prompt as context. Each side's ``stats.records_read`` is its number of records.
    """
    records, read_stats = read_preference_records(path, config, split)
    train_records, held_out_records = split_by_prompt(records, held_out_fraction, config.seed)
    splits = PreferenceSplits(
        train=tokenize_preference_records(train_records, tokenizer, config, eos_token_id, label=f"{path} (train)"),
        held_out=tokenize_preference_records(held_out_records, tokenizer, config, eos_token_id,
                                             label=f"{path} (held-out)"),
        read_stats=read_stats,
    )
    # Each side's summary also counts records found invalid only when tokenized (eos_in_response, ...).
    _report(f"{path}: {read_stats.read_summary()}; train side: {splits.train.stats.summary()}; "
            f"held-out side: {splits.held_out.stats.summary()}")
    return splits


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------

@dataclass
class ValueBatch:
    """A right-padded batch of GVM sequences, laid out like ``GenerationOutput``.

    ``response_mask`` marks the response tokens, the final EOS included (the label's position is the
    last True of each row). Right padding needs no attention mask under causal attention: real
    positions never attend to later (padding) positions. ``pair_ids`` is -1 and ``is_chosen`` False
    for samples without a pair.
    """

    tokens: torch.Tensor  # (batch, seq) int64
    response_mask: torch.Tensor  # (batch, seq) bool
    labels: torch.Tensor  # (batch,) float32
    prompt_lengths: torch.Tensor  # (batch,) int64
    response_lengths: torch.Tensor  # (batch,) int64
    pair_ids: torch.Tensor  # (batch,) int64
    is_chosen: torch.Tensor  # (batch,) bool

    def to(self, device: torch.device | str) -> "ValueBatch":
        return ValueBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def collate_value_batch(samples: Sequence[ValueSample], pad_token_id: int, pad_to: Optional[int] = None,
                        pad_to_multiple_of: int = 1) -> ValueBatch:
    """Stack samples into a :class:`ValueBatch`, right-padding with ``pad_token_id``.

    The sequence length is the longest sample's, or ``pad_to`` (one fixed shape for all micro-batches
    of a step: pipeline stages exchange fixed-shape activations), rounded up to a multiple of
    ``pad_to_multiple_of`` (e.g. the tensor-parallel size for sequence parallelism).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = [len(sample.input_ids) for sample in samples]
    if pad_to is not None and pad_to < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({max(lengths)} tokens)")
    seq_length = max(lengths) if pad_to is None else pad_to
    seq_length = -(-seq_length // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(samples), seq_length), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(samples), seq_length), dtype=torch.bool)
    for row, sample in enumerate(samples):
        tokens[row, :lengths[row]] = torch.from_numpy(sample.input_ids.astype(np.int64))
        response_mask[row, sample.prompt_length:lengths[row]] = True
    return ValueBatch(
        tokens=tokens,
        response_mask=response_mask,
        labels=torch.tensor([sample.label for sample in samples], dtype=torch.float32),
        prompt_lengths=torch.tensor([sample.prompt_length for sample in samples], dtype=torch.long),
        response_lengths=torch.tensor([sample.response_length for sample in samples], dtype=torch.long),
        pair_ids=torch.tensor([-1 if sample.pair_id is None else sample.pair_id for sample in samples],
                              dtype=torch.long),
        is_chosen=torch.tensor([bool(sample.is_chosen) for sample in samples], dtype=torch.bool),
    )
