"""Evaluations shipped with the repository, so that anyone can re-score the answers behind a reported figure.

``tools/eval_benchmarks.py ... --ship-to DIR`` writes, after scoring, into ``DIR``:

* ``<benchmark>.answers.jsonl.gz`` - the evaluation's answers (and ``<benchmark>.judgments.jsonl.gz`` where a
  judge scored them), gzip-compressed byte for byte the same on every machine (no timestamp, records sorted by
  id), so a re-shipped evaluation that did not change leaves git nothing to commit;
* ``provenance.json`` - the command that produced them, the repository commit it ran at (and whether the
  working tree had changes), the model evaluated with its identity (a SHA-256 of its weights: a nemo_dvpo
  checkpoint's ``weights/`` files, or the file or folder a preset's source names) and the scores reported.

:func:`rescore` scores shipped IFEval answers again with lm-eval's checkers (``ifeval_scores``); the tests
check that it gives exactly the numbers in ``provenance.json`` for every shipped evaluation. A shipped folder
stands in for the evaluation folder it came from wherever only scores and answers are read
(``tools/eval_benchmarks.py --compare``): :func:`shipped_scores`, :func:`shipped_records`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
from pathlib import Path
from typing import Optional

from nemo_dvpo.evaluation.benchmarks.store import RecordFile, record_key, write_bytes_atomic, write_json_atomic
from nemo_dvpo.utils.errors import NemoDvpoError

PROVENANCE = "provenance.json"
# Benchmarks whose scores need nothing but the answers (the judged ones also need the judge's replies).
RESCORABLE = ("ifeval",)


def _gzip_bytes(text: str) -> bytes:
    """gzip of ``text`` with no file name and a zero timestamp: the same bytes for the same text everywhere."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as handle:
        handle.write(text.encode("utf-8"))
    return buffer.getvalue()


def read_gzip_jsonl(path: Path) -> list[dict]:
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise NemoDvpoError(f"{path}:{number}: not valid JSON ({error})") from None
    return records


def _hash_files(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def model_identity(model: str) -> dict:
    """What ``--model`` named and a SHA-256 of the weights it loaded (name, relative paths and bytes)."""
    from nemo_dvpo.models.config import available_presets, load_model_config
    from nemo_dvpo.models.sources import resolve_source

    path = Path(model).expanduser()
    if (path / "nemo_dvpo_checkpoint.json").is_file():
        metadata = json.loads((path / "nemo_dvpo_checkpoint.json").read_text(encoding="utf-8"))
        weights = [file for file in (path / "weights").rglob("*") if file.is_file()]
        return {"model": model, "kind": metadata.get("kind"), "weights_sha256": _hash_files(weights, path)}
    source = load_model_config(model).source if model in available_presets() and not path.exists() else model
    if source is None:  # a preset with random weights
        return {"model": model, "source": None, "weights_sha256": None}
    resolved = resolve_source(source)
    if resolved.kind == "hub":
        return {"model": model, "source": source, "weights_sha256": None}
    root = Path(resolved.location)
    files = [root / resolved.gguf_file] if resolved.gguf_file else [
        file for file in root.rglob("*") if file.is_file() and file.suffix in (".safetensors", ".bin", ".pt")]
    return {"model": model, "source": source, "weights_sha256": _hash_files(files, root)}


def repository_state(root: Path) -> dict:
    """The commit the repository is at, and whether tracked files differ from it (None outside a git checkout)."""
    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "tracked_changes": None if status is None else bool(status)}


def ship(evaluation: Path, destination: Path, benchmarks: list[str], command: list[str], model: dict,
         repository: dict) -> Path:
    """Copy ``evaluation``'s answers (and judgments) of ``benchmarks``, compressed, with their provenance."""
    scores_path = evaluation / "scores.json"
    if not scores_path.is_file():
        raise NemoDvpoError(f"{evaluation}: no scores.json to ship")
    scores = json.loads(scores_path.read_text(encoding="utf-8"))
    destination.mkdir(parents=True, exist_ok=True)
    for name in benchmarks:
        for kind in ("answers", "judgments"):
            records = RecordFile(evaluation / name / f"{kind}.jsonl", f"{name} {kind}").load()
            if not records:
                continue
            text = "".join(json.dumps(records[key], ensure_ascii=False, sort_keys=True) + "\n"
                           for key in sorted(records))
            write_bytes_atomic(shipped_file(destination, name, kind), _gzip_bytes(text))
    provenance = {"name": scores.get("model"), "command": command, **repository, "model": model,
                  "scores": {name: scores[name] for name in benchmarks if name in scores},
                  "answers_from": scores.get("answers_from")}
    write_json_atomic(destination / PROVENANCE, provenance)
    return destination


def is_shipped(folder: Path) -> bool:
    return (folder / PROVENANCE).is_file()


def read_provenance(folder: Path) -> dict:
    path = folder / PROVENANCE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NemoDvpoError(f"{path}: not a readable provenance file ({error})") from None


def shipped_scores(folder: Path) -> dict:
    """What the evaluation's ``scores.json`` held for the shipped benchmarks (its name, answer source, scores)."""
    provenance = read_provenance(folder)
    return {"model": provenance.get("name"), "answers_from": provenance.get("answers_from"),
            **provenance.get("scores", {})}


def shipped_file(folder: Path, benchmark: str, kind: str = "answers") -> Path:
    return folder / f"{benchmark}.{kind}.jsonl.gz"


def shipped_records(folder: Path, benchmark: str, kind: str = "answers") -> dict:
    """The shipped ``kind`` records of ``benchmark`` by id, as ``RecordFile.load`` gives them ({} if none)."""
    path = shipped_file(folder, benchmark, kind)
    return {record_key(record["id"]): record for record in read_gzip_jsonl(path)} if path.is_file() else {}


def rescore(shipped: Path) -> dict:
    """The scores of ``shipped``'s re-scorable benchmarks, computed again from its compressed answers."""
    from nemo_dvpo.evaluation.benchmarks import assets
    from nemo_dvpo.evaluation.benchmarks.ifeval import ifeval_scores

    scores = {}
    for name in RESCORABLE:
        answers = shipped_records(shipped, name)
        if not answers:
            continue
        docs = [prompt for prompt in assets.ifeval_prompts() if record_key(prompt["key"]) in answers]
        if len(docs) != len(answers):
            raise NemoDvpoError(f"{shipped_file(shipped, name)}: {len(answers) - len(docs)} answers to prompts "
                                "IFEval does not have")
        scores[name] = ifeval_scores(docs, [answers[record_key(doc["key"])]["answer"] for doc in docs])
    return scores
