"""`tests.helpers.tiny_config` as a config file for `python -m moejax.train` (multi-process tests).

--config tests/tiny_cli_config.py --config.data.source='DIR/*.txt' --config.mesh.data=2 ...
"""

from tests.helpers import tiny_config


def get_config(arg: str = ""):
  del arg
  return tiny_config("")
