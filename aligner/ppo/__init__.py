"""PPO (RLHF / RLAIF): rollouts from the policy, judge rewards shaped by a KL penalty, GAE, clipped updates.

- ``rollout``: sampling completions for prompt batches and collating them for scoring;
- ``rewards``: KL estimators, the fixed/adaptive KL controllers and per-token reward shaping;
- ``gae``: generalised advantage estimation;
- ``loss``: the ``ppo`` loss plugin (clipped policy and value losses) and its options;
- ``value_head``: the policy with a value head (the actor-critic trained by PPO);
- ``stage``: the PPO stage runner that ``aligner.loop.train_stage`` hands prompt-only stages to.
"""
