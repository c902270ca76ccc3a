"""Token-weighted masked cross-entropy.

The loss of a micro-batch is returned as a *sum* with its token count, so the trainer can
divide by the number of loss tokens in the whole optimizer step: k accumulated micro-batches
then give exactly the gradient of one batch of k times the size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over positions where ``loss_mask`` is 1 (labels are already shifted)."""
    losses = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
    return (losses * loss_mask.flatten().to(losses.dtype)).sum()
