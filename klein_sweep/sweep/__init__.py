"""Sweeps: the plan (plan.py), the study's storage and heartbeat (study.py), the grid queue
(queue.py), the worker (worker.py) and its checkpoint callback (callbacks.py)."""
