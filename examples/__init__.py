"""Examples shipped with greenpool.

In the wheel this directory is the package ``greenpool.examples`` (setuptools'
``package-dir`` in pyproject.toml), so ``greenpool demo`` and
``gunicorn -c python:greenpool.gunicorn greenpool.examples.flask_app.wsgi:app`` work from
an installed greenpool; in a checkout ``examples.flask_app`` is the same code. The
examples import each other relatively, so both names work.
"""
