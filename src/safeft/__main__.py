"""``python -m safeft`` (and ``accelerate launch -m safeft``) run the CLI."""

from .cli import main

raise SystemExit(main())
