"""Recipe factories: functions that return `run.Partial(finetune | pretrain, ...)` graphs.

Building a recipe does no I/O: models, tokenizers and data load inside ``fdl.build`` where the
job runs.
"""
