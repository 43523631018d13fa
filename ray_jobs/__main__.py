"""``python -m ray_jobs COMMAND ...``: the same as ``prefopt COMMAND ...`` (see ``ray_jobs.cli``)."""

from ray_jobs.cli import main

raise SystemExit(main())
