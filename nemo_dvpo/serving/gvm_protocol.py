"""The served GVM's model metadata: what a server publishes at ``GET /v2/models/gvm`` and what a client reads from it.

Both sides of that contract live here, apart from the server (FastAPI, uvicorn), so that the DVPO actor's client
(:mod:`nemo_dvpo.serving.gvm_client`) imports none of the server's stack.
"""

from __future__ import annotations

import json

from nemo_dvpo.utils.errors import ConfigError

MODEL_NAME = "gvm"


def model_metadata(info, max_length: int, rows: int, bucket: int) -> dict:
    """``GET /v2/models/gvm``: the KServe model metadata of the GVM described by ``info`` (a
    :class:`~nemo_dvpo.rlhf.scorers.ScorerInfo`), with what a client checks in ``parameters``; ``rows`` and
    ``bucket`` are the server's batching settings."""
    stats = info.value_stats or {}
    return {
        "name": MODEL_NAME, "versions": ["1"], "platform": "nemo_dvpo_megatron",
        "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "lengths", "datatype": "INT64", "shape": [-1]}],
        "outputs": [{"name": "values", "datatype": "FP32", "shape": [-1, -1]}],
        "parameters": {
            "kind": info.kind, "checkpoint_id": info.checkpoint, "vocab_size": info.vocab_size,
            "tokenizer_fingerprint": info.tokenizer_fingerprint, "chat_template": info.chat_template,
            "chat_template_fingerprint": info.chat_template_fingerprint or "",
            "value_mean": stats.get("mean", float("nan")), "value_std": stats.get("std", float("nan")),
            "value_stats": json.dumps(info.value_stats), "eval_accuracy": json.dumps(info.eval_accuracy),
            "max_sequence_length": max_length, "rows": rows, "bucket": bucket,
        },
    }


def info_from_metadata(metadata: dict, url: str):
    """The :class:`~nemo_dvpo.rlhf.scorers.ScorerInfo` a server publishes (the client side of
    :func:`model_metadata`)."""
    from nemo_dvpo.rlhf.scorers import ScorerInfo

    parameters = metadata.get("parameters") or {}
    try:
        return ScorerInfo(kind=parameters["kind"], checkpoint=f"{url} ({parameters['checkpoint_id']})",
                          vocab_size=int(parameters["vocab_size"]),
                          tokenizer_fingerprint=parameters["tokenizer_fingerprint"],
                          chat_template=bool(parameters["chat_template"]),
                          chat_template_fingerprint=parameters["chat_template_fingerprint"] or None,
                          value_stats=json.loads(parameters["value_stats"]),
                          eval_accuracy=json.loads(parameters["eval_accuracy"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{url} is not a nemo_dvpo GVM server (its model metadata lacks {error})") from None
