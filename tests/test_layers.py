"""The package's layers, read from the source with `ast` (nothing here imports tokenring).

The core is a stack of layers, each a folder (or, at the bottom and the top,
named modules); a module may import its own layer and the layers below it,
never one above:

1. contracts: tokenring.interfaces, tokenring.hookspecs (what backends and
   plugins implement);
2. placement (tokenring/placement/): layouts, documents, token masks;
3. plan (tokenring/plan/): the plan model, its traffic, the derived
   backward, replicated-query plans;
4. proofs (tokenring/proofs/): the checkers;
5. schedules (tokenring/schedules/, and tokenring.registry, the plugin path
   every schedule and backend is found through): builders, masked plans, the
   proven-plan cache;
6. runtime (tokenring/runtime/): lowering, the executor, buffers, merging,
   the agreement, the timeline, groups;
7. planner (tokenring/planner/): topologies, the simulator, `auto`;
8. front ends: the package's other top-level modules (the API, nn,
   inference, compile support, validation, sequence helpers, the reference).

Beside the stack:

* kit (tokenring/kit/): helpers for backends; imports only the core's interfaces;
* tools (tokenring/tools/, and tokenring/__main__.py, which only runs the
  CLI): may import the core and the kit, never the test package;
* testing (tokenring/testing/): the conformance suite; may import anything.

Every import counts: at module level or inside a function, under
``if TYPE_CHECKING:`` too, and ``importlib.import_module("tokenring...")``
with a literal name. Relative imports are resolved; ``from P import name``
counts as an import of the module ``P.name`` when that is a module, of ``P``
otherwise. Importing a submodule also runs its parent packages' __init__,
but that is not an edge of the graph: the package is initialised first, so
it cannot close a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tokenring"


# -- reading the imports ------------------------------------------------------------


def module_files(package_dir: Path) -> dict[str, Path]:
    """Every module under ``package_dir`` by dotted name (a package by the name of its __init__)."""
    top = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [top, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_in(source: str, module: str, *, is_package: bool, known: set[str], top: str = "tokenring") -> set[str]:
    """The ``top`` modules that ``source`` (the text of ``module``) imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(node, module, is_package)
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                found.add(candidate if candidate in known else origin)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return {name for name in found if name == top or name.startswith(top + ".")}


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = module_files(package_dir)
    known = set(files)
    return {
        name: imports_in(
            path.read_text(encoding="utf-8"), name, is_package=path.name == "__init__.py", known=known,
            top=package_dir.name,
        ) - {name}
        for name, path in files.items()
    }


# -- the rules ----------------------------------------------------------------------


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


CORE_LAYERS = [  # bottom first
    ("contracts", ("tokenring.interfaces", "tokenring.hookspecs")),
    ("placement", ("tokenring.placement",)),
    ("plan", ("tokenring.plan",)),
    ("proofs", ("tokenring.proofs",)),
    ("schedules", ("tokenring.schedules", "tokenring.registry")),
    ("runtime", ("tokenring.runtime",)),
    ("planner", ("tokenring.planner",)),
]
FRONT_ENDS = len(CORE_LAYERS)


def layer(module: str) -> str:
    if _within(module, "tokenring.tools") or module == "tokenring.__main__":
        return "tools"
    if _within(module, "tokenring.testing"):
        return "testing"
    if _within(module, "tokenring.kit"):
        return "kit"
    return "core"


def core_level(module: str) -> int:
    """The index of ``module``'s layer in the core's stack (the front ends are the top)."""
    for level, (_, packages) in enumerate(CORE_LAYERS):
        if any(_within(module, package) for package in packages):
            return level
    return FRONT_ENDS


def level_name(level: int) -> str:
    return CORE_LAYERS[level][0] if level < FRONT_ENDS else "front ends"


def core_layers_import_only_downward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{level_name(core_level(module))} module {module} imports {target} "
        f"({level_name(core_level(target))}, a layer above)"
        for module, targets in sorted(graph.items()) if layer(module) == "core"
        for target in sorted(targets)
        if layer(target) == "core" and target != "tokenring" and core_level(target) > core_level(module)
    ]


def core_imports_no_tools_or_testing(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"core module {module} imports {target} ({layer(target)})"
        for module, targets in sorted(graph.items()) if layer(module) == "core"
        for target in sorted(targets) if layer(target) in ("tools", "testing")
    ]


def tools_import_no_testing(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"tool {module} imports the test package: {target}"
        for module, targets in sorted(graph.items()) if layer(module) == "tools"
        for target in sorted(targets) if layer(target) == "testing"
    ]


KIT_MAY_IMPORT = ("tokenring.interfaces",)


def kit_imports_only_interfaces(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"kit module {module} imports {target}; the kit may import only {', '.join(KIT_MAY_IMPORT)}"
        for module, targets in sorted(graph.items()) if layer(module) == "kit"
        for target in sorted(targets) if layer(target) != "kit" and target not in KIT_MAY_IMPORT
    ]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def no_import_cycle(graph: dict[str, set[str]]) -> list[str]:
    cycle = find_cycle(graph)
    return [] if cycle is None else ["import cycle: " + " -> ".join(cycle)]


RULES = [core_layers_import_only_downward, core_imports_no_tools_or_testing, tools_import_no_testing,
         kit_imports_only_interfaces, no_import_cycle]


# -- the package obeys them -----------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def test_the_graph_is_read_from_every_module(graph):
    # Guards the rules below against an empty or blind graph.
    assert {"tokenring", "tokenring.api", "tokenring.kit", "tokenring.tools.cli", "tokenring.testing.suite"} <= set(graph)
    assert "tokenring.tools.benchmark" in graph["tokenring.tools.cli"]           # imported inside a function
    assert "tokenring.interfaces" in graph["tokenring.kit.comms"]                 # relative, two levels
    assert {"tokenring.kit.comms", "tokenring.kit.kernels"} <= graph["tokenring.kit"]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_the_package_obeys(rule, graph):
    violations = rule(graph)
    assert not violations, "\n".join(violations)


# -- each rule can fail -----------------------------------------------------------------


@pytest.mark.parametrize("rule, bad_graph, expected", [
    (core_imports_no_tools_or_testing, {"tokenring.api": {"tokenring.tools.cli"}},
     "core module tokenring.api imports tokenring.tools.cli (tools)"),
    (core_imports_no_tools_or_testing, {"tokenring.nn": {"tokenring.testing.problems"}},
     "core module tokenring.nn imports tokenring.testing.problems (testing)"),
    (core_imports_no_tools_or_testing, {"tokenring": {"tokenring.tools"}},
     "core module tokenring imports tokenring.tools (tools)"),
    (tools_import_no_testing, {"tokenring.tools.benchmark": {"tokenring.testing.tasks"}},
     "tool tokenring.tools.benchmark imports the test package: tokenring.testing.tasks"),
    (tools_import_no_testing, {"tokenring.__main__": {"tokenring.testing"}},
     "tool tokenring.__main__ imports the test package: tokenring.testing"),
    (kit_imports_only_interfaces, {"tokenring.kit.comms": {"tokenring.registry"}},
     "kit module tokenring.kit.comms imports tokenring.registry"),
    (kit_imports_only_interfaces, {"tokenring.kit": {"tokenring"}},
     "kit module tokenring.kit imports tokenring;"),
    (no_import_cycle, {"tokenring.tools.cli": {"tokenring.tools.benchmark"},
                       "tokenring.tools.benchmark": {"tokenring.tools.cli"}},
     "import cycle: tokenring.tools.benchmark -> tokenring.tools.cli -> tokenring.tools.benchmark"),
    (no_import_cycle, {"tokenring": {"tokenring.api"}, "tokenring.api": {"tokenring.executor"},
                       "tokenring.executor": {"tokenring.merge"}, "tokenring.merge": {"tokenring.api"}},
     "import cycle: tokenring.api -> tokenring.executor -> tokenring.merge -> tokenring.api"),
    (core_layers_import_only_downward, {"tokenring.runtime.timeline": {"tokenring.api"}},
     "runtime module tokenring.runtime.timeline imports tokenring.api (front ends, a layer above)"),
    (core_layers_import_only_downward, {"tokenring.plan.model": {"tokenring.proofs.plancheck"}},
     "plan module tokenring.plan.model imports tokenring.proofs.plancheck (proofs, a layer above)"),
    (core_layers_import_only_downward, {"tokenring.interfaces": {"tokenring.placement.masks"}},
     "contracts module tokenring.interfaces imports tokenring.placement.masks (placement, a layer above)"),
], ids=["core-tools", "core-testing", "root-tools", "tool-testing", "main-testing", "kit-core", "kit-root",
        "two-cycle", "three-cycle", "front-runtime", "plan-proofs", "contracts-placement"])
def test_each_rule_catches_a_violation(rule, bad_graph, expected):
    violations = rule(bad_graph)
    assert any(expected in v for v in violations), violations
    # ... and says nothing once the offending import is gone.
    assert rule({module: set() for module in bad_graph}) == []


KNOWN = {"tokenring", "tokenring.api", "tokenring.interfaces", "tokenring.timeline", "tokenring.kit",
         "tokenring.kit.comms", "tokenring.tools", "tokenring.tools.cli", "tokenring.tools.benchmark",
         "tokenring.testing", "tokenring.testing.tasks"}


@pytest.mark.parametrize("module, is_package, source, expected", [
    ("tokenring.api", False, "def f():\n    from .tools import cli\n", {"tokenring.tools.cli"}),
    ("tokenring.api", False, "def f():\n    if True:\n        import tokenring.testing.tasks as t\n",
     {"tokenring.testing.tasks"}),
    ("tokenring.tools.benchmark", False, "from .. import timeline, unshard\n",
     {"tokenring.timeline", "tokenring"}),
    ("tokenring.tools.benchmark", False, "from . import cli\nfrom ..interfaces import Comm\n",
     {"tokenring.tools.cli", "tokenring.interfaces"}),
    ("tokenring.kit", True, "from .comms import wait_works\nfrom ..interfaces import Comm\n",
     {"tokenring.kit.comms", "tokenring.interfaces"}),
    ("tokenring.api", False, "import importlib\nimportlib.import_module('tokenring.testing.tasks')\n",
     {"tokenring.testing.tasks"}),
    ("tokenring.api", False, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .tools import cli\n",
     {"tokenring.tools.cli"}),
    ("tokenring.api", False, "import torch\nfrom torch.distributed import ProcessGroup\n", set()),
], ids=["function", "nested-absolute", "parent-names", "sibling", "package-init", "import_module",
        "type-checking", "foreign"])
def test_imports_are_read_wherever_they_are(module, is_package, source, expected):
    assert imports_in(source, module, is_package=is_package, known=KNOWN) == expected
