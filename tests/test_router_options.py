"""Declarative router options: `base.option` bounds and choices, checked by `base.RouterOptions`.

The messages keep the "field=value: must be ..." form the config prefixes with
model.moe.<family>.; every family's Options is checked the same way.
"""

import dataclasses
import math

import pytest

from moejax.model.routers import base, registry


@dataclasses.dataclass(frozen=True)
class Bounded(base.RouterOptions):
  rate: float = base.option(0.5, ge=0, lt=1, note="0 turns it off")
  scale: float = base.option(1.0, gt=0)
  count: int = base.option(2, ge=1)
  ceiling: float = base.option(0.0, lt=3)
  kind: str = base.option("a", choices=("a", "b"))
  free: float = -7.0


@pytest.mark.parametrize(
  "values, message",
  [
    ({"rate": 1.0}, r"^rate=1.0: must be in \[0, 1\) \(0 turns it off\)$"),
    ({"rate": -0.1}, r"^rate=-0.1: must be in \[0, 1\)"),
    ({"scale": 0.0}, r"^scale=0.0: must be > 0$"),
    ({"count": 0}, r"^count=0: must be >= 1$"),
    ({"ceiling": 3.0}, r"^ceiling=3.0: must be < 3$"),
    ({"kind": "c"}, r"^kind='c': use one of \('a', 'b'\)$"),
    ({"scale": math.nan}, r"^scale=nan: must be > 0$"),  # NaN fails every bound
  ],
)
def test_bad_values_name_the_field_value_and_rule(values, message):
  with pytest.raises(ValueError, match=message):
    Bounded(**values)


def test_values_at_the_inclusive_bounds_and_unbounded_fields_pass():
  options = Bounded(rate=0.0, scale=1e-9, count=1, ceiling=-5.0, kind="b", free=-1e9)
  assert (options.rate, options.count, options.kind) == (0.0, 1, "b")
  assert dataclasses.asdict(Bounded()) == {
    "rate": 0.5,
    "scale": 1.0,
    "count": 2,
    "ceiling": 0.0,
    "kind": "a",
    "free": -7.0,
  }


def test_every_registered_family_checks_its_declared_fields():
  for name, cls in registry.families().items():
    declared = [f for f in dataclasses.fields(cls.Options) if "valid" in f.metadata]
    assert not declared or issubclass(cls.Options, base.RouterOptions), name


def test_register_refuses_declared_fields_that_nothing_would_check():
  @dataclasses.dataclass(frozen=True)
  class Unchecked:
    scale: float = base.option(1.0, gt=0)

  class Router(base.Router):
    Options = Unchecked

  with pytest.raises(TypeError, match="not a base.RouterOptions subclass"):
    registry.register("unchecked_options_test")(Router)
  assert "unchecked_options_test" not in registry.names()
