"""Algorithms: how a stage trains, as plugins (``register_algorithms``).

- ``base``: the ``Algorithm`` base class, what the runner hands an algorithm (``AlgorithmContext``,
  ``StepServices``) and what it gets back (``AlgorithmSetup``, ``StepResult``);
- ``offline``: the default, weighted loss plugins over micro-batches of a dataset;
- ``online``: what online algorithms share (``RolloutOptions``: the judge and sampling; the judge
  built once; the prompt stream sharded over processes);
- ``ppo``: rollouts, a critic, GAE and clipped updates (RLHF/RLAIF);
- ``policy_gradient``: the critic-free online family's shared step (rollout groups, an advantage
  estimator, the clipped policy loss with an aggregation mode), which ``grpo``, ``rloo`` and
  ``reinforce_pp`` configure;
- ``online_dpo``: two samples per prompt, the judge's preference, a DPO-family loss, on policy.
"""

from aligner.algorithms.base import (
    Algorithm,
    AlgorithmContext,
    AlgorithmSetup,
    StepResult,
    StepServices,
    Update,
    require_token_level_reference,
)

__all__ = ["Algorithm", "AlgorithmContext", "AlgorithmSetup", "StepResult", "StepServices", "Update",
           "require_token_level_reference"]
