"""The one trainer: a population of K >= 1 models of one cell, task and size on stacked tensors."""
