"""NeMo's ``llm.adam`` optimizer recipes (``recipes/optim.py``): each returns a ``run.Config`` of a
`PytorchOptimizerModule`, e.g. ``fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-5))``."""

from recipes.optim import pytorch_adam_with_cosine_annealing, pytorch_adam_with_flat_lr

__all__ = ["pytorch_adam_with_cosine_annealing", "pytorch_adam_with_flat_lr"]
