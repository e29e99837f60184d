"""Optional dependencies stay optional: greenpool.flask without prometheus_client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A meta path finder that makes prometheus_client look uninstalled.
_WITHOUT_PROMETHEUS = r"""
import sys

class NoPrometheus:
    def find_spec(self, name, path=None, target=None):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPrometheus())

import greenpool.flask
from flask import Flask

app = Flask("noprom")
app.config["GREENPOOL_CONNINFO"] = "host=127.0.0.1 port=1 dbname=x"
greenpool.flask.GreenPool(app)
app.register_blueprint(greenpool.flask.stats_blueprint(public=True), url_prefix="/_greenpool")
client = app.test_client()
print("stats", client.get("/_greenpool/stats").status_code)
answer = client.get("/_greenpool/metrics")
print("metrics", answer.status_code, answer.get_data(as_text=True).strip())
try:
    greenpool.flask.GreenPoolCollector(app)
except ImportError as ex:
    print("collector", ex)
assert "prometheus_client" not in sys.modules
"""


def test_flask_extension_imports_and_serves_without_prometheus_client() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PROMETHEUS],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    hint = "pip install 'greenpool[prometheus]'"
    assert lines["stats"] == "200"
    assert lines["metrics"].startswith("501 ") and hint in lines["metrics"]
    assert hint in lines["collector"]


def test_metrics_endpoint_with_prometheus_client() -> None:
    """The lazy imports still serve the Prometheus text format when it is installed."""
    from flask import Flask

    import greenpool.flask

    app = Flask("prom")
    app.config["GREENPOOL_CONNINFO"] = "host=127.0.0.1 port=1 dbname=x"
    greenpool.flask.GreenPool(app)
    app.register_blueprint(greenpool.flask.stats_blueprint(public=True), url_prefix="/_greenpool")
    answer = app.test_client().get("/_greenpool/metrics")
    assert answer.status_code == 200
    assert answer.mimetype == "text/plain" and b"# HELP greenpool_max_size" in answer.data
