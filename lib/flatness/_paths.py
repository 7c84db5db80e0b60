"""Where the repository's folders are (``data/``, ``figures/``, ``results/``) for an editable install."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
