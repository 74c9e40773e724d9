"""What every DVC stage entry point in `pipeline/` shares: errors as one line, exit 1."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_stage(body: Callable[[], object]) -> None:
    """Run a stage body; a TinyWorldsError becomes `error: ...` on stderr and exit status 1."""
    from tinyworlds.errors import TinyWorldsError

    try:
        body()
    except TinyWorldsError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
