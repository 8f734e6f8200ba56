"""``python -m lqf_hub`` and ``accelerate launch -m lqf_hub``: the ``lqf-hub`` command line."""

from .cli import main

raise SystemExit(main())
