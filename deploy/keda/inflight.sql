-- In-flight work of one GPU class, for a KEDA `postgresql` trigger on that class's worker Deployment
-- (deploy/keda/README.md): the jobs sent to the class's workers and not finished.
--
--   DISPATCHED  sent to the class's Celery queue: waiting in the Redis list, or taken by a worker that has not
--               claimed it yet (with late acks a taken message has already left the list);
--   RUNNING     claimed by a worker, which holds it until it ends.
--
-- QUEUED jobs are not counted: they wait for their organization's concurrency limit, not for a worker (the
-- dispatcher sends a job the moment its organization has a free slot), so more workers would not start them.
--
-- :'gpu_class' is the class (gpu-h100, gpu-a10g, cpu) in psql's quoted-variable syntax, so the file runs as is:
--   psql "$DATABASE_URL" -v gpu_class=gpu-h100 -f deploy/keda/inflight.sql
-- KEDA's trigger takes no parameters: whatever renders the ScaledObject puts the class, quoted as an SQL string
-- literal, in its place (tests/test_metrics.py runs it so on a database with jobs in every state).
-- It reads the index job_status_class_dispatched (status, gpu_class, dispatched_at) and no other row.
SELECT count(*) AS in_flight
FROM inference_job
WHERE status IN ('DISPATCHED', 'RUNNING')
  AND gpu_class = :'gpu_class';
