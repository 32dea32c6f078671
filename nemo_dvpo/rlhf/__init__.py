"""The parts of an RL-from-feedback step that every algorithm here shares (torchtune's ``rlhf/``).

* :mod:`~nemo_dvpo.rlhf.trajectory` - :class:`Trajectory`, one step's rollout as tensors;
* :mod:`~nemo_dvpo.rlhf.rollout` - sampling from the policy and per-token log-probs of any GPT;
* :mod:`~nemo_dvpo.rlhf.scorers` - :class:`ValueScorer`: per-token values from a frozen GVM (or reward model),
  in process (:class:`LocalValueModel`) or served over HTTP (:class:`RemoteGVM`); :class:`RewardScorer`;
* :mod:`~nemo_dvpo.rlhf.config` - the settings every on-policy recipe shares;
* :mod:`~nemo_dvpo.rlhf.policy` - the policy and its frozen reference: sampling, reference log-probs, PPO updates;
* :mod:`~nemo_dvpo.rlhf.prompt_source` - each step's prompts and sampling seed, the held-out prompts;
* :mod:`~nemo_dvpo.rlhf.kl_budget` - ``train.kl_budget``, fed the rollout KL by the recipe;
* :mod:`~nemo_dvpo.rlhf.metrics` - ``rollout/*`` over the global batch;
* :mod:`~nemo_dvpo.rlhf.report` - the held-out evaluation before and after, the summary;
* :mod:`~nemo_dvpo.rlhf.parts` - those parts built together for a recipe (:class:`RLParts`);
* :mod:`~nemo_dvpo.rlhf.update` - epochs of clipped updates over mini-batches, with a loss that receives
  the global token count.

The run's lifecycle (checkpoints, resume, stops, the final save) is :mod:`nemo_dvpo.training.run`; the objectives
themselves are pure functions in :mod:`nemo_dvpo.algorithms`.
"""
