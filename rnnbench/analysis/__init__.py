"""Analysis of recorded runs: MLflow -> tidy frames -> tables, figures, gradient flow, REPORT.md.

Modules: runs (read the store), tables (statistics and tables), gradient_flow (probe and gate
statistics), figures, report (the `rnnbench report` output), cli (the sub-command). Heavy
dependencies are imported by the modules themselves, so importing this package is cheap.
"""
