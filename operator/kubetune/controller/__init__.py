"""The kubetune operator: FineTuneJob -> ConfigMap + batch/v1 Job (+ a headless Service for a run
of several pods) -> status; FineTuneSchedule -> stamped FineTuneJobs -> status.

Pure, no I/O (an import-linter contract holds it): settings.py, build.py, observe.py,
decide.py, conditions.py, usage.py, schedules.py, patch.py; and kubetune.admission (profile and
policy: what may run), which `kubetune validate` and `kubetune run` share.

One controller per kind, each with its reconcile, its I/O protocol and the events that wake it:
finetunejob_controller.py and schedule_controller.py. runtime.py runs them without naming a
kind (informers, the work queue of typed requests, workers, one handler turning a reconcile's
outcome into queue actions); cached.py is their I/O over the watch-fed caches (cache.py);
scraper.py reads running trainers' metrics; kube.py makes the API calls (leader.py the Lease);
results.py reads a finished run's result.json, notifications.py POSTs a promotion's webhook;
handlers.py: kopf hosts the process (login, probes, start-up); our informers watch.
"""
