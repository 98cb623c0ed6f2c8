"""The parts online algorithms share, each written once (``aligner.algorithms`` composes them).

- ``sampler``: the one sampler (rollouts, ``eval.generate`` and ``aligner label`` use it);
- ``rollout``: the prompt stream, G samples per prompt with per-group bookkeeping, rollout batches;
- ``rewards``: building the judge that scores rollouts, and PPO-style score adjustments;
- ``kl``: per-token KL estimators (k1, k2, k3) and the fixed/adaptive KL-coefficient controllers;
- ``advantages``: advantage estimators as plugin classes (GAE, group-relative, RLOO, REINFORCE++);
- ``policy_loss``: the clipped policy-gradient surrogate per token (clip-higher, dual clip, GSPO) and
  the KL-as-a-loss term;
- ``aggregation``: how per-token losses become one scalar, normalised over the whole optimizer step;
- ``critic``: the value head of actor-critic methods (PPO), its clipped loss, explained variance.
"""
