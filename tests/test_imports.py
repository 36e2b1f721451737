"""The package's import graph: no cycles, and arrows point down the layers (ARCHITECTURE.md).

Every `import` and `from ... import` in gkd_jax is counted, function-level ones included (a function-level
import hides a cycle from Python's loader, not from the design). A package stands for its __init__.py.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gkd_jax")
# The application layer: entry points that assemble the library. No library module may import them.
APPLICATION = {"gkd_jax.main", "gkd_jax.trainer"}
APPLICATION_PREFIXES = ("gkd_jax.demos",)


def module_files() -> dict[str, str]:
  """Dotted module name -> file, for every .py file under gkd_jax (a package's name -> its __init__.py)."""
  out = {}
  for dirpath, _, names in os.walk(ROOT):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), os.path.dirname(ROOT))[: -len(".py")]
        parts = rel.split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = os.path.join(dirpath, name)
  return out


def imports_of(module: str, path: str, modules: set[str]) -> set[str]:
  """The gkd_jax modules `module` imports anywhere in its file."""
  is_package = path.endswith("__init__.py")
  package = module if is_package else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the package, up level - 1
        anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import name`: pkg.name when that is a module, else pkg itself
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:  # `import gkd_jax.models.layers` -> that module; attributes drop
        name = name.rpartition(".")[0]
      if name and name != module:
        found.add(name)
  return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
  colour, stack = {}, []

  def visit(node):
    colour[node] = "grey"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if colour.get(nxt) == "grey":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in colour:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    colour[node] = "black"
    return None

  for node in sorted(graph):
    if node not in colour:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


@pytest.fixture(scope="module")
def graph():
  files = module_files()
  return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_package_imports(graph):
  assert "gkd_jax.models.layers" in graph["gkd_jax.models.transformer"]
  assert "gkd_jax.models" in graph["gkd_jax.trainer"]
  assert "gkd_jax.demos.arithmetic" in graph["gkd_jax.main"]  # imported inside a function


def test_the_package_has_no_import_cycle(graph):
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_modules_do_not_import_the_application(graph):
  upward = sorted(
      (m, dep)
      for m, deps in graph.items()
      for dep in deps
      if (dep in APPLICATION or dep.startswith(APPLICATION_PREFIXES))
      and not (m in APPLICATION or m.startswith(APPLICATION_PREFIXES))
  )
  assert not upward, f"library modules importing the application layer: {upward}"
