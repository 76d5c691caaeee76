"""kubetune's trainer: one FineTuneJob run, from data to gated, promoted artifacts.

Runs in the trainer image on a GPU node (`python -m kubetune_trainer`) and on a laptop through
`kubetune run`. Imports only `kubetune.api` from the operator side; torch and friends load lazily
inside the stages that need them.
"""
