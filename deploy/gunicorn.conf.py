"""Production web process: gunicorn supervising uvicorn workers running the ASGI app.

    gunicorn -c deploy/gunicorn.conf.py config.asgi:application

Every value can be changed from the environment; see deploy/environment.md.
"""

import multiprocessing
import os

bind = os.environ.get("BIND", "0.0.0.0:8000")
# ASGI workers: waiting clients (sync run, status streams) do not pin a process, so a few suffice.
workers = int(os.environ.get("WEB_CONCURRENCY", str(min(2 * multiprocessing.cpu_count() + 1, 9))))
worker_class = "uvicorn_worker.UvicornWorker"
# How long a worker may go silent before gunicorn replaces it (uvicorn workers report while requests wait: a sync
# run or a status stream may last far longer, up to SYNC_RUN_TIMEOUT_SECONDS).
timeout = int(os.environ.get("WEB_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("WEB_GRACEFUL_TIMEOUT", "30"))
keepalive = int(os.environ.get("WEB_KEEPALIVE", "75"))  # above the load balancer's idle timeout
max_requests = int(os.environ.get("WEB_MAX_REQUESTS", "20000"))
max_requests_jitter = max_requests // 10
# Only the proxy in front of us may tell us the client's address and scheme.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
