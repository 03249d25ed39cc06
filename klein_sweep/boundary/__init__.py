"""Where training collapses: the boundary fit over learning rates (fit.py) and the refinement
that places extra trainings where the grid leaves the boundary unresolved (refine.py)."""
