"""An aligner judge that asks an OpenAI-compatible chat-completions server for scores.

Registered as the judge ``http``; see ``HTTPJudge`` for its options.
"""

from __future__ import annotations

import aligner
from aligner_http_judge.client import ChatClient, JudgeRequestError
from aligner_http_judge.judge import HTTPJudge
from aligner_http_judge.parsing import parse_choice, parse_score

__version__ = "0.1.0"


@aligner.hookimpl
def register_judges(register):
    """Register the HTTP judge under the name ``http``."""
    register(HTTPJudge)


__all__ = ["ChatClient", "HTTPJudge", "JudgeRequestError", "parse_choice", "parse_score"]
