"""`python -m engine.serve MODEL_PATH [flags]`: see engine/serve/cli.py."""

import sys

from .cli import main

sys.exit(main())
