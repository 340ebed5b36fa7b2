"""``python -m llmprune``: the same command as the ``llmprune`` script, for environments
where the script's folder is not on PATH."""

import sys

from llmprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
