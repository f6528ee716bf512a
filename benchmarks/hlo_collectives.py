"""Collectives of a compiled (SPMD-partitioned) XLA program, read from its HLO text.

Per op and device, with n devices in the op's replica group and B the op's per-device result
bytes, the bytes that leave the device (ring algorithms): all-gather and all-to-all B (n-1)/n,
reduce-scatter B (n-1) (its result is the 1/n shard), all-reduce 2 B (n-1)/n,
collective-permute B. Ops whose group has one device move nothing and are not counted. An op
inside a while loop (a scanned model's layers) runs once per iteration: it is counted times the
loop's `known_trip_count` (nested loops multiply); a loop whose trip count depends on the data
(e.g. an assignment solver's iterations) is counted once, a lower bound.

`sliced_all_reduce_bytes` finds the all-reduces whose every use keeps only this device's 1/n
slice: XLA:CPU lowers a sharded gradient's reduce-scatter that way, while XLA's GPU and TPU
pipelines rewrite the same pattern into a reduce-scatter (half the bytes).
"""

from __future__ import annotations

import re

import numpy as np

KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_COLLECTIVE = re.compile(
  r"=\s*(\(?[^=]*?\)?)\s+(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)"
  r"(-start)?\((.*)$"
)
_COMMENT = re.compile(r"/\*.*?\*/")
_SHAPE = re.compile(r"(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64|u64)\[([\d,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
_BYTES.update({"f64": 8, "s64": 8, "u64": 8})


def shape_bytes(text: str) -> int:
  """Bytes of every array shape in `text` (a result type, possibly a tuple)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def group_size(attrs: str, num_devices: int) -> int:
  """Devices per replica group, from any of XLA's spellings of replica_groups."""
  m = re.search(r"replica_groups=\{\{([\d,]+)\}", attrs)
  if m:  # explicit: {{0,1,2,3},{4,5,6,7}}
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)
  if m:  # iota: [groups, size]<=[devices]
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
  if m:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the product of the listed axes
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2))]))
  m = re.search(r"source_target_pairs=\{", attrs)
  if m:  # collective-permute: point to point
    return 2
  return num_devices


_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_CALLEE = re.compile(
  r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _per_computation(hlo_text: str):
  """(computation of each line index, {computation: times it runs per program execution})."""
  owner, calls, current, entry = [], {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      entry = current if line.startswith("ENTRY") else entry
    owner.append(current)
    for role, callee in _CALLEE.findall(line):
      trips = 1
      if role == "body":
        trip = _TRIP_COUNT.search(line)
        trips = int(trip.group(1)) if trip else 1  # data-dependent (a solver's iterations): once
      calls.setdefault(callee, []).append((current, trips))
    for branches in _BRANCHES.findall(line):
      for callee in re.findall(r"%([\w.\-]+)", branches):
        calls.setdefault(callee, []).append((current, 1))
  times: dict[str, int] = {}

  def count(name) -> int:
    if name not in times:
      times[name] = 1 if name == entry or name not in calls else 0
      times[name] = max(times[name], sum(count(c) * n for c, n in calls.get(name, [])))
    return times[name]

  return owner, {name: count(name) for name in set(filter(None, owner))}


def collectives(hlo_text: str, num_devices: int) -> list[dict]:
  """Every collective op: {"kind", "result_bytes", "group", "times", "bytes"} (bytes leaving a
  device over the `times` it runs per step)."""
  ops = []
  owner, times = _per_computation(hlo_text)
  for index, line in enumerate(hlo_text.splitlines()):
    line = _COMMENT.sub("", line)  # tuples carry /*index=5*/ markers, which hide the "="
    m = _COLLECTIVE.search(line)
    if not m or "-done" in line:
      continue
    result, kind, is_start, attrs = m.groups()
    if is_start and result.startswith("("):  # async start: (operands..., result): the last one
      result = _SHAPE.findall(result)[-1]
      result = f"{result[0]}[{result[1]}]"
    size = shape_bytes(result)
    n = group_size(attrs, num_devices)
    if n <= 1:
      continue
    sent = {
      "all-to-all": size * (n - 1) / n,
      "all-gather": size * (n - 1) / n,
      "reduce-scatter": size * (n - 1),
      "all-reduce": 2 * size * (n - 1) / n,
      "collective-permute": size,
    }[kind]
    runs = times[owner[index]]
    ops.append(
      {"kind": kind, "result_bytes": size, "group": n, "times": runs, "bytes": sent * runs}
    )
  return ops


def bytes_by_kind(hlo_text: str, num_devices: int) -> dict[str, float]:
  """{kind: bytes leaving one device per execution} (every kind present, 0 when absent)."""
  out = dict.fromkeys(KINDS, 0.0)
  for op in collectives(hlo_text, num_devices):
    out[op["kind"]] += op["bytes"]
  return out


def collective_bytes(hlo_text: str, num_devices: int) -> float:
  """Bytes that leave devices, summed over devices, for all collectives of the program."""
  return sum(bytes_by_kind(hlo_text, num_devices).values()) * num_devices


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")


def _instructions(hlo_text: str) -> dict[str, tuple[str, str, str, int]]:
  """{name: (opcode, result type, operands and attributes, times it runs)} of every instruction."""
  out = {}
  owner, times = _per_computation(hlo_text)
  for index, line in enumerate(hlo_text.splitlines()):
    m = _INSTRUCTION.match(_COMMENT.sub("", line))
    if m:
      out[m.group(1)] = (m.group(3), m.group(2), m.group(4), times[owner[index]])
  return out


def _slicing_computations(hlo_text: str) -> set[str]:
  """Names of the computations (fusion bodies) that contain a dynamic-slice."""
  out, current = set(), None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
    if header:
      current = header.group(1)
    elif current and " dynamic-slice(" in line:
      out.add(current)
  return out


def sliced_all_reduce_bytes(hlo_text: str, num_devices: int) -> float:
  """Bytes (counted as all-reduce) of the all-reduce results that are only ever sliced to 1/n.

  A result (or tuple element) counts when each of its users is a dynamic-slice, or a fusion
  that contains one, and yields 1/n of it: a reduce-scatter in all but name.
  """
  ins = _instructions(hlo_text)
  slicing = _slicing_computations(hlo_text)

  def slices(user: str) -> bool:
    opcode, _, rest, _ = ins[user]
    called = re.search(r"calls=%([\w.\-]+)", rest)
    return opcode == "dynamic-slice" or bool(called and called.group(1) in slicing)

  users: dict[str, list[str]] = {}
  for name, (_, _, rest, _) in ins.items():
    for operand in set(_OPERAND.findall(rest.split("metadata=")[0])):
      users.setdefault(operand, []).append(name)

  def only_sliced(value: str, size: int, n: int) -> bool:
    uses = users.get(value, [])
    return bool(uses) and all(slices(u) and shape_bytes(ins[u][1]) * n == size for u in uses)

  total = 0.0
  for name, (opcode, result, rest, runs) in ins.items():
    if opcode != "all-reduce":
      continue
    n = group_size(rest, num_devices)
    if n <= 1:
      continue
    elements = [f"{d}[{s}]" for d, s in _SHAPE.findall(result)]
    if result.startswith("("):
      for user in users.get(name, []):
        index = re.search(r"index=(\d+)", ins[user][2])
        if ins[user][0] == "get-tuple-element" and index:
          size = shape_bytes(elements[int(index.group(1))])
          if only_sliced(user, size, n):
            total += 2 * size * (n - 1) / n * runs
    elif only_sliced(name, shape_bytes(result), n):
      total += 2 * shape_bytes(result) * (n - 1) / n * runs
  return total
