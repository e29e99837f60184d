"""WSGI entry point of the example Django project.

    gunicorn -c deploy/gunicorn.conf.py examples.django_app.wsgi:application
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
application = get_wsgi_application()
