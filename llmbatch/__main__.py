"""``python -m llmbatch``: the command line (same as the ``llmbatch`` script)."""

from llmbatch.cli import main

raise SystemExit(main())
