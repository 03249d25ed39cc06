"""Sweeps: the plan (plan.py), the study's storage and heartbeat (study.py), the grid queue
(queue.py) and the worker (worker.py); a trial's checkpoint callback is evaluation/recorder.py."""
