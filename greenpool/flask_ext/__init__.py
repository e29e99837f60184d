"""The Flask integration of greenpool: ``GreenPool.init_app`` loads it (see
:mod:`greenpool.flask`)."""
