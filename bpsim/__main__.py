"""``python -m bpsim`` runs the command line."""

from bpsim.cli import main

raise SystemExit(main())
