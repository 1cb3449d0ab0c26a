"""The one settings module. Every value comes from the environment, with safe defaults.

The embedded default (a fresh machine, no services) is SQLite, with the private Redis the run command
starts passed in as REDIS_URL. Production sets DATABASE_URL, REDIS_URL, SECRET_KEY and ALLOWED_HOSTS.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parents[2]
DATA_DIR = Path(env_str("PLATFORM_DATA_DIR") or BASE_DIR / "var")

DEBUG = env_bool("DEBUG", False)
# The embedded run (the README's first command): one machine, plain HTTP on localhost.
EMBEDDED = env_bool("PLATFORM_EMBEDDED", False)


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    if EMBEDDED:
        return _kept_secret_key(DATA_DIR / "secret_key")
    if DEBUG:
        return "insecure-debug-only-" + "x" * 40
    raise ImproperlyConfigured("SECRET_KEY is required when DEBUG is off (or run embedded: PLATFORM_EMBEDDED=1).")


def _kept_secret_key(path: Path) -> str:
    """The embedded run's key: generated once and kept, so sessions and signed URLs survive a restart. Written whole
    or not at all (a file of its own, then renamed): a key file left empty by a full disk made every later start fail
    on an empty SECRET_KEY, space freed or not; an empty one (written so before) is replaced."""
    kept = path.read_text().strip() if path.exists() else ""
    if kept:
        return kept
    key = secrets.token_urlsafe(50)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")  # readable by its owner only
        with os.fdopen(handle, "w") as out:
            out.write(key)
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise ImproperlyConfigured(f"Cannot keep the embedded run's secret key in {path.parent}: {exc}") from None
    return key


SECRET_KEY = _secret_key()

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# TLS: secure cookies unless serving plain HTTP locally; trust X-Forwarded-Proto only behind a proxy.
SECURE_COOKIES = env_bool("SECURE_COOKIES", not (DEBUG or EMBEDDED))
SESSION_COOKIE_SECURE = SECURE_COOKIES
CSRF_COOKIE_SECURE = SECURE_COOKIES
SESSION_COOKIE_HTTPONLY = True
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
USE_X_FORWARDED_HOST = env_bool("USE_X_FORWARDED_HOST", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Probes and Prometheus reach the pods inside the cluster over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
# HSTS (sent on HTTPS responses only): a year in production, off for plain-HTTP local runs.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if (DEBUG or EMBEDDED) else 365 * 24 * 3600, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Django's "SecurityMiddleware / CsrfViewMiddleware not in MIDDLEWARE": they are, under config.middleware's names;
# config.checks runs those deployment checks again reading our names as Django's (config.security.W001 if absent).
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W003"]
# Content-Security-Policy of every HTML page (config.middleware.ContentSecurityPolicyMiddleware, which also
# sends X-Frame-Options on them, API paths included): our own scripts and styles only, nothing inline, no framing.
# Stripe Checkout is where the "buy credits" form redirects; output images, videos and audio may come from the bucket.
CONTENT_SECURITY_POLICY: dict[str, list[str]] = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:", *env_list("CSP_IMG_SRC", [])],
    "media-src": ["'self'", "data:"],
    "font-src": ["'self'"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'none'"],
    "form-action": ["'self'", "https://checkout.stripe.com"],
    "frame-ancestors": ["'none'"],
}

# /metrics (config/metrics.py) answers only requests bearing this token (Authorization: Bearer ...); empty, it is off
# (404). Long enough not to be guessed: `python -c "import secrets; print(secrets.token_urlsafe(32))"`.
METRICS_TOKEN = env_str("METRICS_TOKEN") or ""
if METRICS_TOKEN and len(METRICS_TOKEN) < 32:
    raise ImproperlyConfigured("METRICS_TOKEN must be at least 32 characters long.")

# Log-in, sign-up and password-reset forms (accounts/login_protection.py), counted in the shared cache. A log-in
# is refused (429) for LOGIN_LOCKOUT_SECONDS once an account, or a client address, has failed this often within it.
LOGIN_FAILURES_PER_ACCOUNT = env_int("LOGIN_FAILURES_PER_ACCOUNT", 10, minimum=1)
LOGIN_FAILURES_PER_ADDRESS = env_int("LOGIN_FAILURES_PER_ADDRESS", 30, minimum=1)
LOGIN_LOCKOUT_SECONDS = env_int("LOGIN_LOCKOUT_SECONDS", 15 * 60, minimum=1)
# Sign-up and password-reset submissions per client address an hour, and the emails they send one address an hour
# (beyond it nothing is sent, and the page says the same: it never tells whether an account exists).
AUTH_FORM_POSTS_PER_ADDRESS = env_int("AUTH_FORM_POSTS_PER_ADDRESS", 20, minimum=1)
AUTH_EMAILS_PER_RECIPIENT = env_int("AUTH_EMAILS_PER_RECIPIENT", 3, minimum=1)
# A sign-up is confirmed from the emailed link within this time.
SIGNUP_LINK_MAX_AGE_SECONDS = env_int("SIGNUP_LINK_MAX_AGE_SECONDS", 24 * 3600, minimum=60)
# An invitation to an organization is accepted from the emailed link within this time.
INVITATION_MAX_AGE_SECONDS = env_int("INVITATION_MAX_AGE_SECONDS", 7 * 24 * 3600, minimum=60)

INSTALLED_APPS = [
    "config.apps.PlatformAdminConfig",  # django.contrib.admin with the operators' pages
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "accounts",
    "inference",
    "billing",
    "dashboard",
]

MIDDLEWARE = [
    "config.middleware.BodySizeLimitMiddleware",
    # Django's security, common and CSRF middleware, run without thread hops under ASGI
    # (config.middleware.InlineUnderAsgi); `manage.py check --deploy` checks them under these names (config.checks).
    "config.middleware.SecurityMiddleware",
    # CSP and X-Frame-Options on every HTML page, whatever its path (the API's docs page included).
    "config.middleware.ContentSecurityPolicyMiddleware",
    "servestatic.middleware.ServeStaticMiddleware",
    # Browser-only middleware, skipped on the API paths (config.middleware.BrowserOnly).
    "config.middleware.SessionMiddleware",
    "config.middleware.CommonMiddleware",
    "config.middleware.CsrfViewMiddleware",
    "config.middleware.AuthenticationMiddleware",
    "config.middleware.MessageMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # Before the apps' folders: dashboard/templates/admin/base_site.html (the test-mode banner on every page of
        # the admin console) stands in for django.contrib.admin's, which comes first in INSTALLED_APPS.
        "DIRS": [BASE_DIR / "dashboard" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "dashboard.context_processors.payment_mode",
            ],
        },
    },
]

# Database: DATABASE_URL, or a SQLite file under the data directory.
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool("DATABASE_POOL", True):
    # Under ASGI requests run their ORM calls on many threads (config/request_threads.py keeps up to 16 idle, a burst
    # starts more), so per-thread persistent connections pile up until PostgreSQL refuses more. psycopg's pool shares
    # a bounded set.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("DATABASE_POOL_MIN_SIZE", 1, minimum=0),
        "max_size": env_int("DATABASE_POOL_MAX_SIZE", 10, minimum=1),
        "timeout": env_int("DATABASE_POOL_TIMEOUT", 10, minimum=1),
    }
# Behind PgBouncer in transaction mode (deploy/k8s/components/pgbouncer) each transaction may run on another server
# connection, so nothing may outlive a transaction on one: no server-side cursors (QuerySet.iterator() would open a
# named cursor and read it in later round trips), and no statement prepared on a server connection (elsewhere the hot
# path's statements are, once per connection: accounts.statements.in_turn's plan_once; Django's psycopg backend itself
# sets prepare_threshold to None and binds parameters client-side).
DATABASE_TRANSACTION_POOLING = env_bool("DATABASE_TRANSACTION_POOLING", False)
if DATABASE_TRANSACTION_POOLING:
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded web process and worker share one file: WAL lets readers run beside a writer,
    # and IMMEDIATE transactions take the write lock up front instead of failing on upgrade.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
        "transaction_mode": "IMMEDIATE",
    }
    # A file, not memory, for the test database: end-to-end tests share it with real worker processes.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-db.sqlite3")}
    DATA_DIR.mkdir(parents=True, exist_ok=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis is the broker, cache and pub/sub when REDIS_URL is set: in production, and in the embedded run,
# which starts a private redis-server and hands its URL to every process (config/embedded_redis.py).
# Without it (unit tests, one-off commands) the cache is this process's memory.
REDIS_URL = env_str("REDIS_URL") or None
if REDIS_URL:
    CACHES = {
        "default": {
            # Answers from process memory while Redis is down or slow: no request fails with it (docs/money.md).
            "BACKEND": "config.cache.FailSoftRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env_str("CACHE_KEY_PREFIX", "gm") or "gm",
            "OPTIONS": {
                # A cache call takes well under a millisecond; redis-py's default 5 s would stall
                # each request that much when Redis hangs.
                "socket_connect_timeout": env_int("CACHE_CONNECT_TIMEOUT_MS", 500, minimum=1) / 1000,
                "socket_timeout": env_int("CACHE_SOCKET_TIMEOUT_MS", 500, minimum=1) / 1000,
                # After a failure, skip Redis this long before one call probes it again.
                "BREAKER_SECONDS": 1.5,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "platform"}}

# Celery (the app lives in config/celery.py). The database row is the truth; results are not stored.
# BROKER_URL sets the broker apart from the cache (another Redis, RabbitMQ); by default it is REDIS_URL.
# With neither, Celery's in-memory transport keeps messages inside this process, where no worker sees
# them: unit tests call task functions themselves, and whatever runs workers (the embedded run, the
# end-to-end tests) starts a Redis first.
CELERY_BROKER_URL = env_str("BROKER_URL") or REDIS_URL or "memory://"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
# Only benchmarks read task results (a bare Celery round trip as their baseline).
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND") or None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fixup closes the database connections before and after every task, and under the prefork pool with
# psycopg's pool it closes the pool too, so every task waited for a new PostgreSQL connection: about 10 ms of the
# 13-17 from a job's dispatch to its worker's claim (``make bench-queue``, py-spy of the GPU worker). Given a reuse
# count it closes them about every that many tasks instead (it counts twice a task); a child still drops what it
# inherited from its parent when it starts (the fixup's ``worker_process_init``), and each task starts on a checked
# connection from the pool (``config.celery.connection_from_the_pool``).
CELERY_DB_REUSE_MAX = 1_000
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 900, minimum=1)
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 840, minimum=1)
if CELERY_TASK_SOFT_TIME_LIMIT >= CELERY_TASK_TIME_LIMIT:
    # Celery refuses to send a task whose soft limit passes its hard one: fail at start, not at every send.
    raise ImproperlyConfigured("CELERY_TASK_SOFT_TIME_LIMIT must be below CELERY_TASK_TIME_LIMIT.")
CELERY_TASK_DEFAULT_QUEUE = "default"
# The longest hard time limit a task sets for itself: the nightly reconciliation's (billing/reconciliation_tasks.py
# RECONCILE_TIME_LIMIT_SECONDS). tests/test_beat_schedule.py checks it against every registered task.
LONGEST_OWN_TASK_LIMIT_SECONDS = 3600
# With late acks a message stays unacknowledged while its task runs, and Redis' transport puts back on its queue any
# message left unacknowledged longer than the visibility timeout (kombu's ``restore_visible``, run by every consumer):
# a task still running would be delivered again and run a second time beside itself (a reconciliation twice over, a
# job's message to a second GPU worker). So it outlasts every task's hard limit, with room for the wait between a
# worker taking a message and starting it. A dead worker's messages come back only after it: each has a safety net
# that is quicker (the sweep sends a job again, beat sends a periodic task again, the Stripe and alert sweeps).
BROKER_VISIBILITY_MARGIN_SECONDS = 900
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
    "visibility_timeout": max(CELERY_TASK_TIME_LIMIT, LONGEST_OWN_TASK_LIMIT_SECONDS) + BROKER_VISIBILITY_MARGIN_SECONDS
}
# A request that publishes while the broker is down must fail fast: the job stays QUEUED and the sweep
# sends it later. kombu otherwise reconnects inside the publish (measured: send_task(retry=False) took
# 6 s per call with Redis killed, 2 ms with max_retries 0) and waits forever on a Redis that hangs.
# Workers and beat reconnect with their own retry settings (broker_connection_max_retries), not these.
CELERY_BROKER_TRANSPORT_OPTIONS = {**CELERY_BROKER_TRANSPORT_OPTIONS, "max_retries": 0}
if CELERY_BROKER_URL.startswith(("redis://", "rediss://", "unix://")):
    CELERY_BROKER_TRANSPORT_OPTIONS |= {
        "socket_connect_timeout": env_int("BROKER_CONNECT_TIMEOUT_MS", 1000, minimum=1) / 1000,
        # Above the consumers' 1 s BRPOP wait, so an idle worker's blocking read never times out.
        "socket_timeout": env_int("BROKER_SOCKET_TIMEOUT_MS", 2000, minimum=1) / 1000,
    }

AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard:home"
LOGOUT_REDIRECT_URL = "login"

# Email (password resets, invitations): the console in development, SMTP when EMAIL_HOST is set.
EMAIL_HOST = env_str("EMAIL_HOST") or ""
EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER") or ""
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD") or ""
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
EMAIL_BACKEND = env_str("EMAIL_BACKEND") or (
    "django.core.mail.backends.smtp.EmailBackend" if EMAIL_HOST else "django.core.mail.backends.console.EmailBackend"
)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL") or "Platform <no-reply@localhost>"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# The container image bakes the collected files in at build time (deploy/Dockerfile), apart from the data directory,
# which is a writable volume there.
STATIC_ROOT = Path(env_str("STATIC_ROOT") or DATA_DIR / "static")
# Hashed, compressed names need collectstatic first; the test suite and DEBUG serve files as they are.
STATIC_MANIFEST = env_bool("STATIC_MANIFEST", not DEBUG)
MEDIA_ROOT = DATA_DIR / "media"
# Outputs live in Django's default storage: the filesystem, or any S3-compatible bucket through
# django-storages when OUTPUT_BUCKET is set (signed, expiring URLs either way).
OUTPUT_BUCKET = env_str("OUTPUT_BUCKET") or None
_default_storage: dict[str, Any] = (
    {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": OUTPUT_BUCKET,
            "endpoint_url": env_str("OUTPUT_BUCKET_ENDPOINT_URL") or None,
            "region_name": env_str("OUTPUT_BUCKET_REGION") or None,
            "querystring_auth": True,
            # SigV4 presigned URLs live at most 7 days.
            "querystring_expire": min(env_int("OUTPUT_URL_TTL_SECONDS", 24 * 3600, minimum=60), 7 * 24 * 3600),
            "signature_version": "s3v4",
            "file_overwrite": False,
        },
    }
    if OUTPUT_BUCKET
    else {"BACKEND": "django.core.files.storage.FileSystemStorage"}
)
STORAGES = {
    "default": _default_storage,
    "staticfiles": {
        "BACKEND": "servestatic.storage.CompressedManifestStaticFilesStorage"
        if STATIC_MANIFEST
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
SERVESTATIC_USE_FINDERS = not STATIC_MANIFEST
if OUTPUT_BUCKET:
    # Pages show output images, and play output videos and audio, by the bucket's presigned URLs (path-style or
    # virtual-hosted).
    _bucket_endpoint = urlsplit(env_str("OUTPUT_BUCKET_ENDPOINT_URL") or "")
    _bucket_origins = (
        [
            f"{_bucket_endpoint.scheme}://{_bucket_endpoint.netloc}",
            f"{_bucket_endpoint.scheme}://*.{_bucket_endpoint.netloc}",
        ]
        if _bucket_endpoint.netloc
        else ["https://*.amazonaws.com"]
    )
    CONTENT_SECURITY_POLICY["img-src"] += _bucket_origins
    CONTENT_SECURITY_POLICY["media-src"] += _bucket_origins

# Request bodies: one limit for every endpoint, enforced before the body is read (413).
MAX_REQUEST_BODY_BYTES = env_int("MAX_REQUEST_BODY_BYTES", 10 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY_BYTES

# API keys and limits.
API_KEY_DEFAULT_REQUESTS_PER_MINUTE = env_int("API_KEY_DEFAULT_REQUESTS_PER_MINUTE", 600, minimum=1)
# Usable (unrevoked, unexpired) keys an organization may hold at once; one more is a 422 too_many_keys.
API_KEYS_PER_ORGANIZATION = env_int("API_KEYS_PER_ORGANIZATION", 100, minimum=1)
API_KEY_LAST_USED_RESOLUTION_SECONDS = env_int("API_KEY_LAST_USED_RESOLUTION_SECONDS", 60, minimum=1)
# How long a verified key is kept in memory and in Redis (accounts/key_cache.py); any change to keys, organizations
# or members stops every kept key at once. 0: every request reads the database.
API_KEY_CACHE_SECONDS = env_int("API_KEY_CACHE_SECONDS", 60, minimum=0)
ORGANIZATION_DEFAULT_CONCURRENCY = env_int("ORGANIZATION_DEFAULT_CONCURRENCY", 2, minimum=1)

# Inference: jobs, workers, outputs, webhooks (docs/lifecycle.md).
PUBLIC_BASE_URL = (env_str("PUBLIC_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
MODELS_DIR = Path(env_str("MODELS_DIR") or DATA_DIR / "models")
LOCAL_MODELS_GPU_CLASS = env_str("LOCAL_MODELS_GPU_CLASS", "cpu") or "cpu"
JOB_LEASE_SECONDS = env_int("JOB_LEASE_SECONDS", 30, minimum=2)
JOB_HEARTBEAT_SECONDS = float(env_int("JOB_HEARTBEAT_MS", 1000, minimum=50)) / 1000
JOB_MAX_ATTEMPTS = env_int("JOB_MAX_ATTEMPTS", 3, minimum=1)
JOB_REDISPATCH_AFTER_SECONDS = env_int("JOB_REDISPATCH_AFTER_SECONDS", 60, minimum=1)
# A submission whose organization has room sends its job's message while its query runs, a worker's claim that comes
# first waiting for its end signal in Redis (inference.dispatch.send_ahead), at most JOB_AHEAD_WAIT_MS after the
# message was sent; off: the message goes once the job is dispatched.
JOB_MESSAGE_AHEAD = env_bool("JOB_MESSAGE_AHEAD", True)
JOB_AHEAD_WAIT_MS = env_int("JOB_AHEAD_WAIT_MS", 10_000, minimum=1)
JOB_SWEEP_SECONDS = env_int("JOB_SWEEP_SECONDS", 5, minimum=1)
# The longest POST /run/... waits for its request to end before answering 504 (the request goes on).
SYNC_RUN_TIMEOUT_SECONDS = env_int("SYNC_RUN_TIMEOUT_SECONDS", 3600, minimum=1)
# A request submitted through a /stream route gets a preview of its latents every this many steps (0: none).
STREAM_PREVIEW_EVERY_STEPS = env_int("STREAM_PREVIEW_EVERY_STEPS", 2, minimum=0)
# Event streams (status and run streams, the dashboard's) open at once per API key and per dashboard user; one more
# is a 429 too_many_streams (inference/stream_limits.py). Each open stream looks at its job every few seconds: 20
# streams look about as often as the default rate limit lets a key poll.
STREAMS_PER_API_KEY = env_int("STREAMS_PER_API_KEY", 20, minimum=1)
STREAMS_PER_DASHBOARD_USER = env_int("STREAMS_PER_DASHBOARD_USER", 10, minimum=1)
# The longest an event stream stays open: then it ends with a "reconnect" event, its request going on. By default
# as long as a sync run waits.
STREAM_MAX_SECONDS = env_int("STREAM_MAX_SECONDS", SYNC_RUN_TIMEOUT_SECONDS, minimum=1)
OUTPUT_URL_TTL_SECONDS = env_int("OUTPUT_URL_TTL_SECONDS", 24 * 3600, minimum=60)
OUTPUT_RETENTION_SECONDS = env_int("OUTPUT_RETENTION_SECONDS", 30 * 24 * 3600, minimum=60)
# Days a finished job's log lines are kept (inference/job_logs.py); its usage and money records are kept regardless.
JOB_LOG_RETENTION_DAYS = env_int("JOB_LOG_RETENTION_DAYS", 30, minimum=1)
# Days after which an ended request is archived: its input cut to its settings, its webhook deliveries deleted (a
# request that never started is deleted); the row stays for the money trail (inference/archive.py).
JOB_RETENTION_DAYS = env_int("JOB_RETENTION_DAYS", 90, minimum=1)
WORKER_PIPELINE_CACHE_BYTES = env_int("WORKER_PIPELINE_CACHE_BYTES", 8 * 1024**3, minimum=1)
# Torch's intra-op threads in a GPU worker (inference.worker.apply_thread_policy); 0: torch's default, one per core.
WORKER_TORCH_THREADS = env_int("WORKER_TORCH_THREADS", 1, minimum=0)
# Input images are refused past this many pixels, read from their header before anything is decoded (a small
# compressed file can declare a huge image): 4096x4096 decodes to 64 MB as RGBA.
MAX_INPUT_IMAGE_PIXELS = env_int("MAX_INPUT_IMAGE_PIXELS", 4096 * 4096, minimum=64 * 64)
# Files sent through fal's storage upload protocols (inference/uploads.py): images only, at most this many bytes
# (a single PUT or POST is also bounded by MAX_REQUEST_BODY_BYTES; multipart parts add up to this).
UPLOAD_MAX_BYTES = env_int("UPLOAD_MAX_BYTES", 10 * 1024 * 1024, minimum=1024)
# Outbound requests (webhooks, input images) to private, loopback or link-local addresses are
# refused unless this is on: never in production, on for the embedded run on one machine.
OUTBOUND_ALLOW_PRIVATE = env_bool("OUTBOUND_ALLOW_PRIVATE", EMBEDDED)
WEBHOOK_TIMEOUT_SECONDS = env_int("WEBHOOK_TIMEOUT_SECONDS", 15, minimum=1)
WEBHOOK_RETRY_WINDOW_SECONDS = env_int("WEBHOOK_RETRY_WINDOW_SECONDS", 26 * 3600, minimum=1)


def _ed25519_key(name: str, written: str) -> bytes:
    """An ED25519 key (a private key's 32-byte seed, or a public key) written in base64url or base64, padded or
    not; anything else stops start-up. The message never repeats the value: it may be a private key."""
    text = written.strip().replace("+", "-").replace("/", "_")
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 32:
        raise ImproperlyConfigured(f"{name} must be 32 bytes in base64url (an ED25519 key).")
    return decoded


# fal's webhook signatures (inference/webhook_signing.py). The private key that signs, as its 32-byte seed; unset,
# one derived from SECRET_KEY. Beside its public key the JWKS publishes these (a rotation's next and previous keys).
_webhook_signing_key = env_str("WEBHOOK_SIGNING_KEY") or ""
WEBHOOK_SIGNING_KEY = _ed25519_key("WEBHOOK_SIGNING_KEY", _webhook_signing_key) if _webhook_signing_key else None
WEBHOOK_EXTRA_PUBLIC_KEYS = [
    _ed25519_key("WEBHOOK_EXTRA_PUBLIC_KEYS", key) for key in env_list("WEBHOOK_EXTRA_PUBLIC_KEYS", [])
]

# Billing (docs/money.md): micro-dollars everywhere, cents only at Stripe.
BILLING_SIGNUP_CREDITS_MICROS = env_int("BILLING_SIGNUP_CREDITS_MICROS", 1_000_000, minimum=0)
# Admission holds the estimated cost of a job: measured GPU ms per work unit (steps x images x 512²
# tiles) of the endpoint over the last week plus a margin; before any is measured, this bound per class: about
# twice what a Stable Diffusion-class model takes per 512² step there (SD 1.5 on an H100 ~50 ms, an A10G ~250 ms,
# a 2-core CPU ~2.5 s). The hold grows before each further step anyway; the bound keeps admission honest.
BILLING_UNMEASURED_MS_PER_WORK_UNIT = {"gpu-h100": 100, "gpu-a10g": 500, "cpu": 5_000}
BILLING_HOLD_MARGIN_PERCENT = env_int("BILLING_HOLD_MARGIN_PERCENT", 120, minimum=100)
# What a GPU-hour costs us, per class, in micro-dollars: the basis of gross margin.
BILLING_GPU_COST_MICROS_PER_HOUR = {
    "gpu-h100": env_int("BILLING_GPU_COST_H100_MICROS_PER_HOUR", 2_200_000, minimum=0),
    "gpu-a10g": env_int("BILLING_GPU_COST_A10G_MICROS_PER_HOUR", 600_000, minimum=0),
    "cpu": env_int("BILLING_GPU_COST_CPU_MICROS_PER_HOUR", 40_000, minimum=0),
}
# Stripe (billing.stripe_client is the one place the SDK is configured). No secret key: payments are off.
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY") or ""
STRIPE_PUBLISHABLE_KEY = env_str("STRIPE_PUBLISHABLE_KEY") or ""
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET") or ""
STRIPE_API_BASE = (env_str("STRIPE_API_BASE") or "").rstrip("/")  # empty: Stripe itself; tests: a fake
STRIPE_TIMEOUT_SECONDS = env_int("STRIPE_TIMEOUT_SECONDS", 30, minimum=1)
# Retries of a request that got no answer; each keeps its idempotency key, so none pays twice.
STRIPE_MAX_NETWORK_RETRIES = env_int("STRIPE_MAX_NETWORK_RETRIES", 2, minimum=0)
STRIPE_CURRENCY = "usd"
# The fake Stripe of the embedded run (config/fake_stripe.py: localstripe on loopback), which `runplatform` starts and
# names here when no STRIPE_SECRET_KEY is given: every page, receipt and statement then says it is test mode, and its
# Checkout page (served by the fake, at STRIPE_API_BASE) is where the "buy credits" form may send the browser.
STRIPE_FAKE = env_bool("STRIPE_FAKE", False)
if STRIPE_FAKE:
    if STRIPE_SECRET_KEY.startswith(("sk_live_", "rk_live_")):
        raise ImproperlyConfigured("STRIPE_FAKE=1 with a live Stripe key: the fake Stripe never takes real payments.")
    if urlsplit(STRIPE_API_BASE).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ImproperlyConfigured("STRIPE_FAKE=1 needs STRIPE_API_BASE on loopback: the fake Stripe runs here.")
    CONTENT_SECURITY_POLICY["form-action"].append(STRIPE_API_BASE)
# Credits bought at once, in cents, through the API or Checkout.
BILLING_MIN_PURCHASE_CENTS = env_int("BILLING_MIN_PURCHASE_CENTS", 500, minimum=50)
BILLING_MAX_PURCHASE_CENTS = env_int("BILLING_MAX_PURCHASE_CENTS", 1_000_000, minimum=50)
# After a declined auto top-up, the next try waits this long (the card will not improve by the minute).
BILLING_AUTO_TOP_UP_RETRY_SECONDS = env_int("BILLING_AUTO_TOP_UP_RETRY_SECONDS", 6 * 3600, minimum=60)
# A payment still pending after this long is settled from Stripe's state by the sweep.
BILLING_PAYMENT_SETTLE_AFTER_SECONDS = env_int("BILLING_PAYMENT_SETTLE_AFTER_SECONDS", 900, minimum=60)
# Webhook events whose processing failed are retried by the sweep this many times, then wait for a replay.
BILLING_STRIPE_EVENT_MAX_ATTEMPTS = env_int("BILLING_STRIPE_EVENT_MAX_ATTEMPTS", 8, minimum=1)
# How far back the comparison with Stripe looks (PaymentIntents created since).
BILLING_STRIPE_RECONCILE_DAYS = env_int("BILLING_STRIPE_RECONCILE_DAYS", 35, minimum=1)
# An incremental reconciliation checks the rows stamped from the last proven run's snapshot less this much: a row is
# stamped (timezone.now() in Python) before its transaction commits, so one that committed after that snapshot may
# carry an earlier time. It bounds the stamp-to-commit delay (and clock skew between machines) the runs tolerate.
BILLING_RECONCILE_OVERLAP_SECONDS = env_int("BILLING_RECONCILE_OVERLAP_SECONDS", 3600, minimum=0)
# With no run proving the books for this long, the next one is full (and an incremental window never gets longer).
BILLING_RECONCILE_MAX_WINDOW_DAYS = env_int("BILLING_RECONCILE_MAX_WINDOW_DAYS", 7, minimum=1)

# Who issues receipts and statements: printed at their top. The code prefixes their numbers and names the issuer's
# gapless number series (billing/documents.py): change it only for a new issuer, whose numbers start again at 1.
BILLING_ISSUER_CODE = env_str("BILLING_ISSUER_CODE") or "GM"
if not BILLING_ISSUER_CODE.isalnum() or not BILLING_ISSUER_CODE.isascii() or len(BILLING_ISSUER_CODE) > 12:
    raise ImproperlyConfigured(f"BILLING_ISSUER_CODE={BILLING_ISSUER_CODE!r}: up to 12 ASCII letters and digits.")
BILLING_ISSUER_NAME = env_str("BILLING_ISSUER_NAME") or "Generative Media Platform"
BILLING_ISSUER_ADDRESS = (env_str("BILLING_ISSUER_ADDRESS") or "").replace("\\n", "\n")
BILLING_ISSUER_TAX_ID = env_str("BILLING_ISSUER_TAX_ID") or ""

# Three kinds of queue, each consumed by its own process type (deploy/entrypoint.sh; the embedded run starts one
# worker for each, accounts/management/commands/runplatform.py): a GPU class's queue for the jobs (``run_job`` is
# sent to its endpoint's class; ``cpu`` is only the fallback), ``default`` for the short, frequent safety nets (the
# dispatcher's sweep and lease reaper, webhooks, Stripe's events and sweep, alert emails, model sync) and ``batch``
# for the long periodic tasks, one at a time, so a reconciliation (up to an hour) or the hourly retention tasks never
# hold the workers the sweep needs. Celery looks up an exact task name before any glob, whatever the order here
# (celery.app.routes.MapRoute; tests/test_beat_schedule.py checks every task's queue).
CELERY_TASK_ROUTES = {
    "inference.run_job": {"queue": "cpu"},
    "inference.purge_expired_outputs": {"queue": "batch"},
    "inference.prune_job_logs": {"queue": "batch"},
    "inference.archive_old_jobs": {"queue": "batch"},
    "billing.reconcile": {"queue": "batch"},
    "billing.issue_statements": {"queue": "batch"},
    "billing.create_partitions_ahead": {"queue": "batch"},
    "inference.*": {"queue": "default"},
    "billing.*": {"queue": "default"},
}
# An interval entry's message expires after one interval, and never sooner than a minute (``options.expires``): a
# worker drops one that waited longer (behind a stall, a restart) instead of running it and the ones after it back to
# back, since a newer one is on its way. Not sooner than a minute: a sweep due every 5 s that waits behind two slow
# webhook deliveries (15 s each) must still run, or none would run while the wait lasts (nothing reaped, nothing sent
# again); and beat writes the expiry as a moment the worker reads, so their clocks need only agree within a minute.
# Crontab entries (daily and nightly runs) never expire: the next one is a day away.
BEAT_EXPIRY_FLOOR_SECONDS = 60.0
# Celery's file-backed scheduler, but an interval entry it has never run is sent as beat starts (config/beat.py).
CELERY_BEAT_SCHEDULER = "config.beat:Scheduler"
CELERY_BEAT_SCHEDULE = {
    "inference-sweep": {
        "task": "inference.sweep",
        "schedule": float(JOB_SWEEP_SECONDS),
        "options": {"expires": max(float(JOB_SWEEP_SECONDS), BEAT_EXPIRY_FLOOR_SECONDS)},
    },
    "inference-webhooks": {
        "task": "inference.deliver_due_webhooks",
        "schedule": 5.0,
        "options": {"expires": BEAT_EXPIRY_FLOOR_SECONDS},
    },
    "inference-purge-outputs": {
        "task": "inference.purge_expired_outputs",
        "schedule": 3600.0,
        "options": {"expires": 3600.0},
    },
    "inference-prune-job-logs": {
        "task": "inference.prune_job_logs",
        "schedule": 3600.0,
        "options": {"expires": 3600.0},
    },
    "inference-archive-jobs": {
        "task": "inference.archive_old_jobs",
        "schedule": 3600.0,
        "options": {"expires": 3600.0},
    },
    "inference-sync-models": {"task": "inference.sync_models", "schedule": 60.0, "options": {"expires": 60.0}},
    # The books' nightly proof (billing.reconciliation), at 03:00 UTC (Celery keeps UTC): what was written since the
    # last proven run on weeknights and Saturday, everything on Sunday (old rows an incremental run cannot see).
    "billing-reconcile": {
        "task": "billing.reconcile",
        "schedule": crontab(hour=3, minute=0, day_of_week="mon-sat"),
    },
    "billing-reconcile-full": {
        "task": "billing.reconcile",
        "schedule": crontab(hour=3, minute=0, day_of_week="sun"),
        "kwargs": {"full": True},
    },
    "billing-stripe-sweep": {"task": "billing.stripe_sweep", "schedule": 60.0, "options": {"expires": 60.0}},
    # Spend alert emails whose task the broker lost, or whose worker died (billing.alerts).
    "billing-alert-emails": {"task": "billing.send_due_alert_emails", "schedule": 60.0, "options": {"expires": 60.0}},
    # Statements of the month just closed, for every organization with activity in it (billing.statements).
    "billing-issue-statements": {"task": "billing.issue_statements", "schedule": crontab(hour=2, minute=0)},
    # The usage records' monthly partitions, this month's and the next three (billing.partitions); every hour so a
    # run that gave up on its lock, or a beat that was down, is made up long before a month needs its partition.
    "billing-create-partitions": {
        "task": "billing.create_partitions_ahead",
        "schedule": 3600.0,
        "options": {"expires": 3600.0},
    },
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["accounts.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["accounts.limits.ApiKeyRateThrottle"],
    "DEFAULT_PARSER_CLASSES": ["accounts.parsers.StrictJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "accounts.negotiation.FirstRendererForAnything",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "accounts.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
    # ?format= is ours (CSV exports), not a renderer switch: every API answer is JSON unless a view says so.
    "URL_FORMAT_OVERRIDE": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Generative media platform API",
    "DESCRIPTION": "Diffusion models as HTTP APIs (fal-compatible queue and sync APIs) and the platform API.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # No badge from validator.swagger.io: it would send our schema's URL away, and the page's CSP refuses its image.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "REDOC_DIST": "SIDECAR",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # fontTools (fpdf2 subsetting the fonts of every receipt and statement) logs each table it prunes at INFO.
    "loggers": {"django.db.backends": {"level": "INFO"}, "fontTools": {"level": "WARNING"}},
}
