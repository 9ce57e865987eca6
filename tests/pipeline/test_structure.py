"""The shape of the rlhf package: every module imports on its own, and no import circle among them."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import rlhf

PACKAGE_DIR = Path(rlhf.__file__).parent


def _modules() -> dict[str, Path]:
    """``rlhf.x.y`` -> source file, for every module of the package."""
    found = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges module -> rlhf module it imports, at any depth of its source (function bodies included:
    a lazy import still ties the two modules together), ``TYPE_CHECKING`` blocks excluded."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        type_only = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        edges = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                # `from . import x` / `from .pkg import mod` may name submodules
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:  # `rlhf.models.X` -> rlhf.models
                    t = t.rpartition(".")[0]
                if t and t != name and t.split(".")[0] == "rlhf":
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "rlhf"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import x\nimport typing\nif typing.TYPE_CHECKING:\n    from .. import b\n")
    mods = {"rlhf": pkg / "__init__.py", "rlhf.sub": pkg / "sub" / "__init__.py", "rlhf.a": pkg / "a.py",
            "rlhf.b": pkg / "b.py", "rlhf.sub.c": pkg / "sub" / "c.py"}
    graph = import_graph(mods)
    assert graph["rlhf.a"] == {"rlhf.b"}
    assert graph["rlhf.b"] == {"rlhf.sub", "rlhf.sub.c"}
    assert graph["rlhf.sub.c"] == {"rlhf.a"}
    assert find_cycle(graph) == ["rlhf.a", "rlhf.b", "rlhf.sub.c", "rlhf.a"]


def test_no_import_circle_in_rlhf():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(m for m in _modules() if m != "rlhf.__main__"))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_walk_finds_the_modules():
    names = set(_modules())
    assert {"rlhf.ppo", "rlhf.ppo_trainer", "rlhf.rollout", "rlhf.generation", "rlhf.evaluate"} <= names
    assert {m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)])} <= {n.split(".")[1] for n in names if "." in n}


def _string_constants(path: Path, value: str) -> list[int]:
    """Lines of ``path`` where the string literal ``value`` appears (docstrings mentioning it do not count)."""
    tree = ast.parse(path.read_text(), str(path))
    return sorted(n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == value)


def test_the_builtin_task_is_named_only_in_rlhf_tasks():
    """The core modules ask the task registry (rlhf.tasks) instead of comparing names with "builtin"."""
    hits = [f"{path.relative_to(PACKAGE_DIR.parent)}:{line}"
            for name, path in sorted(_modules().items()) if not name.startswith("rlhf.tasks")
            for line in _string_constants(path, "builtin")]
    assert hits == [], "the task name as a literal outside rlhf/tasks: " + ", ".join(hits)


def test_string_constants_sees_literals_not_docstrings(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""Say ``builtin`` here."""\nX = "builtin"\nif y == "builtin":\n    pass\n')
    assert _string_constants(src, "builtin") == [2, 3]


def test_no_module_shadows_the_standard_library():
    import sys

    shadowing = sorted(n for n in _modules() if "." in n and n.rsplit(".", 1)[1] in sys.stdlib_module_names)
    assert shadowing == []


SETUP_STEPS = ("RunContext", "load_records_for", "wrap_ddp", "build_optimizer", "build_scheduler", "resume_state",
               "train_loop")


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


@pytest.mark.parametrize("module", ["rlhf.sft", "rlhf.reward", "rlhf.dpo"])
def test_trainers_keep_only_their_own_parts(module):
    """SFT, reward model and DPO run on one skeleton (rlhf.training.Trainer): none of them repeats the
    setup sequence or the step loop, and each is a Trainer with its own tokenizing, model and loss."""
    from rlhf.training import Trainer

    path = _modules()[module]
    assert _names_used(path) & set(SETUP_STEPS) == set()
    mod = importlib.import_module(module)
    trainers = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, Trainer) and v is not Trainer]
    assert len(trainers) == 1
    own = vars(trainers[0])
    assert {"tokenize", "load_model", "loss", "evaluate"} <= set(own)
    assert "train" not in own


def test_the_setup_sequence_is_written_once():
    users = {name for name, path in _modules().items() if "build_optimizer" in _names_used(path)
             and "RunContext" in _names_used(path)}
    assert users == {"rlhf.training"}
