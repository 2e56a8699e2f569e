"""What every flow module shares: the stages' cache policy."""

import ast
import functools
import hashlib
import importlib.util
import inspect
import threading
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, ModuleType

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("tia2", "tasks", "flows", "cli", "app")  # pyproject.toml's packages (its packages.find include)


@dataclass
class StageCode(CachePolicy):
    """A key on the code a task runs, beyond its own source (Prefect's TASK_SOURCE): the files of
    the project modules whose functions, classes and values the task function uses, of every
    project module those import (at the top or inside functions), transitively, of the packages
    they are in (their `__init__` runs on import), and every file in those packages' data
    folders (e.g. tia2/models/configs/*.json: architectures and preprocessing)."""

    root: Path = PROJECT_ROOT  # where the packages' files are read

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        if not task_ctx:
            return None
        digest = hashlib.sha256()
        for path in self.files(task_ctx.task.fn):
            digest.update(path.relative_to(self.root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def files(self, fn) -> list[Path]:
        """The files the key of a task running `fn` covers."""
        files, seen, pending = set(), set(), list(_used_modules(fn))
        while pending:
            module = pending.pop()
            if module in seen:
                continue
            seen.add(module)
            path = self.module_file(module)
            if path is None:
                continue
            files.add(path)
            if path.name == "__init__.py":
                files.update(_data_files(path.parent))
            pending += _imported_modules(path.read_bytes(), module, path.name == "__init__.py")
            pending.append(module.rpartition(".")[0])  # its package, "" for a top-level one
        return sorted(files)

    def module_file(self, module: str) -> Path | None:
        """The file of a project module; None for other modules, and for a name that is not a
        module (`from package import name` names either)."""
        if module.partition(".")[0] not in PROJECT_PACKAGES:
            return None
        base = self.root.joinpath(*module.split("."))
        return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)


def _used_modules(fn) -> set[str]:
    """Modules of the globals `fn` (with its nested functions and comprehensions) names: a module
    itself, where a function or class is defined, and for any other value (a constant, an
    instance) fn's own module, which defines or imports it. Attribute names are in the code's
    names too; one that happens to be a global only adds a module."""
    names, codes = set(), [fn.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes += [c for c in code.co_consts if isinstance(c, CodeType)]
    modules = set()
    for name in names & fn.__globals__.keys():
        value = fn.__globals__[name]
        if isinstance(value, ModuleType):
            modules.add(value.__name__)
            continue
        value = inspect.unwrap(value)  # a task, a cached function: the function it wraps
        if inspect.isfunction(value) or inspect.isclass(value):
            modules.add(value.__module__)
        else:
            modules.add(fn.__module__)
    return modules


# CPython 3.11's parser is not thread-safe: two tasks keyed at once in threads (generation shards)
# failed with "SystemError: AST constructor recursion depth mismatch", seen here.
_AST_PARSE = threading.Lock()


@functools.cache
def _imported_modules(source: bytes, module: str, is_package: bool) -> list[str]:
    """Every module an import statement in `source` may load, `from x import y` giving both x
    and x.y (y may be a submodule). Cached on the source: parsing is the costly part of a key."""
    package = module if is_package else module.rpartition(".")[0]
    imported = []
    with _AST_PARSE:
        tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            imported += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return imported


def _data_files(package: Path) -> list[Path]:
    """Files in a package's data folders: its subfolders that are not packages, at any depth."""
    files = []
    for folder in package.iterdir():
        if folder.is_dir() and folder.name != "__pycache__" and not (folder / "__init__.py").exists():
            files += [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return files


# A stage's key: its inputs but the MLflow parent run (it differs every run), its source, and the
# code it runs (StageCode).
CACHED = (INPUTS - "parent_run_id") + TASK_SOURCE + StageCode()
