"""Plots and pictures, written to files only.

Importing this package selects matplotlib's Agg backend before anything else touches pyplot, so
drawing never looks for a display (training on a headless server, a test runner, a worker
process); everything in keel that draws imports ``plt`` from here.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
