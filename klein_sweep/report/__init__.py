"""The sweep report, rebuilt from the Optuna storage alone (no retraining, no MLflow needed):

  results.py   decode the trial records; the table, boundary, best cell, loss-vs-quality
  markdown.py  report.md
  plots.py     heatmaps.png
  writer.py    write the folder (report.md, report.json, heatmaps.png)
  __main__.py  python -m klein_sweep.report NAME
"""

from klein_sweep.report.writer import write_report

__all__ = ["write_report"]
