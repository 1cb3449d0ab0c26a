"""``manage.py check --deploy`` sees through the platform's own names for Django's security and CSRF middleware.

config.middleware runs Django's ``SecurityMiddleware``, ``CommonMiddleware`` and ``CsrfViewMiddleware`` under names of
its own (no thread hops under ASGI). Django's deployment checks look for its own dotted names in ``MIDDLEWARE``: they
would warn that the middleware is missing (security.W001, W003) and skip every check that depends on it (HSTS, SSL
redirect, nosniff, referrer and opener policies, secure CSRF cookie). Here those checks run again on ``MIDDLEWARE``
with each of our names read as Django's; what they find is reported under ``config.`` ids, and the two originals that
only looked for Django's names are silenced (settings.SILENCED_SYSTEM_CHECKS).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Tags, register
from django.core.checks.security import base, csrf
from django.test.utils import override_settings

# Our middleware, and Django's that it runs.
DJANGO_NAMES = {
    "config.middleware.SecurityMiddleware": "django.middleware.security.SecurityMiddleware",
    "config.middleware.CommonMiddleware": "django.middleware.common.CommonMiddleware",
    "config.middleware.CsrfViewMiddleware": "django.middleware.csrf.CsrfViewMiddleware",
}
# Django's deployment checks that depend on the two middleware being listed under Django's names.
MIDDLEWARE_CHECKS = (
    base.check_security_middleware,
    base.check_sts,
    base.check_sts_include_subdomains,
    base.check_sts_preload,
    base.check_content_type_nosniff,
    base.check_ssl_redirect,
    base.check_referrer_policy,
    base.check_cross_origin_opener_policy,
    csrf.check_csrf_middleware,
    csrf.check_csrf_cookie_secure,
)


@register(Tags.security, deploy=True)
def check_security_middleware_by_django_name(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    as_django = [DJANGO_NAMES.get(name, name) for name in settings.MIDDLEWARE]
    found: list[CheckMessage] = []
    with override_settings(MIDDLEWARE=as_django):
        for check in MIDDLEWARE_CHECKS:
            found.extend(check(app_configs, **kwargs))
    return [
        CheckMessage(message.level, message.msg, hint=message.hint, obj=message.obj, id=f"config.{message.id}")
        for message in found
    ]
