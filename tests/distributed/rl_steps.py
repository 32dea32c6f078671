"""Two DVPO steps on the tiny model at the given TP/PP; rank 0 reports metrics, logits and frozen-model checks.

Usage: dvpo_steps.py WORK_DIR TP PP [OLD_LOGPROBS [GVM_TP]]   (WORK_DIR holds init/ (policy) and gvm/ made by
the test; GVM_TP runs the GVM on its own process groups at that tensor-parallel size)
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
    from nemo_dvpo.models.forward import full_logits
    from nemo_dvpo.recipes.dvpo import (
        DVPORecipe, DVPORecipeConfig, DVPOTrainConfig, EvalConfig, PPOConfig, PromptDataConfig, RolloutConfig,
    )
    from nemo_dvpo.utils.distributed import ParallelConfig

    work_dir, tp, pp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    old_logprobs = sys.argv[4] if len(sys.argv) > 4 else "generation"
    gvm_tp = int(sys.argv[5]) if len(sys.argv) > 5 else None
    run_dir = work_dir / f"run_tp{tp}_pp{pp}_{old_logprobs}_gvm{gvm_tp}"
    cfg = DVPORecipeConfig(
        model=load_model_config("tiny"), run_dir=str(run_dir), init_from=str(work_dir / "init"),
        gvm=str(work_dir / "gvm"), gvm_tensor_model_parallel_size=gvm_tp, export_hf=False,
        data=PromptDataConfig(max_prompt_tokens=96),
        rollout=RolloutConfig(prompts_per_step=4, sampling=SamplingConfig(max_new_tokens=10, temperature=1.0),
                              forward_micro_batch_size=2, old_logprobs=old_logprobs),
        # micro-batches of 1 in mini-batches of 2: gradient accumulation is exercised
        ppo=PPOConfig(ppo_epochs=2, mini_batch_size=2, micro_batch_size=1, entropy_coef=0.01),
        eval=EvalConfig(before=False, after=False), train=DVPOTrainConfig(steps=2, save_every=100),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    cfg.optim.lr = 1e-3
    from nemo_dvpo.recipes import dvpo as dvpo_recipe

    rollouts = []
    original = dvpo_recipe.sample_rollout

    def recording_sample_rollout(*args, **kwargs):
        sample = original(*args, **kwargs)
        rollouts.append(sample.tokens.tolist())
        return sample

    dvpo_recipe.sample_rollout = recording_sample_rollout
    recipe = DVPORecipe(cfg, cfg.gvm)
    frozen_before = (state_digest(recipe.scorer.model), state_digest(recipe.reference))
    policy_before = state_digest(recipe.policy)
    recipe.train()
    recipe.cleanup()

    frozen_unchanged = frozen_before == (state_digest(recipe.scorer.model), state_digest(recipe.reference))
    policy_changed = policy_before != state_digest(recipe.policy)
    frozen_params = [p for model in (recipe.scorer.model, recipe.reference) for m in model for p in m.parameters()]
    no_grad = all(not p.requires_grad and p.grad is None for p in frozen_params)
    flags = torch.tensor([float(frozen_unchanged), float(policy_changed), float(no_grad)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    probe = torch.tensor(rollouts[-1])
    logits = full_logits(recipe.policy, probe)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if dist.get_rank() == 0 else []
    write_result({"metrics": metrics, "rollouts": rollouts, "logits": logits[:, :, :64].tolist(),
                  "frozen_unchanged": bool(flags[0]), "policy_changed": bool(flags[1]),
                  "frozen_have_no_grad": bool(flags[2])})


if __name__ == "__main__":
    main()
