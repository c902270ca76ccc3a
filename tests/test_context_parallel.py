"""Context parallel without a GPU: the mesh arithmetic, the one-line errors, how a micro-batch is padded
and split over the cp ranks, and the gradient scale under FSDP's averaging over dp x cp.

CP attention itself does not run on CPU (PyTorch shards only the CUDA SDPA kernels); the 2-GPU training
check is tests/distributed/test_context_parallel_cuda.py. Here the model is position-wise (embedding +
linear head, no attention), so splitting the sequence by hand is exact and the arithmetic can be checked.
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
    _create_default_load_balancer,
)

from nemo_automodel.errors import ConfigError
from nemo_automodel.models.hf_parallel import hf_context_parallel_problem
from nemo_automodel.models.loss import masked_cross_entropy
from nemo_automodel.parallel.context_parallel import check_attention, pad_batch, padded_length
from nemo_automodel.parallel.mesh import coordinates, describe_mesh, mesh_dims, mesh_shape
from nemo_automodel.parallel.strategy import DDPStrategy, FSDP2Strategy
from nemo_automodel.trainer.trainer import Trainer


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_mesh_dims_and_coordinates():
    dims = mesh_dims(16, context_parallel_size=2, tensor_parallel_size=2)
    assert dims == {"dp": 4, "cp": 2, "tp": 2}
    assert mesh_shape(dims) == ((4, 2, 2), ("dp", "cp", "tp"))
    assert mesh_shape(mesh_dims(4, context_parallel_size=4)) == ((1, 4), ("dp", "cp"))
    coords = [coordinates(r, dims) for r in range(16)]
    assert coords[0] == {"dp": 0, "cp": 0, "tp": 0} and coords[5] == {"dp": 1, "cp": 0, "tp": 1}
    # the cp x tp ranks of one replica are consecutive and share its dp index (they read the same batches)
    for dp in range(4):
        assert [r for r, c in enumerate(coords) if c["dp"] == dp] == list(range(4 * dp, 4 * dp + 4))
    # a cp group: ranks T apart with the same dp and tp index
    assert [r for r, c in enumerate(coords) if c["dp"] == 1 and c["tp"] == 1] == [5, 7]


def test_mesh_size_errors_are_one_line():
    with pytest.raises(ConfigError) as err:
        mesh_dims(6, context_parallel_size=4)
    assert "context_parallel_size=4 is invalid: context_parallel_size x tensor_parallel_size = 4 must divide the " \
           "number of processes (6)" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        mesh_dims(8, data_parallel_size=3, context_parallel_size=2, tensor_parallel_size=2)
    assert "data_parallel_size=3 x context_parallel_size=2 x tensor_parallel_size=2 = 12 must equal the number of " \
           "processes (8)" in _one_line(err)


def test_mesh_layout_in_words():
    assert describe_mesh(mesh_dims(16, tensor_parallel_size=8), 8) == \
        "mesh (dp=2, tp=8) over 16 ranks on 2 nodes x 8: tp groups within a node, dp groups across nodes"
    assert describe_mesh(mesh_dims(16, context_parallel_size=4, tensor_parallel_size=4), 8) == \
        "mesh (dp=1, cp=4, tp=4) over 16 ranks on 2 nodes x 8: tp groups within a node, cp groups across nodes"
    assert describe_mesh(mesh_dims(8, context_parallel_size=2), 8) == \
        "mesh (dp=4, cp=2) over 8 ranks on 1 node x 8: cp groups within a node, dp groups within a node"


def test_cp_needs_sdpa_attention():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    check_attention(hf_context_parallel_problem(transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")), 2)
    with pytest.raises(ConfigError) as err:
        check_attention(hf_context_parallel_problem(transformers.LlamaForCausalLM._from_config(
            cfg, attn_implementation="eager")), 2)
    assert "context_parallel_size=2 needs attn_implementation='sdpa' (the model uses 'eager')" in _one_line(err)


def _batch(rows: int, length: int) -> dict[str, torch.Tensor]:
    ids = (torch.arange(rows * length).reshape(rows, length) * 7) % 61 + 2
    mask = torch.ones(rows, length)
    mask[:, :3] = 0  # a prompt
    return {"input_ids": ids, "labels": ids.roll(-1, 1), "loss_mask": mask,
            "position_ids": torch.arange(length).expand(rows, length).clone()}


def test_padding_makes_the_length_divisible_by_2c_and_masks_the_pad():
    batch = _batch(2, 13)
    for cp in (2, 3, 4):
        padded = pad_batch(batch, cp)
        n = padded_length(13, cp)
        assert n % (2 * cp) == 0 and 13 <= n < 13 + 2 * cp
        assert {k: tuple(v.shape) for k, v in padded.items()} == {k: (2, n) for k in padded}
        assert torch.equal(padded["input_ids"][:, :13], batch["input_ids"])
        assert padded["loss_mask"][:, 13:].sum() == 0 and padded["loss_mask"].sum() == batch["loss_mask"].sum()
        assert torch.equal(padded["position_ids"], torch.arange(n).expand(2, n))  # continued over the pad
    no_positions = {k: v for k, v in batch.items() if k != "position_ids"}
    assert torch.equal(pad_batch(no_positions, 2)["position_ids"], torch.arange(16).expand(2, 16))


def test_packed_rows_are_refused_in_one_line():
    batch = _batch(1, 8)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # two packed samples
    with pytest.raises(ConfigError) as err:
        pad_batch(batch, 2)
    assert "context_parallel_size=2" in _one_line(err) and "packed_sequence_size=0" in str(err.value)


def _shards(batch: dict[str, torch.Tensor], cp: int) -> list[dict[str, torch.Tensor]]:
    """Each cp rank's part, split by hand the way torch's context_parallel does (its head-tail load
    balancer's order, then equal chunks): the balancer is only used when the length divides by 2 x cp."""
    padded = pad_batch(batch, cp)
    balancer = _create_default_load_balancer(padded["input_ids"].shape[1], cp, "cpu")
    assert balancer is not None  # padding guarantees load balancing
    order = balancer._generate_indices()[0].long()
    return [{k: v[:, order].chunk(cp, dim=1)[r] for k, v in padded.items()} for r in range(cp)]


def test_shards_are_load_balanced_and_positions_follow_their_tokens():
    batch = _batch(2, 14)
    shards = _shards(batch, 2)  # 16 tokens = 4 chunks of 4: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
    assert shards[0]["position_ids"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shards[1]["position_ids"][0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    padded = pad_batch(batch, 2)
    for shard in shards:  # every token keeps its label, mask and true position
        pos = shard["position_ids"]
        for key in ("input_ids", "labels", "loss_mask"):
            assert torch.equal(shard[key], padded[key].gather(1, pos))
    assert sum(s["loss_mask"].sum() for s in shards) == batch["loss_mask"].sum()


class _CpRank:
    """Stands in for FSDP2Strategy on one rank of a dp x cp mesh, with the collectives
    done by hand in one process: ``micro_batch_context`` swaps the batch for this cp rank's shard (as
    torch's load balancer splits it), ``all_reduce`` adds the other replicas' token counts (what gloo
    would sum); the logged [loss sum, tokens] stay this rank's and the test adds them up."""

    device = torch.device("cpu")

    def __init__(self, grad_reduce_size: int, cp: int, cp_rank: int, other_tokens: float) -> None:
        self.grad_reduce_size, self.cp, self.cp_rank, self.other_tokens = grad_reduce_size, cp, cp_rank, other_tokens

    @contextlib.contextmanager
    def micro_batch_context(self, batch):
        whole = dict(batch)
        batch.update(_shards(whole, self.cp)[self.cp_rank])
        try:
            yield batch
        finally:
            batch.clear()
            batch.update(whole)

    def all_reduce(self, tensor, world=False):
        if tensor.dim() == 0:  # the step's token count
            tensor += self.other_tokens
        return tensor

    def grad_sync(self, module, sync):
        return contextlib.nullcontext()

    def sum_sequence_shards(self, tensor):
        return tensor


def _tokens(micro: list[dict[str, torch.Tensor]]) -> float:
    return sum(float(b["loss_mask"].sum()) for b in micro)


def _fsdp_step(model, replicas, cp: int, grad_reduce_size: int) -> tuple[list[torch.Tensor], float]:
    """``Trainer._train_step`` on every dp x cp rank, each with its own copy of ``model`` and SGD(lr=1):
    (the weight deltas averaged over the ranks as FSDP averages their gradients, the logged losses' sum)."""
    trainer = Trainer(max_steps=1)
    trainer._clip = None
    trainable = SimpleNamespace(loss=lambda module, b: masked_cross_entropy(module(b["input_ids"]), b["labels"],
                                                                           b["loss_mask"]),  # model.loss
                                loss_terms=dict)
    deltas, logged = [], 0.0
    for dp_rank, micro in enumerate(replicas):
        others = sum(_tokens(m) for i, m in enumerate(replicas) if i != dp_rank)
        for cp_rank in range(cp):
            trainer.strategy = _CpRank(grad_reduce_size, cp, cp_rank, others)
            module = copy.deepcopy(model)
            optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            logged += trainer._train_step(trainable, module, optimizer, scheduler, micro)[0]
            deltas.append([after.detach() - before for after, before in zip(module.parameters(), model.parameters())])
    return [sum(d) / len(deltas) for d in zip(*deltas)], logged


def test_gradient_scale_under_fsdp_averaging_over_dp_times_cp(monkeypatch):
    """The trainer's step on each of dp x cp ranks backpropagates (its loss sum) x grad_reduce_size / step
    tokens; FSDP averages the gradients over those ranks: the update is SGD on the gradient of the
    token-mean loss of the whole step, and the logged losses add up to that loss."""
    dp, cp = 2, 2
    strategy = FSDP2Strategy(data_parallel_size=dp, context_parallel_size=cp)
    monkeypatch.setattr(FSDP2Strategy, "dp_size", dp)  # what setup gives on dp x cp ranks
    assert strategy.grad_reduce_size == dp * cp and DDPStrategy().grad_reduce_size == 1
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64))
    replicas = [[_batch(2, 11), _batch(1, 11)] for _ in range(dp)]  # two micro-batches per replica
    replicas[1][0]["input_ids"] = (replicas[1][0]["input_ids"] * 3) % 61 + 2
    replicas[1][0]["loss_mask"][1, 5:] = 0  # replicas with different token counts
    whole = [b for micro in replicas for b in micro]
    step_loss = sum(masked_cross_entropy(model(b["input_ids"]), b["labels"], b["loss_mask"]) for b in whole) \
        / _tokens(whole)
    want = [-g for g in torch.autograd.grad(step_loss, list(model.parameters()))]  # SGD(lr=1)'s update
    assert all(w.abs().sum() > 0 for w in want)

    got, logged = _fsdp_step(model, replicas, cp, strategy.grad_reduce_size)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert logged == pytest.approx(step_loss.item(), rel=1e-5)  # sum_sequence_shards + all_reduce's sum
    wrong, _ = _fsdp_step(model, replicas, cp, dp)  # scaled for dp alone: cp ranks' averaging halves it
    for g, w in zip(wrong, want):
        torch.testing.assert_close(g, w / cp, rtol=1e-5, atol=1e-7)
