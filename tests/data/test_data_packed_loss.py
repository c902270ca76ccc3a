"""The key packing property: a packed batch gives every sample the same loss as an unpacked one.

transformers 5.x builds per-sample causal masks from ``position_ids`` that restart at 0 when
``attention_mask`` is None and there is no KV cache, so the forward must use ``use_cache=False``.
"""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F

from nemo_automodel.data import HFDatasetDataModule

TOL = 1e-4  # absolute tolerance on per-sample summed CE (fp32; observed differences are ~1e-5)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Name three colours."},
     {"role": "assistant", "content": "Red, green and blue."},
     {"role": "user", "content": "And two more?"}, {"role": "assistant", "content": "Yellow and purple."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    [{"role": "system", "content": "You write haiku."}, {"role": "user", "content": "Autumn."},
     {"role": "assistant", "content": "Leaves drift on the pond, / a cold wind hums through branches, / "
                                      "the year exhales slow."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


def _batch(tokenizer, packed_size: int) -> tuple[dict, HFDatasetDataModule]:
    ds = datasets.Dataset.from_list([{"messages": m} for m in CHATS])
    probe = HFDatasetDataModule(ds, formatting="chat", packed_sequence_size=packed_size, shuffle=False)
    probe.setup(tokenizer)
    dm = HFDatasetDataModule(ds, formatting="chat", packed_sequence_size=packed_size, shuffle=False,
                             micro_batch_size=len(probe.train_dataset))  # everything in one micro-batch
    dm.setup(tokenizer)
    return next(dm.train_batches()), dm


def _per_sample_losses(model, batch, dm) -> dict[int, float]:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
    ce = (ce * batch["loss_mask"].flatten()).view_as(batch["loss_mask"])
    out = {}
    for r in range(ce.shape[0]):
        starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist() + [ce.shape[1]]
        samples = dm.train_dataset.samples_in(r)
        assert len(starts) - 1 == len(samples)  # one position restart per packed sample
        for s, (lo, hi) in zip(samples, zip(starts[:-1], starts[1:], strict=True), strict=True):
            out[s] = float(ce[r, lo:hi].sum())
    return out


@pytest.fixture(scope="module")
def batches(tokenizer):
    unpacked, dm_u = _batch(tokenizer, 0)
    packed, dm_p = _batch(tokenizer, 96)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # really packed
    return (unpacked, dm_u), (packed, dm_p)


def _model(path, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_per_sample_losses_match(tiny_llama, batches, attn):
    (unpacked, dm_u), (packed, dm_p) = batches
    model = _model(tiny_llama, attn)
    ref = _per_sample_losses(model, unpacked, dm_u)
    got = _per_sample_losses(model, packed, dm_p)
    assert sorted(ref) == sorted(got) == list(range(len(CHATS)))
    for i in ref:
        assert got[i] == pytest.approx(ref[i], abs=TOL), (i, got[i], ref[i])
    assert all(v > 0 for v in ref.values())


def test_with_kv_cache_packed_samples_leak(tiny_llama, batches):
    """Documents why the trainer must pass use_cache=False: with a cache, no per-sample mask."""
    (_, _), (packed, dm_p) = batches
    model = _model(tiny_llama, "sdpa")
    with torch.no_grad():
        inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
        clean = model(**inputs, use_cache=False).logits
        leaky = model(**inputs, use_cache=True).logits
    first_len = int((packed["position_ids"][0] == 0).nonzero()[1])  # first sample of row 0 is unaffected
    assert torch.allclose(clean[0, :first_len], leaky[0, :first_len], atol=1e-5)
    assert not torch.allclose(clean[0, first_len:], leaky[0, first_len:], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_training_step_equals_unpacked(tiny_model_factory, batches, arch):
    """Through the trainer's own loss (``model.loss``) and one optimizer step: packed and unpacked batches
    give the same summed loss, the same updated weights and the same per-sample losses afterwards."""
    from nemo_automodel.models import HFAutoModelForCausalLM

    results = {}
    for name, (batch, _) in zip(("unpacked", "packed"), batches, strict=True):
        model = HFAutoModelForCausalLM(str(tiny_model_factory(arch)))
        module = model.configure_model().train()  # the same pretrained weights for both
        loss = model.loss(module, batch)
        (loss / batch["loss_mask"].sum()).backward()  # token-weighted, as the trainer does
        torch.optim.SGD(module.parameters(), lr=0.05).step()
        after = _per_sample_losses(module.eval(), *batches[0])  # both judged on the unpacked batch
        results[name] = (float(loss), {k: v.detach().clone() for k, v in module.state_dict().items()}, after)
    (loss_u, weights_u, after_u), (loss_p, weights_p, after_p) = results["unpacked"], results["packed"]
    assert loss_p == pytest.approx(loss_u, abs=TOL * len(CHATS))
    assert max((weights_u[k] - weights_p[k]).abs().max().item() for k in weights_u) < 1e-5
    for i in after_u:
        assert after_p[i] == pytest.approx(after_u[i], abs=TOL)
    assert sum(after_u.values()) < loss_u  # the step was real: the batch's loss went down
