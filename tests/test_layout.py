"""The layout's dependency direction, read from the code: every import of every module (function-level ones too),
resolved and checked against the stated order

    fleetctl → workers → tasks → beat_schedule → fleetstate → cachemgr

A package may import any package to its right, never one to its left. `ossserver` (the development OSS server, not
installed) is imported only by tests, bench and fleetctl/localfleet.py. cachemgr never imports Celery and never
reads the environment. Test modules never import from one another. Every import of a project module names a module
(or a name in it) that exists, so a path left behind by a move fails here, not in a container.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

from .support import REPO

ORDER = ("fleetctl", "workers", "tasks", "beat_schedule", "fleetstate", "cachemgr")
FREE = ("tests", "bench")  # may import anything
OSS_SERVER = "ossserver"
OSS_SERVER_USERS = ("tests", "bench", "fleetctl/localfleet.py")
PROJECT = (*ORDER, OSS_SERVER, *FREE)
NO_CELERY = {"cachemgr": ("celery",)}
ENVIRONMENT = ("environ", "environb", "getenv", "putenv", "unsetenv")


@dataclass(frozen=True)
class Import:
    path: str  # the importing file, relative to the root
    line: int
    module: str  # absolute module name
    names: tuple[str, ...] = ()  # for `from module import names`


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, rel: Path) -> list[Import]:
    """Every import in the file, at any depth, with relative imports made absolute."""
    tree = ast.parse((root / rel).read_text(), filename=str(rel))
    package = module_name(rel).split(".") if rel.name == "__init__.py" else module_name(rel).split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel.as_posix(), node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append(Import(rel.as_posix(), node.lineno, module, tuple(a.name for a in node.names)))
    return found


def reads_environment(root: Path, rel: Path) -> list[int]:
    """Lines that touch os.environ / os.getenv (or import them from os)."""
    lines = []
    for node in ast.walk(ast.parse((root / rel).read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT and isinstance(node.value, ast.Name) \
                and node.value.id == "os":
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name in ENVIRONMENT for a in node.names):
            lines.append(node.lineno)
    return lines


def python_files(root: Path) -> list[Path]:
    files = []
    for top in PROJECT:
        if (root / f"{top}.py").is_file():
            files.append(Path(f"{top}.py"))
        files += sorted(p.relative_to(root) for p in (root / top).rglob("*.py")) if (root / top).is_dir() else []
    return files


def owner(rel: str) -> str:
    return rel.split("/", 1)[0].removesuffix(".py")


def resolves(root: Path, module: str, names: tuple[str, ...]) -> list[str]:
    """What does not exist: the module itself, or a name imported from it (a submodule or a name bound there)."""
    path = root.joinpath(*module.split("."))
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not source.is_file():
        return [module] if not path.is_dir() else []  # a folder without __init__: a namespace package
    bound = bound_names(source)
    if "__getattr__" in bound or "*" in names:
        return []
    return [f"{module}.{name}" for name in names
            if name not in bound and not (path / name).is_dir() and not (path / f"{name}.py").is_file()]


@functools.cache
def bound_names(source: Path) -> frozenset[str]:
    """The names a module binds at any depth: functions, classes, assignments, imports."""
    bound: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                bound |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return frozenset(bound)


def violations(root: Path) -> tuple[list[str], int]:
    """(every broken rule as one line, how many imports of project modules were checked)."""
    problems: list[str] = []
    checked = 0
    for rel in python_files(root):
        here = owner(rel.as_posix())
        for imp in imports_of(root, rel):
            top = imp.module.split(".")[0]
            where = f"{imp.path}:{imp.line}"
            for banned in NO_CELERY.get(here, ()):
                if top == banned:
                    problems.append(f"{where}: {here} imports {imp.module} ({here} never imports {banned})")
            if top not in PROJECT:
                continue
            checked += 1
            problems += [f"{where}: imports {m}, which does not exist" for m in resolves(root, imp.module, imp.names)]
            if top == OSS_SERVER and here != OSS_SERVER and not imp.path.startswith(OSS_SERVER_USERS):
                problems.append(f"{where}: imports {imp.module}; only {', '.join(OSS_SERVER_USERS)} may use ossserver")
            if here in ORDER and top in ORDER and ORDER.index(top) < ORDER.index(here):
                problems.append(f"{where}: {here} imports {imp.module}, against {' → '.join(ORDER)}")
            if here in FREE or top in FREE:
                if top in FREE and here not in FREE:
                    problems.append(f"{where}: {here} imports {imp.module} (tests and bench are never imported)")
                mod = imp.module.split(".")
                if here == "tests" and Path(imp.path).name.startswith("test_") and mod[0] == "tests" and len(mod) > 1 \
                        and mod[1].startswith("test_"):
                    problems.append(f"{where}: a test module imports {imp.module}; shared helpers go to tests/support.py")
        if here == "cachemgr":
            problems += [f"{rel.as_posix()}:{n}: cachemgr reads the environment (settings are passed in)"
                         for n in reads_environment(root, rel)]
    return problems, checked


def test_the_project_imports_point_one_way():
    problems, checked = violations(REPO)
    assert problems == []
    assert checked > 300, f"only {checked} project imports found: the checker is not looking"


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    files = {
        "cachemgr/__init__.py": '"""x"""\nfrom .names import queue_for\n',
        "cachemgr/names.py": "def queue_for(r):\n    return r\n",
        "cachemgr/leaky.py": "import os\nfrom celery import Celery\n\ndef f():\n    from tasks.app import app\n"
                             "    return os.environ.get('X'), os.getenv('Y')\n",
        "cachemgr/up.py": "from ..fleetstate import routes\n",
        "fleetstate/__init__.py": "",
        "fleetstate/routes.py": "from cachemgr import queue_for\nfrom cachemgr.names import queue_for as q\n",
        "tasks/__init__.py": "from workers.jobs import run\n",
        "tasks/app.py": "import beat_schedule\nfrom fleetstate import routes, gone\napp = 1\n",
        "beat_schedule.py": "from tasks import app\n",
        "workers/__init__.py": "",
        "workers/jobs.py": "import ossserver\nfrom tasks.app import app\nrun = 1\n",
        "fleetctl/__init__.py": "",
        "fleetctl/localfleet.py": "from ossserver import OssServer\nfrom workers.jobs import run\nimport workers.oldcli\n",
        "ossserver/__init__.py": "class OssServer:\n    pass\n",
        "tests/__init__.py": "",
        "tests/support.py": "from cachemgr import queue_for\n",
        "tests/test_a.py": "from .support import queue_for\nfrom .test_b import helper\n",
        "tests/test_b.py": "def helper():\n    pass\n",
        "bench/x.py": "from tests.support import queue_for\nfrom ossserver import OssServer\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems, checked = violations(tmp_path)
    expected = [
        "cachemgr/leaky.py:2: cachemgr imports celery",
        "cachemgr/leaky.py:5: cachemgr imports tasks.app, against",  # a function-level import
        "cachemgr/leaky.py:6: cachemgr reads the environment",
        "cachemgr/up.py:1: cachemgr imports fleetstate, against",  # a relative import, resolved
        "tasks/__init__.py:1: tasks imports workers.jobs, against",
        "tasks/app.py:2: imports fleetstate.gone, which does not exist",
        "beat_schedule.py:1: beat_schedule imports tasks, against",
        "workers/jobs.py:1: imports ossserver; only",
        "fleetctl/localfleet.py:3: imports workers.oldcli, which does not exist",
        "tests/test_a.py:2: a test module imports tests.test_b",
    ]
    for fragment in expected:
        assert [p for p in problems if p.startswith(fragment)], (fragment, problems)
    assert len(problems) == len(expected) + 1, problems  # os.environ and os.getenv: two reads on line 6
    assert checked == 19
