#!/bin/bash
# The PPO half of the training section (c) again, after the fix of reduce_metrics (a CPU metric beside CUDA ones):
# the reward model for one step, then PPO for 3 steps, with the overrides benchmarks/gpu_acceptance.py gives them.
set -u
export PYTHONUNBUFFERED=1 MEGATRON_SUPPRESS_FUSION_WARNINGS=1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devkit/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/tok && tar xzf .devkit/smollm2_tokenizer.tgz -C /tmp/tok || exit 4
M="model=llama3_2_3b model.random_init=true model.bos_token_id=1 model.eos_token_id=2 model.precision=bf16 model.tokenizer=/tmp/tok/smollm2_tokenizer"
W=runs/gpu_ppo
timeout 75 python3 examples/train_reward_model.py $M model.activation_recompute=full run_dir=$W/reward_model train.steps=1 train.global_batch_size=16 train.micro_batch_size=8 train.eval_every=1 train.save_every=101 train.eval_max_pairs=16 train.eval_micro_batch_size=8 train.value_stats_samples=16 optim.use_distributed_optimizer=true overwrite=true > "$OUT"/reward_model.log 2>&1
echo "reward model: exit $?"; date -u
timeout 140 python3 examples/train_ppo.py $M reward_model=$W/reward_model/final run_dir=$W/ppo train.steps=3 train.save_every=103 train.kl_budget=null rollout.prompts_per_step=8 rollout.sampling.max_new_tokens=128 rollout.sampling.stop_on_eos=false data.max_prompt_tokens=128 ppo.ppo_epochs=1 ppo.mini_batch_size=4 ppo.micro_batch_size=2 eval.before=false eval.after=false export_hf=false optim.use_distributed_optimizer=true critic.epochs=1 critic.optim.use_distributed_optimizer=true overwrite=true > "$OUT"/ppo.log 2>&1
echo "ppo: exit $?"; date -u
cp $W/ppo/metrics.jsonl "$OUT"/ppo_metrics.jsonl
grep -v -i warn "$OUT"/ppo.log | tail -15
