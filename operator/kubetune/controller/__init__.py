"""The kubetune operator: FineTuneJob -> ConfigMap + batch/v1 Job -> status.

Deciding is pure (settings.py, policy.py, build.py); the Kubernetes I/O and kopf handlers come
in their own modules.
"""
