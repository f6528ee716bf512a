"""What every command-line tool does with errors: user errors in one line, bugs with a traceback.

`run(main)` calls `main()`; an `errors.UserError` prints "moejax: error: <message>" on stderr and
exits 2, a `faults.NonFiniteError` the same with exit 3, and anything else propagates with its
traceback (Python exits 1): a bug never looks like the user's fault. MOEJAX_TRACEBACK=1 shows the
stack of user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from moejax import errors, faults


def run(main: Callable, *args, **kwargs):
  """Runs `main(*args, **kwargs)` with the error policy of the module docstring."""
  try:
    return main(*args, **kwargs)
  except (errors.UserError, faults.NonFiniteError) as e:
    if os.environ.get("MOEJAX_TRACEBACK"):
      raise
    print(f"moejax: error: {e}", file=sys.stderr)
    sys.exit(3 if isinstance(e, faults.NonFiniteError) else 2)
