"""greenpool.django on the oldest and the newest Django it supports, not only the one
pip picks for the suite's interpreter: Django 4.2 LTS on this interpreter (Python 3.11 in
CI) and the newest 6.x on Python 3.12 (Django 6 needs 3.12 or later).

For each, a throwaway virtualenv outside the checkout (``uv venv``) gets greenpool from
a copy of this checkout with its django and psycopg2 extras, the Django release, pytest,
pytest-timeout and Werkzeug (``uv pip install``), and runs tests/test_django.py against
this session's server (``GREENPOOL_TEST_DSN``), in a database of its own so both can
migrate at once. The inner run imports greenpool from the checkout, as the suite does
(pytest's ``pythonpath``); the installed copy brings the declared dependencies. Both
releases install and run concurrently (the inner runs mostly wait on the server); uv
makes the cold installs take seconds (``uv`` comes with the dev extras).

A machine without Python 3.12 skips the 6.x case, saying so (CI fails on a skip).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import psycopg
import pytest
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from tests.support.freshvenv import copy_source, find_uv
from tests.support.hygiene import outcome

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass(frozen=True)
class Release:
    name: str
    requirement: str
    series: str  # the version Django reports starts with this
    python: tuple[int, int] | None  # None: this interpreter


RELEASES = (
    Release("django42", "Django>=4.2,<5.0", "4.2.", None),
    Release("django6", "Django>=6.0,<7.0", "6.", (3, 12)),
)


@dataclass
class Run:
    versions: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def find_python(version: tuple[int, int]) -> str | None:
    """An interpreter of this version: pyenv's (``$PYENV_ROOT`` or ``~/.pyenv``), newest
    patch release first, then ``pythonX.Y`` on PATH; each must report that version."""
    name = "python{}.{}".format(*version)
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = glob.glob(os.path.join(root, "versions", "{}.{}.*".format(*version), "bin", name))

    def patch(path: str) -> int:
        match = re.search(r"/versions/\d+\.\d+\.(\d+)/", path)
        return int(match.group(1)) if match else -1

    candidates = sorted(found, key=patch, reverse=True)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(on_path)
    for candidate in candidates:
        try:
            out = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "{}.{}".format(*version):
            return candidate
    return None


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "GREENPOOL_TEST_DSN")
    }
    env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1", **extra)
    return env


def _run(argv: list[str], timeout: float, **env: str) -> str:
    result = subprocess.run(
        argv, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n"
            f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    return result.stdout


def _expected_tests() -> int:
    """tests/test_django.py's test functions (none is parametrised)."""
    text = (REPO / "tests" / "test_django.py").read_text()
    return len(re.findall(r"^def test_", text, flags=re.MULTILINE))


def run_release(release: Release, uv: str, python: str, src: Path, home: Path, dsn: str) -> Run:
    """Install the release into a new virtualenv and run tests/test_django.py in it."""
    run = Run()
    venv = home / "venv"
    venv_python = str(venv / "bin" / "python")
    start = time.monotonic()
    _run([uv, "venv", "--quiet", "--python", python, str(venv)], timeout=60)
    requirements = [
        f"greenpool[django,psycopg2] @ {src.as_uri()}",
        release.requirement,
        "pytest>=8",
        "pytest-timeout>=2.3",
        "Werkzeug>=2.3",
    ]
    _run([uv, "pip", "install", "--quiet", "--python", venv_python, *requirements], timeout=300)
    run.seconds["install"] = time.monotonic() - start
    probe = (
        "import json, platform, django, psycopg, psycopg2;"
        "print(json.dumps({'django': django.get_version(), 'psycopg': psycopg.__version__,"
        " 'psycopg2': psycopg2.__version__.split()[0],"
        " 'python': platform.python_version()}))"
    )
    run.versions = json.loads(_run([venv_python, "-c", probe], timeout=60))
    start = time.monotonic()
    junit = home / "junit.xml"
    _run(
        [venv_python, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "-W", "error::pytest.PytestConfigWarning",  # e.g. pytest-timeout's ini key unknown
         f"--junitxml={junit}", "tests/test_django.py"],
        timeout=420, GREENPOOL_TEST_DSN=dsn,
    )  # fmt: skip
    run.seconds["tests"] = time.monotonic() - start
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    run.counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    return run


@pytest.fixture(scope="module")
def runs(dsn: str) -> Iterator[dict[str, Any]]:
    """Both releases installing and testing at once, each in a greenlet; a release that
    cannot run here maps to the reason (a str)."""
    uv = find_uv()
    workdir = Path(tempfile.mkdtemp(prefix="greenpool-django-versions-"))
    assert not workdir.resolve().is_relative_to(REPO)
    databases: list[str] = []
    started: dict[str, Any] = {}
    try:
        src = copy_source(workdir)
        for release in RELEASES:
            if uv is None:
                started[release.name] = "uv is not installed: pip install -e '.[dev]'"
                continue
            python = sys.executable if release.python is None else find_python(release.python)
            if python is None:
                started[release.name] = (
                    "no Python {}.{} interpreter (pyenv or PATH) for {}".format(
                        *(release.python or (0, 0)), release.requirement
                    )
                )
                continue
            database = f"gp_{release.name}_{uuid.uuid4().hex[:6]}"
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(database)))
            databases.append(database)
            home = workdir / release.name
            home.mkdir()
            started[release.name] = gevent.spawn(
                outcome, run_release, release, uv, python, src, home,
                make_conninfo(dsn, dbname=database),
            )  # fmt: skip
        yield started
    finally:
        gevent.killall([g for g in started.values() if isinstance(g, gevent.Greenlet)])
        with psycopg.connect(dsn, autocommit=True) as conn:
            for database in databases:
                conn.execute(
                    pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        pgsql.Identifier(database)
                    )
                )
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("release", RELEASES, ids=[r.name for r in RELEASES])
def test_django_release_runs_the_django_tests(
    release: Release, runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    started = runs[release.name]
    if isinstance(started, str):
        pytest.skip(started)
    result = started.get(timeout=540)
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, Run)
    with capsys.disabled():  # which release ran, and what it cost, in CI's log too
        print(
            f"\n{release.name}: Django {result.versions['django']} on Python "
            f"{result.versions['python']} (psycopg {result.versions['psycopg']}, psycopg2 "
            f"{result.versions['psycopg2']}): install {result.seconds['install']:.1f} s, "
            f"tests/test_django.py {result.seconds['tests']:.1f} s, {result.counts}"
        )
    assert result.versions["django"].startswith(release.series), result.versions
    if release.python is not None:
        assert result.versions["python"].startswith("{}.{}.".format(*release.python))
    expected = _expected_tests()
    assert result.counts == {"tests": expected, "failures": 0, "errors": 0, "skipped": 0}
