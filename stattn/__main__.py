"""`python -m stattn ...` = the `stattn` command (so `accelerate launch -m stattn eval ...` and
`torchrun -m stattn eval ...` run it in every process)."""
import sys

from .cli import main

sys.exit(main())
