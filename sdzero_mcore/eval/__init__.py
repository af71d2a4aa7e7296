"""Evaluation: avg@k / pass@k, generate-then-revise, behaviour statistics, token-level localisation.

``metrics`` and ``report`` are pure functions (tested on fixed inputs); ``evaluate`` runs a
checkpoint through the rollout engine and the models and writes one JSON file per run.
"""
