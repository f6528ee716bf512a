"""The router families: `model.moe.router` picks one by name (see registry.py and base.py).

Importing this package registers the built-in families; a family defined elsewhere registers
itself when its module is imported (`@registry.register`).
"""

from moejax.model.routers import (  # noqa: F401 - imported to register the built-in families
  autonomy,
  base_layers,
  deepseek,
  expert_choice,
  gshard_top2,
  hash_layers,
  moex,
  noisy_top_k,
  peer,
  random_choice,
  relu,
  smear,
  soft_moe,
  top_k,
  top_p,
)
from moejax.model.routers.registry import (  # noqa: F401 - the package's public API
  consistency,
  families,
  family,
  get,
  loss_weights,
  names,
  option_defaults,
  options,
  register,
  settings,
)
