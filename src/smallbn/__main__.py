"""``python -m smallbn``: the command line (:func:`smallbn.cli.main`)."""

from smallbn.cli import main

raise SystemExit(main())
