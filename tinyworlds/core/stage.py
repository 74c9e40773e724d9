"""What every DVC stage entry point in `pipeline/` shares: errors as one line, exit 1."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_stage(body: Callable[[], object], params_section: str | None = None) -> None:
    """Run a stage body; a TinyWorldsError becomes `error: ...` on stderr and exit status 1.

    A `ParameterError` names the parameter as its key under `params_section` (the stage's
    section of params.yaml, e.g. `recordings.pong`), where the user sets it.
    """
    from tinyworlds.core.errors import ParameterError, TinyWorldsError

    try:
        body()
    except ParameterError as err:
        print(f"error: {err.under(params_section) if params_section else err}", file=sys.stderr)
        sys.exit(1)
    except TinyWorldsError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
