"""The models: which exist (registry.py), how they load (loading.py), and the random tiny one
built in code for tests (tiny.py)."""
