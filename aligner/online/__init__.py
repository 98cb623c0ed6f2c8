"""The shared maths of online RL (PPO, GRPO, RLOO, REINFORCE++, ...), as pure torch functions.

- ``kl``: per-token KL estimators (k1, k2, k3) and the fixed/adaptive KL-coefficient controllers;
- ``aggregation``: how per-token losses become one scalar, normalised over the whole optimizer step;
- ``policy_loss``: the clipped policy-gradient surrogate per token (clip-higher, dual clip, GSPO) and
  the KL-as-a-loss term;
- ``advantages``: advantage estimators as plugin classes (GAE, group-relative, RLOO, REINFORCE++).
"""
