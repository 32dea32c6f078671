"""Two steps of an RL recipe (dvpo, ppo or grpo) on the tiny model at the given TP/PP; rank 0 reports metrics,
the sampled rollouts, the policy's logits after training and checks on the frozen and trained models.

Usage: rl_steps.py ALGO WORK_DIR TP PP [OLD_LOGPROBS [GVM_TP]]   (WORK_DIR holds init/ (policy), gvm/ and rm/
made by the test; GVM_TP runs DVPO's GVM on its own process groups at that tensor-parallel size)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from common import write_result


def state_digest(model) -> str:
    """Hash of every parameter of this rank's shard, in name order."""
    from nemo_dvpo.models.builder import unwrap_model

    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap_model(model[0]).state_dict().items()):
        if hasattr(tensor, "numpy"):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    import torch
    import torch.distributed as dist

    import nemo_dvpo  # noqa: F401
    from nemo_dvpo.inference.generation import SamplingConfig
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.rlhf import policy as policy_module
    from nemo_dvpo.rlhf.config import EvalConfig, PolicyTrainConfig, PromptDataConfig, RolloutConfig
    from nemo_dvpo.utils.distributed import ParallelConfig

    algorithm, work_dir, tp, pp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    old_logprobs = sys.argv[5] if len(sys.argv) > 5 else "generation"
    gvm_tp = int(sys.argv[6]) if len(sys.argv) > 6 else None
    run_dir = work_dir / f"run_{algorithm}_tp{tp}_pp{pp}_{old_logprobs}_gvm{gvm_tp}"
    common = dict(
        model=load_model_config("tiny"), run_dir=str(run_dir), init_from=str(work_dir / "init"), export_hf=False,
        data=PromptDataConfig(max_prompt_tokens=96),
        rollout=RolloutConfig(prompts_per_step=4 if algorithm != "grpo" else 2,
                              samples_per_prompt=1 if algorithm != "grpo" else 2,
                              sampling=SamplingConfig(max_new_tokens=10, temperature=1.0),
                              forward_micro_batch_size=2, old_logprobs=old_logprobs),
        eval=EvalConfig(before=False, after=False), train=PolicyTrainConfig(steps=2, save_every=100),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    # micro-batches of 1 in mini-batches of 2: gradient accumulation is exercised
    update = dict(ppo_epochs=2, mini_batch_size=2, micro_batch_size=1, entropy_coef=0.01)
    if algorithm == "dvpo":
        from nemo_dvpo.recipes.dvpo import DVPORecipe, DVPORecipeConfig, DVPOUpdateConfig

        cfg = DVPORecipeConfig(**common, gvm=str(work_dir / "gvm"), gvm_tensor_model_parallel_size=gvm_tp,
                               ppo=DVPOUpdateConfig(**update))
        make = lambda: DVPORecipe(cfg, cfg.gvm)  # noqa: E731
    elif algorithm == "ppo":
        from nemo_dvpo.recipes.ppo import CriticConfig, PPORecipe, PPORecipeConfig, PPOUpdateConfig

        cfg = PPORecipeConfig(**common, reward_model=str(work_dir / "rm"), ppo=PPOUpdateConfig(**update),
                              critic=CriticConfig(epochs=2))
        cfg.critic.optim.lr = 1e-3
        make = lambda: PPORecipe(cfg)  # noqa: E731
    else:
        from nemo_dvpo.recipes.grpo import GRPORecipe, GRPORecipeConfig
        from nemo_dvpo.rlhf.config import PolicyUpdateConfig

        cfg = GRPORecipeConfig(**common, reward_model=str(work_dir / "rm"), ppo=PolicyUpdateConfig(**update))
        make = lambda: GRPORecipe(cfg)  # noqa: E731
    cfg.optim.lr = 1e-3

    rollouts = []
    original = policy_module.sample_rollout

    def recording_sample_rollout(*args, **kwargs):
        sample = original(*args, **kwargs)
        rollouts.append(sample.tokens.tolist())
        return sample

    policy_module.sample_rollout = recording_sample_rollout
    recipe = make()
    policy = recipe.parts.policy
    scorer = recipe.scorer if algorithm == "dvpo" else recipe.reward_model.scorer
    frozen = [scorer.model, policy.reference]
    trained = [policy.model] + ([recipe.critic.model] if algorithm == "ppo" else [])
    frozen_before = [state_digest(model) for model in frozen]
    trained_before = [state_digest(model) for model in trained]
    recipe.train()
    recipe.cleanup()

    frozen_unchanged = frozen_before == [state_digest(model) for model in frozen]
    policy_changed = all(before != state_digest(model) for before, model in zip(trained_before, trained))
    frozen_params = [p for model in frozen for m in model for p in m.parameters()]
    no_grad = all(not p.requires_grad and p.grad is None for p in frozen_params)
    flags = torch.tensor([float(frozen_unchanged), float(policy_changed), float(no_grad)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    probe = torch.tensor(rollouts[-1])
    from nemo_dvpo.models.forward import full_logits

    logits = full_logits(policy.model, probe)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if dist.get_rank() == 0 else []
    write_result({"metrics": metrics, "rollouts": rollouts, "logits": logits[:, :, :64].tolist(),
                  "frozen_unchanged": bool(flags[0]), "policy_changed": bool(flags[1]),
                  "frozen_have_no_grad": bool(flags[2])})


if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
