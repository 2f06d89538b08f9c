"""`python -m qareg` runs the command-line interface."""

from qareg.cli import main

raise SystemExit(main())
