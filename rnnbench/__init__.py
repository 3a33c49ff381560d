"""rnnbench: a benchmark harness for recurrent cells (Chung, Gulcehre, Cho & Bengio 2014 and beyond).

Heavy imports (torch, lightning, mlflow) stay inside the modules that need them so that
`rnnbench --help` and input errors answer at once.
"""

__version__ = "0.1.0"
