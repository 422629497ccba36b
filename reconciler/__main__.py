"""`python -m reconciler` runs the command line."""

from reconciler.cli import main

raise SystemExit(main())
