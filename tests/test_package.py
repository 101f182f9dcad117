"""The package as a user gets it: a wheel built from the source tree in a
clean venv holds lite's modules, the Django backend and the license, and
nothing of bench/, tests/ or examples/; installed alone, the core imports
with the standard library only and `lite` works; with its extras, every
module imports; pip builds the same wheel from a git URL (the committed
tree)."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import lite_db

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [
    "lite_db",
    "lite_engine",
    "lite_counters",
    "lite_config",
    "lite_ops",
    "lite_app",
    "lite_page",
    "lite_metrics",
]
ADAPTERS = ["lite_flask", "lite_django.base", "lite_pg", "lite_sqlalchemy"]
# The standard library only:
CORE = ["lite_db", "lite_engine", "lite_counters", "lite_config", "lite_ops"]


def _run(*argv, cwd=None):
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    work = tmp_path_factory.mktemp("package")
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "data", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    _run(sys.executable, "-m", "venv", str(work / "venv"))
    pip = str(work / "venv" / "bin" / "pip")
    _run(pip, "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(source))
    (built,) = (work / "dist").iterdir()
    return work, built


def test_the_wheel_holds_the_modules_and_nothing_else(wheel):
    _, built = wheel
    assert built.name == f"lite-{lite_db.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(built).namelist()
    code = sorted(name for name in names if ".dist-info/" not in name)
    assert code == sorted(
        [f"{name}.py" for name in (*MODULES, "lite_flask", "lite_pg", "lite_sqlalchemy")]
        + ["lite_django/__init__.py", "lite_django/base.py"]
    )
    assert f"lite-{lite_db.__version__}.dist-info/licenses/LICENSE" in names


def test_installed_the_core_needs_only_the_standard_library_and_lite_works(wheel):
    work, built = wheel
    python = str(work / "venv" / "bin" / "python")
    _run(str(work / "venv" / "bin" / "pip"), "install", "-q", str(built))
    installed = _run(python, "-m", "pip", "freeze").splitlines()
    assert installed == [f"lite @ {built.as_uri()}"], installed  # no dependency came with it
    _run(python, "-c", f"import {', '.join(CORE)}")
    assert _run(str(work / "venv" / "bin" / "lite"), "--version").strip() == (
        f"lite {lite_db.__version__}"
    )
    checked = subprocess.run(
        [str(work / "venv" / "bin" / "lite"), "check", str(work / "missing.db")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1


def test_with_its_extras_every_module_imports(wheel):
    work, built = wheel
    pip = str(work / "venv" / "bin" / "pip")
    extras = "app,flask,django,postgres,sqlalchemy,aiosqlite"
    _run(pip, "install", "-q", f"lite[{extras}] @ {built.as_uri()}")
    code = "import " + ", ".join(MODULES + ADAPTERS) + "; print(lite_app.application)"
    out = _run(str(work / "venv" / "bin" / "python"), "-c", code, cwd=work)
    assert "Bottle" in out


def test_installed_the_sqlalchemy_urls_need_no_import(wheel):
    """The entry points: an app changes its URL and nothing else."""
    work, built = wheel
    pip = str(work / "venv" / "bin" / "pip")
    _run(pip, "install", "-q", f"lite[sqlalchemy,aiosqlite] @ {built.as_uri()}")
    code = (
        "import sqlalchemy, sqlalchemy.ext.asyncio as aio, sys; "
        "print(type(sqlalchemy.create_engine('sqlite+lite:///a.db').dialect).__name__); "
        "print(type(aio.create_async_engine('sqlite+aiolite:///a.db').dialect).__name__); "
        "print('lite_sqlalchemy' in sys.modules)"
    )
    out = _run(str(work / "venv" / "bin" / "python"), "-c", code, cwd=work)
    assert out.split() == ["LiteDialect", "LiteDialect_async", "True"]


def test_pip_builds_the_same_wheel_from_a_git_url(wheel, tmp_path):
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.fail("not a git checkout")
    work, built = wheel
    pip = str(work / "venv" / "bin" / "pip")
    _run(pip, "wheel", "-q", "--no-deps", "-w", str(tmp_path), f"git+file://{ROOT}")
    (from_git,) = tmp_path.iterdir()
    assert from_git.name == built.name
    assert sorted(zipfile.ZipFile(from_git).namelist()) == sorted(zipfile.ZipFile(built).namelist())
