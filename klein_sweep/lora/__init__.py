"""LoRA: adapters in the model (adapters.py), files (io.py), the ComfyUI / ai-toolkit export
(export.py), and the does-it-fit check (compat.py) with its command line (check.py)."""
