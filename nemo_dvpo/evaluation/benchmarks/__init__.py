"""Public benchmarks (IFEval, MT-Bench, Arena-Hard v2.0, AlpacaEval 2) for a policy: answers from Megatron
inference or an OpenAI-compatible server, judgments from an OpenAI-compatible judge, scores computed as each
benchmark's own code computes them. Entry point: tools/eval_benchmarks.py; the runner is :mod:`.runner`."""
