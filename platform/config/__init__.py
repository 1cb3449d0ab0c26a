"""The Django project: settings, URLs, ASGI/WSGI and the Celery app (the composition root)."""

from config.celery import app as celery_app

__all__ = ("celery_app",)
