"""Run megatron-core's GPT forward/backward on CPU (tests and laptops); never used with CUDA.

megatron-core 0.16 calls CUDA-only functions on two paths a CPU GPT model takes:

1. ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()``, and
   ``GlobalMemoryBuffer.get_tensor`` (attention scores) allocates there;
2. the model-parallel RNG tracker (``CudaRNGStatesTracker.add``/``fork``, used around
   dropout) reads and sets the CUDA generator's state.

`apply()` redirects exactly those to the CPU: (1) run with ``current_device`` answering
``"cpu"`` for the duration of the call, (2) keeps the tracker's streams as CPU generator states.
Everything else (layers, TP collectives over gloo, vocab-parallel cross-entropy) runs unpatched.
The causal mask is passed explicitly by our model (megatron's default one is built on CUDA).
`apply()` does nothing when CUDA is available, and is idempotent.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False


@contextlib.contextmanager
def _cuda_calls_on_cpu():
    # set by name: current_device returns a device string ("cpu"), which megatron passes on as a device
    patch = {"current_device": lambda: "cpu", "get_rng_state": lambda device="cuda": torch.get_rng_state(),
             "manual_seed": torch.manual_seed}
    saved = {name: getattr(torch.cuda, name) for name in patch}
    for name, fn in patch.items():
        setattr(torch.cuda, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


def _on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_calls_on_cpu():
            return fn(*args, **kwargs)
    return wrapper


def apply() -> bool:
    """Patch megatron-core for CPU if CUDA is absent; returns whether the shim is active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core import utils
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.tensor_parallel import random as mp_random

    rotary_pos_embedding.RotaryEmbedding.get_emb = _on_cpu(rotary_pos_embedding.RotaryEmbedding.get_emb)
    utils.GlobalMemoryBuffer.get_tensor = _on_cpu(utils.GlobalMemoryBuffer.get_tensor)
    mp_random.CudaRNGStatesTracker.add = _on_cpu(mp_random.CudaRNGStatesTracker.add)
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _APPLIED = True
    return True
