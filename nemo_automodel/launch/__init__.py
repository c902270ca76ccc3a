"""Launching on NeMo-Run: the experiment API, sweeps, the CLI's error guard and NeMo-Run CLI patches.

Import the modules themselves (``from nemo_automodel.launch.experiment import Experiment``):
this package imports nothing, so the guard stays quick for the demo.
"""
