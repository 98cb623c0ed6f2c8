"""Prompt and chat templates shipped with aligner, one YAML file each (see ``aligner.data.templates``)."""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent
