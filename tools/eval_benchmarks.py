"""Evaluate a policy on public benchmarks (IFEval, MT-Bench, Arena-Hard v2.0, AlpacaEval 2), or compare evaluations.

    python tools/eval_benchmarks.py --model runs/dvpo/final --benchmarks ifeval --output-dir evals/dvpo
    python tools/eval_benchmarks.py --model smollm2_135m --output-dir evals/smollm2 \\
        --judge-base-url https://api.openai.com/v1 --judge-model gpt-4.1          # all four benchmarks
    torchrun --nproc-per-node 8 tools/eval_benchmarks.py --model CHECKPOINT --tensor-parallel 2 ...
    python tools/eval_benchmarks.py --model runs/dvpo/final --engine vllm --benchmarks ifeval --output-dir evals/dvpo
    python tools/eval_benchmarks.py --answers-from http://127.0.0.1:8001/v1 --output-dir evals/served ...
    python tools/eval_benchmarks.py --compare evals/smollm2 evals/dvpo --output-dir evals/report

Answers come from the model --model names (a nemo_dvpo checkpoint, a Hugging Face folder or a preset): drawn by
Megatron inference (batched, any TP/PP, data-parallel replicas share the questions) or, with --engine vllm, by a
vLLM engine (its own environment, .venv-vllm from tools/setup_vllm_env.sh) refitted with the weights Megatron
loaded; or from any OpenAI-compatible server (--answers-from, e.g. examples/serve_policy.py). Judges are any
OpenAI-compatible endpoint. Everything is cached in the output folder: a rerun or a killed run does no answer or
judgment twice. The library is nemo_dvpo/evaluation/benchmarks/ (what each score means is in its modules'
docstrings and docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit

ALL_BENCHMARKS = "ifeval,mt_bench,arena_hard,alpaca_eval"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("what is evaluated (one of)")
    source.add_argument("--model",
                        help="a nemo_dvpo checkpoint folder, a Hugging Face folder / .gguf, or a preset name")
    source.add_argument("--answers-from", metavar="URL", help="an OpenAI-compatible server's base URL (…/v1)")
    source.add_argument("--answers-model", help="the model name at --answers-from (default: its only model)")
    source.add_argument("--answers-api-key-env", default="OPENAI_API_KEY", help="variable holding its API key")
    source.add_argument("--compare", nargs="+", metavar="DIR",
                        help="instead of evaluating: compare evaluation folders into --output-dir/report.md and charts")
    parser.add_argument("--benchmarks", default=ALL_BENCHMARKS, help=f"comma-separated subset of {ALL_BENCHMARKS}")
    parser.add_argument("--output-dir", required=True, help="where answers, judgments and scores.json go")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
    parser.add_argument("--name", default=None, help="the model's name in the records (default: from --model)")
    parser.add_argument("--ship-to", metavar="DIR", default=None,
                        help="also write the answers compressed, with this command, the commit and the model's weights "
                             "hash, into DIR (e.g. docs/evals/<name>): the files a reported figure is re-scored from")
    judge = parser.add_argument_group("the judge (MT-Bench, Arena-Hard, AlpacaEval)")
    judge.add_argument("--judge-base-url", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", default="gpt-4.1")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="variable holding the judge's API key")
    judge.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight")
    judge.add_argument("--judge-timeout", type=float, default=300.0, help="seconds per request")
    judge.add_argument("--judge-max-retries", type=int, default=6, help="retries of failed requests, with backoff")
    judge.add_argument("--judge-backoff", type=float, default=2.0, help="first backoff in seconds (doubling)")
    judge.add_argument("--judge-parse-retries", type=int, default=2, help="re-asks of an unparseable reply")
    judge.add_argument("--judge-max-tokens", type=int, default=None,
                       help="judgment length for every benchmark (default: each benchmark's own)")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--max-new-tokens", type=int, default=None,
                            help="cap every answer's length (default: each benchmark's own limit)")
    generation.add_argument("--batch-size", type=int, default=8, help="prompts per Megatron batch")
    generation.add_argument("--concurrency", type=int, default=8, help="requests in flight to --answers-from")
    generation.add_argument("--seed", type=int, default=0, help="sampling seeds and AlpacaEval's output order")
    generation.add_argument("--tensor-parallel", type=int, default=1)
    generation.add_argument("--pipeline-parallel", type=int, default=1)
    generation.add_argument("--max-sequence-length", type=int, default=None,
                            help="prompt plus answer in tokens (default: the model's, capped at 4096)")
    generation.add_argument("--engine", choices=("megatron", "vllm"), default="megatron",
                            help="what draws --model's answers: Megatron inference, or a vLLM engine refitted "
                                 "with the weights Megatron loaded (one process; no torchrun)")
    generation.add_argument("--vllm-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                            help="the vLLM engine's dtype (default: the model's precision)")
    generation.add_argument("--vllm-tensor-parallel", type=int, default=1, help="GPUs of the vLLM engine")
    generation.add_argument("--vllm-eager", action="store_true",
                            help="no CUDA graphs / torch.compile in the vLLM engine (on CPU its compile warm-up "
                                 "costs minutes)")
    generation.add_argument("--vllm-python", default=None,
                            help="the vLLM environment's python (default: .venv-vllm/bin/python)")
    args = parser.parse_args(argv)
    given = [name for name in ("model", "answers_from", "compare") if getattr(args, name)]
    if len(given) != 1:
        parser.error("give exactly one of --model, --answers-from or --compare")
    if args.engine == "vllm" and not args.model:
        parser.error("--engine vllm draws the answers of --model")
    if args.engine == "vllm" and (args.tensor_parallel, args.pipeline_parallel) != (1, 1):
        parser.error("--engine vllm loads --model in one process: leave --tensor-parallel and --pipeline-parallel "
                     "at 1 (--vllm-tensor-parallel spreads the engine)")
    for name in ("limit", "max_new_tokens", "batch_size", "concurrency", "judge_concurrency",
                 "vllm_tensor_parallel"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def ship_evaluation(args, argv, names: list[str], output_dir: Path, model: dict) -> None:
    """--ship-to: the answers, compressed, and what produced them (nemo_dvpo.evaluation.benchmarks.shipped)."""
    if not args.ship_to:
        return
    import sys

    from nemo_dvpo.evaluation.benchmarks.shipped import repository_state, ship

    repo_root = Path(__file__).resolve().parent.parent
    command = ["python", "tools/eval_benchmarks.py", *(sys.argv[1:] if argv is None else argv)]
    shipped = ship(output_dir, Path(args.ship_to), names, command, model, repository_state(repo_root))
    print(f"answers and provenance shipped to {shipped}")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    from nemo_dvpo.utils.paths import check_output_dir

    output_dir = check_output_dir(args.output_dir, "--output-dir")  # before any work
    if args.ship_to:
        check_output_dir(args.ship_to, "--ship-to")
    if args.compare:
        from nemo_dvpo.evaluation.benchmarks.report import write_report

        report = write_report([Path(folder) for folder in args.compare], output_dir)
        print(f"report written to {report}")
        return
    from nemo_dvpo.evaluation.benchmarks.judge import JudgeClient, JudgeConfig
    from nemo_dvpo.evaluation.benchmarks.runner import check_judge, evaluate, parse_benchmarks

    names = parse_benchmarks(args.benchmarks)
    check_judge(names, bool(args.judge_base_url))
    judge_config = JudgeConfig(base_url=args.judge_base_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                               concurrency=args.judge_concurrency, timeout_s=args.judge_timeout,
                               max_retries=args.judge_max_retries, backoff_s=args.judge_backoff,
                               parse_retries=args.judge_parse_retries, max_tokens=args.judge_max_tokens)
    if args.answers_from:
        from nemo_dvpo.evaluation.benchmarks.answers import HTTPAnswerer

        answerer = HTTPAnswerer(args.answers_from, args.answers_model, os.environ.get(args.answers_api_key_env, ""),
                                args.concurrency, args.judge_timeout, args.judge_max_retries, seed=args.seed)
        judge = JudgeClient(judge_config) if judge_config.base_url else None
        evaluate(names, output_dir, answerer, judge, args.limit, args.max_new_tokens, args.seed,
                 args.name or answerer.model)
        ship_evaluation(args, argv, names, output_dir, {"answers_from": args.answers_from, "model": answerer.model})
        return

    from nemo_dvpo.evaluation.benchmarks.answers import PolicyAnswerer
    from nemo_dvpo.inference.policy import load_policy, policy_model_config, use_vllm_engine, vllm_dtype
    from nemo_dvpo.training.data_parallel import DataParallel
    from nemo_dvpo.utils.distributed import ParallelConfig, destroy_distributed, is_rank_zero

    policy_model_config(args.model)  # a wrong --model fails before the model is built
    judge = JudgeClient(judge_config) if judge_config.base_url else None
    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_parallel,
                              pipeline_model_parallel_size=args.pipeline_parallel)
    policy = load_policy(args.model, parallel, max_length=args.max_sequence_length, name=args.name)
    try:
        if args.engine == "vllm":
            from nemo_dvpo.inference.vllm_engine import VllmEngineConfig

            use_vllm_engine(policy, args.model, VllmEngineConfig(
                python=args.vllm_python, dtype=args.vllm_dtype or vllm_dtype(policy.model_cfg),
                tensor_parallel_size=args.vllm_tensor_parallel, seed=args.seed,
                engine_kwargs={"enforce_eager": True} if args.vllm_eager else {}))
        answerer = PolicyAnswerer(policy, args.batch_size, DataParallel.from_parallel_state(), seed=args.seed)
        evaluate(names, output_dir, answerer, judge, args.limit, args.max_new_tokens, args.seed, policy.name,
                 is_writer=is_rank_zero())
        if is_rank_zero() and args.ship_to:
            from nemo_dvpo.evaluation.benchmarks.shipped import model_identity

            ship_evaluation(args, argv, names, output_dir, model_identity(args.model))
    finally:
        if policy.engine is not None:
            policy.engine.close()
        destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
