"""The parts of an RL-from-feedback step that every algorithm here shares (torchtune's ``rlhf/``).

* :mod:`~nemo_dvpo.rlhf.trajectory` - :class:`Trajectory`, one step's rollout as tensors;
* :mod:`~nemo_dvpo.rlhf.rollout` - sampling from the policy and per-token log-probs of any GPT;
* :mod:`~nemo_dvpo.rlhf.scorers` - :class:`ValueScorer`: per-token values from a frozen GVM (or reward model),
  in process (:class:`LocalValueModel`) or served over HTTP (:class:`RemoteGVM`); :class:`RewardScorer`;
* :mod:`~nemo_dvpo.rlhf.config` and :mod:`~nemo_dvpo.rlhf.policy_run` - the settings and the machinery every
  on-policy recipe shares (policy and reference, prompts, evaluation, checkpoints, the summary);
* :mod:`~nemo_dvpo.rlhf.update` - epochs of clipped updates over mini-batches, with a loss that receives
  the global token count.

The objectives themselves are pure functions in :mod:`nemo_dvpo.algorithms`.
"""
