"""Training: rectified-flow math (flow_matching.py), the loop (loop.py), one trial (trial.py).
The loop knows nothing of MLflow or Optuna: it takes a tracker and a checkpoint callback."""
