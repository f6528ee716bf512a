r"""Switch-Base tiny on 8 devices in three parallelism layouts (same model, same losses).

  python -m moejax.train --config configs/mesh_layouts.py:ep4 --workdir /tmp/ep4
  python -m moejax.train --config configs/mesh_layouts.py:fsdp_ep_tp --workdir /tmp/fsdp_ep_tp
  python -m moejax.train --config configs/mesh_layouts.py:dp_fsdp_ep --workdir /tmp/dp_fsdp_ep

The default sharding rules (moejax/sharding.py) already place expert weights [E, D, F] on
('expert', 'fsdp', 'tensor'), dense and attention weights on 'fsdp'/'tensor' and the batch on
('data', 'fsdp', 'expert'); a layout is only the mesh sizes. All use the explicit all_to_all
dispatch, which needs the routing groups to split over data * fsdp * expert devices
(16 x 128 tokens / group size 256 = 8 groups: one per device).
"""

from moejax import config_lib, recipes

# Preset -> mesh axis sizes (8 devices each).
LAYOUTS = {
  "ep4": {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1},  # data + expert parallel
  "fsdp_ep_tp": {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2},  # FSDP + EP + tensor parallel
  "dp_fsdp_ep": {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1},  # DP + FSDP + EP
}


def get_config(preset: str = "ep4"):
  if preset not in LAYOUTS:
    raise config_lib.ConfigError(
      f"configs/mesh_layouts.py: unknown preset {preset!r}; known: {list(LAYOUTS)}"
    )
  c = recipes.switch_base_family("tiny", "configs/mesh_layouts.py")
  c.model.moe.dispatch = "all_to_all"
  for axis, size in LAYOUTS[preset].items():
    c.mesh[axis] = size
  return c
