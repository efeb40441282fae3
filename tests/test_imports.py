"""The import graph of ``offload/`` runs one way (DESIGN.md): a lower layer never imports a
higher one, and no modules import each other in a cycle. Read from the source with ``ast``:
every import counts, the lazy ones inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "offload"

# Lowest first. ``hardware`` measures the tiers and the prefetch pipeline (the runtime's
# streaming, ``measure_stream_reads``), so it sits just above them; ``hooks`` and
# ``calibrate`` serve the runtime and the API; the package root re-exports the API.
LAYERS = [
    {"units", "errors", "sizes", "memory"},
    {"kernels"},
    {"store"},
    {"adapters"},
    {"planner"},
    {"tiers"},
    {"prefetch"},
    {"hardware"},
    {"hooks"},
    {"runtime"},
    {"calibrate"},
    {"api"},
    {"serve"},
    {"cli", "integrations", "offload"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    """``offload/tiers/disk.py`` -> ``offload.tiers.disk``."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in ROOT.rglob("*.py")}
MODULES = set(FILES)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "offload"


def imports_of(path: Path, text: str | None = None) -> set[str]:
    """The offload modules ``path`` (or ``text`` standing at ``path``) imports; ``from .x
    import y`` may name module ``x.y``, so both are listed."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(text if text is not None else path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "offload"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "offload":
                target = node.module
            else:
                continue
            # ``from pkg import mod`` imports the module mod (pkg, its parent, is loaded
            # anyway); ``from mod import name`` imports mod.
            subs = {f"{target}.{a.name}" for a in node.names}
            found |= (subs & MODULES) or {target}
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the offload modules it imports."""
    return {m: {t for t in imports_of(p) if t in MODULES and t != m} for m, p in FILES.items()}


def test_every_module_belongs_to_a_layer():
    assert {layer_of(m) for m in graph()} <= set(RANK)


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{m} -> {t}" for m, targets in graph().items() for t in targets
                    if RANK[layer_of(t)] > RANK[layer_of(m)])
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    cycles = [c for c in _strongly_connected(g) if len(c) > 1]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_the_checks_see_bad_imports():
    """The reader and the cycle finder themselves: an upward lazy import inside a function and
    a relative one resolve to their modules; two modules importing each other are a cycle."""
    text = "def f():\n    from ..runtime import core\n    from . import slots\n"
    found = imports_of(ROOT / "tiers" / "disk.py", text)
    assert {"offload.runtime.core", "offload.tiers.slots"} <= found
    assert {"a", "b"} in _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}})


def _strongly_connected(g: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(g.get(nxt, ())))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == node:
                        break
                out.append(comp)
    return out
