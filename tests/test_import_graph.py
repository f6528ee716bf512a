"""The package's layering, read from the source: no import cycles, no upward imports.

Every `import` and `from ... import` counts, function-local and TYPE_CHECKING ones included.
Layers (docs/ARCHITECTURE.md), lowest first; a module may import its own layer or lower ones:
  0 leaves: errors, paths, sharding, ops/ (pure jax: never the model)
  1 building blocks: model/, data/ (never model/ or ops/), mesh, config_mesh, memory, distributed,
    checkpoint, metrics, optim, faults
  2 config_lib, train_step, decode, cli
  3 restore, recipes, upcycle, training, dry_run
  4 commands: train, evaluate, generate, plot, token_counts, hf/ (nothing imports them)
  5 proj/ (research projects: the core never imports them)
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "moejax"

LAYERS = [
  ("moejax.errors", 0),
  ("moejax.paths", 0),
  ("moejax.sharding", 0),
  ("moejax.ops", 0),
  ("moejax.model", 1),
  ("moejax.data", 1),
  ("moejax.mesh", 1),
  ("moejax.config_mesh", 1),
  ("moejax.memory", 1),
  ("moejax.distributed", 1),
  ("moejax.checkpoint", 1),
  ("moejax.metrics", 1),
  ("moejax.optim", 1),
  ("moejax.faults", 1),
  ("moejax.config_lib", 2),
  ("moejax.train_step", 2),
  ("moejax.decode", 2),
  ("moejax.cli", 2),
  ("moejax.restore", 3),
  ("moejax.recipes", 3),
  ("moejax.upcycle", 3),
  ("moejax.training", 3),
  ("moejax.dry_run", 3),
  ("moejax.train", 4),
  ("moejax.evaluate", 4),
  ("moejax.generate", 4),
  ("moejax.plot", 4),
  ("moejax.token_counts", 4),
  ("moejax.hf", 4),
  ("moejax.proj", 5),
]
COMMANDS = (
  "moejax.train",
  "moejax.evaluate",
  "moejax.generate",
  "moejax.plot",
  "moejax.token_counts",
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
  """The moejax modules `name` imports (resolved to modules that exist)."""
  path = MODULES[name]
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".") if is_package else name.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      targets = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in MODULES:
        target = target.rpartition(".")[0]
      if target and target != name and target.startswith("moejax"):
        found.add(target)
  return found


GRAPH = {name: _imports(name) for name in MODULES}


def layer(name: str) -> int:
  matches = [
    (len(prefix), n) for prefix, n in LAYERS if name == prefix or name.startswith(prefix + ".")
  ]
  if not matches:
    raise AssertionError(f"{name} has no layer: add it to LAYERS and docs/ARCHITECTURE.md")
  return max(matches)[1]


def test_every_module_has_a_layer():
  for name in MODULES:
    if name != "moejax":
      layer(name)


def test_no_import_cycles():
  state, stack, cycles = {}, [], []

  def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(GRAPH[u]):
      if v.startswith(u + "."):  # a package importing its own submodules is not a cycle
        continue
      if state.get(v) == 1:
        cycles.append(" -> ".join(stack[stack.index(v) :] + [v]))
      elif not state.get(v):
        visit(v)
    stack.pop()
    state[u] = 2

  for name in sorted(GRAPH):
    if not state.get(name):
      visit(name)
  assert not cycles, cycles


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "moejax"))
def test_imports_go_down_the_layers(name):
  upward = [t for t in GRAPH[name] if t != "moejax" and layer(t) > layer(name)]
  assert not upward, f"{name} (layer {layer(name)}) imports {upward}"


def test_the_named_boundaries():
  for name, targets in GRAPH.items():
    if name.startswith("moejax.ops"):
      assert not any(t.startswith("moejax.model") for t in targets), (name, targets)
    if name.startswith("moejax.data"):
      assert not any(t.startswith(("moejax.model", "moejax.ops")) for t in targets), name
    if name.startswith("moejax.model"):
      assert not any(t.startswith("moejax.data") for t in targets), (name, targets)
    if not name.startswith("moejax.proj"):
      assert not any(t.startswith("moejax.proj") for t in targets), (name, targets)
    assert not any(t in COMMANDS for t in targets), (name, targets)


def test_no_module_over_400_lines():
  long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
  assert not {n: k for n, k in long.items() if k > 400}
