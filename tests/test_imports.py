"""The import graph of tcptrace: no cycles, and bcc imported in one module."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tcptrace")


def modules():
    out = {}
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(module, path, known):
    """The tcptrace modules `module` imports, at any depth of its code (a
    lazy import inside a function is a dependency too)."""
    package = module if os.path.basename(path) == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` depends on the submodule; `from mod import name` on mod.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known and n != module}
    return found


def graph():
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_the_import_graph_has_no_cycles():
    edges = graph()
    # A package imports its own submodules to re-export them: not a cycle
    # through the package itself.
    for m in edges:
        edges[m] = {d for d in edges[m] if not d.startswith(m + ".")}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_bcc_is_imported_by_one_module():
    users = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "bcc" for a in node.names):
                users.append(module)
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "bcc":
                users.append(module)
    assert sorted(set(users)) == ["tcptrace.runtime.bcc"]
