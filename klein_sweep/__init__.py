"""klein_sweep: hyperparameter sweeps and collapse detection for FLUX.2 [klein] LoRA training.

Importing the package is cheap: torch, diffusers and mlflow are imported by the modules that use
them, not here.
"""

__version__ = "0.1.0"
