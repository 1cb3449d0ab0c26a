"""Production web process: gunicorn supervising uvicorn workers running the ASGI app.

    gunicorn -c deploy/gunicorn.conf.py config.asgi:application

Every value can be changed from the environment; see deploy/environment.md.
"""

import os

bind = os.environ.get("BIND", "0.0.0.0:8000")


def cores() -> int:
    """The CPUs this process may run on (its affinity, which a CPU-pinned container narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Uvicorn workers: one per core, and at least two. Chosen by measurement (`make bench-queue ARGS="--servers ..."`,
# README "Benchmarks"): a uvicorn worker already serves many requests at once (a thread per request for the sync
# views, the event loop for the waiting ones: sync runs, status streams), so workers beyond the cores only add
# processes competing for them: 4 workers on 2 cores submitted 0.66x and 0.90x the rate of one process and spent
# 19.8-21.2 ms of CPU per submission against 15.6-17.6, and on a single core 1, 2 and 3 workers were within the
# run's noise of each other. Two rather than one on a one-core pod, so that a worker being recycled
# (WEB_MAX_REQUESTS) never leaves the pod without one. gunicorn's usual 2 x cores + 1 is the rule for blocking sync
# workers, and os.cpu_count() counts the node's cores, not the pod's. Kubernetes sets WEB_CONCURRENCY for its
# one-core pods (deploy/k8s/base/web.yaml). gunicorn's threaded WSGI workers spent about 12% less CPU per
# submission but would hold a thread for every waiting client, and run the async views through an event loop per
# request: not taken.
workers = int(os.environ.get("WEB_CONCURRENCY", str(min(max(cores(), 2), 8))))
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
