"""`python -m trl_integration.cli`: the `peft-steer` command."""

import sys

from . import main

sys.exit(main())
