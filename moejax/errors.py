"""The errors a user can cause and fix; the command-line tools print them as one line (exit 2).

Every other exception is a bug (in moejax or below it) and keeps its traceback: a command never
turns an internal error into a "user error". Raise a subclass of `UserError` only where the cause
is a value, file or machine the user chose, and say in the message what was wrong, the value
given, and what to do.
"""

from __future__ import annotations


class UserError(Exception):
  """A problem with the user's input or machine; the message is one line and names the fix."""


class ConfigError(UserError, ValueError):
  """A config value (or command-line argument) that cannot work."""


class DataError(UserError, ValueError):
  """Training or evaluation data that cannot be read or used (missing files, bad records)."""


class CheckpointError(UserError, OSError):
  """A checkpoint that cannot be read, written or used with this config."""


class InsufficientMemoryError(UserError, MemoryError):
  """The run would not fit the memory of its devices (found before compiling)."""
