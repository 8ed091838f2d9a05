"""``python -m policyopt`` and ``torchrun ... -m policyopt``: the command line."""

from .cli import main

raise SystemExit(main())
