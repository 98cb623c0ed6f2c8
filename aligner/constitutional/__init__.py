"""Constitutional AI's supervised stage (critique and revision) and a driver for the whole recipe.

- ``constitution``: the principles (a YAML file), each a critique request and a revision request.
- ``templates``: the few-shot critique and revision prompts (``datasets_templates/constitutional/``).
- ``config``: what ``aligner revise CONFIG`` reads.
- ``revise``: answer, then critique and revise for n rounds; write SFT rows with their chains.
- ``rule_reviser``: a rule-based reviser for the quickstart task, whose tiny model cannot critique.
- ``pipeline``: ``aligner constitutional PIPELINE``: revise, train, label, train, one step after another.
- ``cli``: the two subcommands.
"""
