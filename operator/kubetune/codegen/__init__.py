"""Artifacts generated from the API types: the CRD and the API reference. Pure functions."""
