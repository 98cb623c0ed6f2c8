"""``python -m aligner`` (also what ``accelerate launch -m aligner`` runs)."""

import sys

from aligner.cli import main

sys.exit(main())
