"""The kubetune operator: FineTuneJob -> ConfigMap + batch/v1 Job (+ a headless Service for a run
of several pods) -> status; FineTuneSchedule -> stamped FineTuneJobs -> status.

Pure, no I/O (an import-linter contract holds it): settings.py, policy.py, profiles.py,
build.py, observe.py, decide.py, conditions.py, usage.py, schedules.py. The I/O: reconcile.py
(read, decide, apply, for each kind), kube.py (the API calls; leader.py the Lease), results.py
(a finished run's result.json), notifications.py (a promotion's webhook POST), cache.py
(informers), workqueue.py and runtime.py (the queue, the workers, the metrics scraper),
handlers.py (kopf hosts the process: login, probes, start-up; our informers watch).
"""
