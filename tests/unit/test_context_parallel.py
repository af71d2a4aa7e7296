"""Load-balanced CP split/merge of token-level tensors, and the masked token sum of the per-token loss contract (single process)."""

import pytest
import torch

from sdzero_mcore.losses.masked import masked_token_sum
from sdzero_mcore.parallel.context_parallel import (
    cp_chunk_ids,
    merge_from_cp,
    pad_seq,
    padded_seq_len,
    sequence_chunk_order,
    split_batch_for_cp,
    split_for_cp,
)


def test_chunk_assignment_is_megatrons_load_balanced_order():
    assert [cp_chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    # every chunk is held by exactly one rank
    held = sorted(c for r in range(4) for c in cp_chunk_ids(4, r))
    assert held == list(range(8))
    assert sequence_chunk_order(2) == [0, 2, 3, 1]


def test_split_matches_explicit_positions():
    seq = torch.arange(16)[None, :]  # positions 0..15, CP=2 -> chunks of 4
    assert split_for_cp(seq, 2, 0).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert split_for_cp(seq, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 7, 13, 24])
def test_split_merge_round_trip_with_padding(cp, length):
    generator = torch.Generator().manual_seed(length * 10 + cp)
    batch = {
        "input_ids": torch.randint(0, 100, (3, length), generator=generator),
        "loss_mask": torch.rand(3, length, generator=generator) > 0.5,
        "teacher_logprobs": torch.randn(3, length, 5, generator=generator),
    }
    padded = padded_seq_len(length, cp)
    assert padded % (2 * cp) == 0 and padded - length < 2 * cp
    parts = [split_batch_for_cp(batch, cp, r, pad_values={"input_ids": -1}) for r in range(cp)]
    for name, tensor in batch.items():
        merged = merge_from_cp([p[name] for p in parts], dim=1)
        assert merged.shape[1] == padded
        assert torch.equal(merged[:, :length], tensor), name
        pad_value = -1 if name == "input_ids" else 0
        assert (merged[:, length:] == pad_value).all(), name
    # each rank holds the same number of tokens
    assert len({p["input_ids"].shape[1] for p in parts}) == 1


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a multiple of 2 x context_parallel_size = 4"):
        split_for_cp(torch.zeros(1, 6), 2, 0)
    with pytest.raises(ValueError, match="cp_rank must be in"):
        cp_chunk_ids(2, 2)
    with pytest.raises(ValueError, match="different sequence lengths"):
        split_batch_for_cp({"a": torch.zeros(1, 4), "b": torch.zeros(1, 5)}, 2, 0)
    with pytest.raises(ValueError, match="not in the batch"):
        split_batch_for_cp({"a": torch.zeros(1, 4)}, 2, 0, pad_values={"b": 1})
    with pytest.raises(ValueError, match="down to"):
        pad_seq(torch.zeros(1, 5), 4)


def test_masked_token_sum_ignores_masked_non_finite_values():
    loss = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 5.0, 0.5]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    total, count = masked_token_sum(loss, mask)
    assert total.item() == pytest.approx(9.0) and count.item() == 3
    total.backward()
    assert torch.equal(loss.grad, mask.float())


def test_masked_token_sum_checks_shapes():
    with pytest.raises(ValueError, match="per_token_loss .* and loss_mask .* differ"):
        masked_token_sum(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))
