"""The seams between packages, read from the source (AST, no imports run): no import cycle anywhere, importlib
included, and each layer imports only what it may (README "Layout").

An import counts wherever it stands (module level or inside a function): `import a.b`, `from a import b` (the
module a.b when it exists, else a), relative imports, and `importlib.import_module("a.b")` / `__import__("a.b")`
with a constant name.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api_client", "api", "worker", "kernels")
# The service modules of worker/ (everything there but the inference library).
SERVICE_PREFIXES = ("worker.app", "worker.tasks", "worker.jobs", "worker.storage", "worker.events", "worker.lease",
                    "worker.settings", "worker.gpus", "worker.metrics", "worker.local_run", "worker.__main__")
SERVICE_LIBRARIES = ("celery", "redis", "boto3", "botocore", "prometheus_client", "kombu")
TORCH_SIDE = ("torch", "triton", "worker", "kernels", "transformers", "safetensors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else ():
            found[module_name(path)] = path
    return found


MODULES = project_modules()


class _Imports(ast.NodeVisitor):
    """(imported module, enclosing function or None) for every import in one module."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found, self._function = [], None

    def visit_FunctionDef(self, node):
        outer, self._function = self._function, self._function or node.name
        self.generic_visit(node)
        self._function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        self.found += [(alias.name, self._function) for alias in node.names]

    def visit_ImportFrom(self, node):
        base = self._absolute(node.module or "", node.level)
        for alias in node.names:
            submodule = f"{base}.{alias.name}" if base else alias.name
            self.found.append((submodule if submodule in MODULES else base, self._function))

    def visit_Call(self, node):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            self.found.append((node.args[0].value, self._function))
        self.generic_visit(node)

    def _absolute(self, module: str, level: int) -> str:
        if not level:
            return module
        base = self.package.rsplit(".", level - 1)[0] if level > 1 else self.package
        return f"{base}.{module}" if module else base


def imports_of(module: str) -> list[tuple[str, str | None]]:
    path = MODULES[module]
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


def import_graph() -> dict[str, set[str]]:
    return {module: {name for name, _ in imports_of(module) if name in MODULES and name != module}
            for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def under(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_the_walk_sees_every_package_and_the_kinds_of_import():
    assert {"api_client.state", "api_client.cli", "worker.jobs", "worker.inference.pipeline", "kernels"} <= set(MODULES)
    assert ("worker.jobs", "run_local") in imports_of("worker.local_run")       # inside a function
    assert "kernels.attention" in {name for name, _ in imports_of("kernels")}    # `from . import attention`
    assert "worker.inference.denoise" in import_graph()["worker.inference.pipeline"]


def test_cycles_are_found_including_importlib_calls():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import importlib\nimportlib.import_module('worker.jobs')\n__import__('kernels')")
    visitor = _Imports("api_client.x", False)
    visitor.visit(tree)
    assert [name for name, _ in visitor.found] == ["importlib", "worker.jobs", "kernels"]


def test_no_import_cycle_anywhere():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if under(m, ("api_client", "api"))))
def test_client_and_api_import_no_torch_and_no_worker(module):
    wrong = [(name, where) for name, where in imports_of(module) if under(name, TORCH_SIDE)]
    assert wrong == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if under(m, ("worker.inference", "kernels"))))
def test_inference_library_imports_nothing_of_the_service(module):
    wrong = [name for name, _ in imports_of(module)
             if under(name, SERVICE_LIBRARIES) or under(name, SERVICE_PREFIXES) or under(name, ("api_client", "api"))]
    assert wrong == []


def test_the_client_and_the_gpu_supervisor_load_without_torch():
    """Run, not read: importing the client, the CLI, the settings and the supervisor's entry point loads no torch."""
    code = ("import sys, api_client.client, api_client.cli, api_client.state, worker.settings, worker.__main__\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'kernels')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr
