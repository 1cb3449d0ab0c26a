#!/bin/sh
# The container's one entrypoint (deploy/Dockerfile): its first argument picks the process type, the rest is added
# to that process's command line (a later option wins over the one set here, e.g. `housekeeping --concurrency 4`).
#
#   web                    gunicorn with uvicorn workers (deploy/gunicorn.conf.py), the ASGI app on $BIND
#   worker CLASS           a GPU worker for one GPU class: the Celery queue named after it, one job at a time
#   housekeeping           a Celery worker on the `default` queue: the frequent safety nets (the dispatcher's sweep and
#                          lease reaper, webhooks, Stripe's events and sweep, alert emails, model sync)
#   batch                  a Celery worker on the `batch` queue, one task at a time: the long periodic tasks
#                          (reconciliation, statements, output purge, log prune, archive, partitions)
#   beat                   the scheduler; exactly one in the whole deployment
#   migrate                applies the database migrations
#   wait-for-migrations    waits until no migration is left to apply (the other pods' init container), at most
#                          MIGRATIONS_WAIT_SECONDS (600), then fails
#   manage ARGS...         any manage.py command (reconcile, replay_stripe_events, createsuperuser, ...)
#
# Every process type also runs in a check mode, which tests/deploy/test_image.py uses: `web --check-config`,
# `worker CLASS --help`, `housekeeping --help`, `batch --help`, `beat --help`, `migrate --plan`.
set -eu

cd "$(dirname "$0")/.."

usage() {
    echo "usage: $0 web|worker CLASS|housekeeping|batch|beat|migrate|wait-for-migrations|manage ARGS... [ARGS...]" >&2
    exit 64
}

[ $# -ge 1 ] || usage
process=$1
shift

case "$process" in
    web)
        set -- gunicorn --config deploy/gunicorn.conf.py "$@" config.asgi:application
        ;;
    worker)
        [ $# -ge 1 ] || usage
        gpu_class=$1
        shift
        # A class is a queue name and part of the worker's host name: a plain slug (gpu-h100, gpu-a10g, cpu).
        case "$gpu_class" in
            "" | -* | *[!a-z0-9-]*)
                echo "$0: worker: '$gpu_class' is not a GPU class (lower-case letters, digits and dashes)" >&2
                exit 64
                ;;
        esac
        # One job at a time per GPU, and no prefetch: with late acks a prefetched message would wait behind the
        # running job while another worker idles (DESIGN §2).
        set -- celery --app config worker --queues "$gpu_class" --concurrency 1 --prefetch-multiplier 1 \
            --hostname "$gpu_class@%h" --without-gossip --without-mingle --loglevel INFO "$@"
        ;;
    housekeeping)
        set -- celery --app config worker --queues default --concurrency 2 --prefetch-multiplier 1 \
            --hostname "housekeeping@%h" --without-gossip --without-mingle --loglevel INFO "$@"
        ;;
    batch)
        # The long periodic tasks (settings' CELERY_TASK_ROUTES), one at a time, apart from the safety nets on
        # `default`. No prefetch: the next one waits in Redis, where another batch worker could take it, not behind
        # an hour-long reconciliation in this one's hands.
        set -- celery --app config worker --queues batch --concurrency 1 --prefetch-multiplier 1 \
            --hostname "batch@%h" --without-gossip --without-mingle --loglevel INFO "$@"
        ;;
    beat)
        set -- celery --app config beat --schedule "${PLATFORM_DATA_DIR:-var}/celerybeat-schedule" --loglevel INFO "$@"
        ;;
    migrate)
        set -- python manage.py migrate --noinput "$@"
        ;;
    wait-for-migrations)
        # `migrate --check` fails while a migration is unapplied and while the database cannot be reached.
        deadline=$(($(date +%s) + ${MIGRATIONS_WAIT_SECONDS:-600}))
        log="${TMPDIR:-/tmp}/wait-for-migrations.$$.log"
        until python manage.py migrate --check "$@" >"$log" 2>&1; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "$0: migrations still unapplied after ${MIGRATIONS_WAIT_SECONDS:-600} s:" >&2
                tail -n 20 "$log" >&2
                exit 1
            fi
            sleep 2
        done
        rm -f "$log"
        echo "migrations applied"
        exit 0
        ;;
    manage)
        set -- python manage.py "$@"
        ;;
    *)
        usage
        ;;
esac

exec "$@"
