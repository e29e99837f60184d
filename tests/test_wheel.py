"""The wheel, installed into a fresh virtualenv outside the checkout, does what the README
advertises: ``greenpool --help``, ``greenpool budget``, ``greenpool demo --quick`` (with its
embedded PostgreSQL) and ``gunicorn -c python:greenpool.gunicorn`` on the example app.

Everything runs with its working directory outside the repository and no PYTHONPATH, so
nothing can come from the source tree. uv keeps the install to seconds.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from greenpool.embedded import free_port
from tests.support.freshvenv import copy_source, find_uv

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DATABASE_URL", "PYTHONHOME")
        and not k.startswith(("PG", "GREENPOOL_", "FLASK_", "GUNICORN_"))
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(
    argv: list[str], cwd: Path, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, cwd=cwd, env=_clean_env(**env), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="greenpool-wheel-"))
    assert not path.resolve().is_relative_to(REPO)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _build_wheel(workdir: Path) -> Path:
    """Build from a copy of what the wheel is made of, so the checkout gets no build/."""
    src = copy_source(workdir)
    dist = workdir / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(src)],
         cwd=workdir, timeout=300)  # fmt: skip
    (wheel,) = dist.glob("greenpool-*.whl")
    return wheel


def _installer(py: str) -> list[str]:
    """uv (a test dependency: ~10x faster from an empty cache), else the venv's pip."""
    uv = find_uv()
    if uv is None:
        return [py, "-m", "pip", "install", "--quiet", "--no-compile"]
    return [uv, "pip", "install", "--quiet", "--python", py]


def _wheel_has_every_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {
        str(p.parent.relative_to(REPO))
        for p in (REPO / "greenpool").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages missing from the wheel: {missing}"
    for name in ("py.typed", "gunicorn.py", "embedded/server.py"):
        assert f"greenpool/{name}" in names
    for name in ("__init__", "views", "schema", "wsgi", "locustfile"):
        assert f"greenpool/examples/flask_app/{name}.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]


def _serve_and_request(venv: Path, workdir: Path, dsn: str) -> None:
    env = _clean_env(DATABASE_URL=dsn, GUNICORN_NO_CONTROL_SOCKET="1",
                     FLASK_GREENPOOL_NAME="wheel-test")  # fmt: skip
    port = free_port()
    log = workdir / "gunicorn.log"
    argv = [
        str(venv / "bin" / "gunicorn"), "-c", "python:greenpool.gunicorn", "--workers", "1",
        "--bind", f"127.0.0.1:{port}", "greenpool.examples.flask_app.wsgi:app",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/accounts?per_page=2")
                response = conn.getresponse()
                body = response.read()
                conn.close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                gevent.sleep(0.1)
        assert response.status == 200, body
        assert len(json.loads(body)["items"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0, log.read_text()
        assert "pool 'wheel-test' closed" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_wheel_in_a_fresh_virtualenv(workdir: Path, dsn: str) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    wheel = _build_wheel(workdir)
    _wheel_has_every_package(wheel)
    timings["build"] = time.monotonic() - t0

    t = time.monotonic()
    venv = workdir / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=workdir, timeout=120)
    py = str(venv / "bin" / "python")
    _run([*_installer(py), f"{wheel}[demo]"], cwd=workdir, timeout=600)
    timings["install"] = time.monotonic() - t

    t = time.monotonic()
    where = _run([py, "-c", "import greenpool; print(greenpool.__file__)"], cwd=workdir, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    helped = _run([str(venv / "bin" / "greenpool"), "--help"], cwd=workdir, timeout=60).stdout
    assert "budget" in helped and "demo" in helped and "DATABASE_URL" in helped

    budget = _run(
        [str(venv / "bin" / "greenpool"), "budget", "--workers", "1", "--max-size", "2"],
        cwd=workdir, timeout=60, DATABASE_URL=dsn,
    )  # fmt: skip
    assert "yes:" in budget.stdout and budget.stderr == "", budget.stdout + budget.stderr
    timings["help+budget"] = time.monotonic() - t

    t = time.monotonic()
    demo = _run(
        [str(venv / "bin" / "greenpool"), "demo", "--quick", "--users", "30",
         "--output", str(workdir / "demo")],
        cwd=workdir, timeout=300,
    )  # fmt: skip
    assert "embedded PostgreSQL ready" in demo.stdout, demo.stdout
    assert "0 server connection(s) left" in demo.stdout, demo.stdout
    timings["demo"] = time.monotonic() - t

    t = time.monotonic()
    _run([py, "-m", "greenpool.examples.flask_app.schema"], cwd=workdir, timeout=60,
         DATABASE_URL=dsn)  # fmt: skip
    _serve_and_request(venv, workdir, dsn)
    timings["gunicorn"] = time.monotonic() - t

    total = time.monotonic() - t0
    print(
        f"\nwheel test: {total:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + ")"
    )
