"""The layout's rules, read from every module's imports (top-level and inside functions alike):
the core library imports only itself; extras import only the core library and other extras; pipeline.py is the one
library module that picks extras; tools stand on all of those; nothing imports a script; no import circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_LIBRARY = {"flux_model", "sem_cross_attn", "lora", "vae", "flow", "data", "text_encoders", "checkpoint",
                "latents", "viz"}
SCRIPTS = {"train", "sample"}  # commands: nothing imports them


def project_modules() -> dict[str, Path]:
    """Module name -> file: the root's .py files, extras.*, tools.*."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in ("extras", "tools"):
        mods |= {f"{pkg}.{p.stem}": p for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__"}
    return mods


def imports_of(path: Path, names: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # from extras import fp8
    return {n for n in found if n in names}


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def test_the_core_library_imports_only_itself():
    g = graph()
    assert CORE_LIBRARY <= set(g), CORE_LIBRARY - set(g)
    bad = {m: sorted(g[m] - CORE_LIBRARY) for m in CORE_LIBRARY if g[m] - CORE_LIBRARY}
    assert not bad, f"core modules importing outside the core: {bad}"


def test_extras_import_only_the_core_library_and_extras():
    g = graph()
    bad = {m: sorted(d) for m in g if m.startswith("extras.")
           if (d := {x for x in g[m] if x not in CORE_LIBRARY and not x.startswith("extras.")})}
    assert not bad, f"extras importing pipeline, a script or a tool: {bad}"


def test_no_module_imports_a_script_and_only_tools_import_tools():
    g = graph()
    bad = {m: sorted(d & SCRIPTS) for m, d in g.items() if d & SCRIPTS}
    assert not bad, f"modules importing a script (run it as a subprocess instead): {bad}"
    tool_users = {m for m, d in g.items() if any(x.startswith("tools.") for x in d)}
    assert tool_users <= {m for m in g if m.startswith("tools.")} | {"train"}, sorted(tool_users)


def test_no_import_circle():
    g = graph()
    state = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_at_most_13_modules_at_the_root():
    root = sorted(p.stem for p in ROOT.glob("*.py"))
    assert set(root) == CORE_LIBRARY | SCRIPTS | {"pipeline"}, root
