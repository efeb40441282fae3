"""The fused GGUF matmul (compute="fast"): every type on every CPU path the machine runs,
threaded or not, within its stated error bound of the float64 product of the gguf package's
dequantization, on random blocks and odd shapes; and what it must not change."""
from __future__ import annotations

import pytest
import torch

from offload.kernels import cpu, gguf, qmatmul


def _weight(qtype: str, rows: int, blocks_per_row: int, seed: int) -> torch.Tensor:
    _, block, _ = gguf.TYPES[qtype]
    return gguf.sample_blocks(qtype, rows * blocks_per_row * block, seed=seed).view(rows, -1)


@pytest.mark.parametrize("qtype", qmatmul.TYPES)
def test_kernel_within_its_bound_on_every_path(qtype):
    """Rows 1, 7 and 37 (fewer, not a multiple of, and more than the threads), 1-5 blocks per
    row and 37 (pairs of blocks on two accumulators, then an odd one), 1 to
    INT_ROWS rows of activations (a strided view too), pools of 1-3 threads."""
    assert cpu.supported(), "the C++ kernel must build here"
    g = torch.Generator().manual_seed(len(qtype))
    for rows, nb, m in ((1, 1, 1), (7, 3, 2), (37, 5, qmatmul.INT_ROWS), (5, 37, 3)):
        w = _weight(qtype, rows, nb, seed=rows)
        cols = qmatmul.cols_of(qtype, w.shape[1])
        x = torch.randn(m, cols, generator=g) * torch.logspace(-2, 2, m).unsqueeze(1)
        ref, bound = qmatmul.reference(x, w, qtype), qmatmul.error_bound(x, w, qtype)
        outs = {}
        for isa in cpu.supported():
            for threads in (1, 3):
                with qmatmul.Pool(threads) as pool:
                    y = qmatmul.matmul(x, w, qtype, pool=pool, isa=isa)
                err = (y.double() - ref).abs()
                assert (err <= bound).all(), (isa, threads, rows, nb, float((err / bound).max()))
                outs[isa, threads] = y
        # each output is one thread's sum in a fixed order: the pool changes nothing
        for isa in cpu.supported():
            assert torch.equal(outs[isa, 1], outs[isa, 3]), isa
        # the AVX-512 level's rows are the AVX2 rows with VPDPBUSD: the same integer sums, the
        # same float work, the same bits (a CPU's result does not depend on its level)
        if {"avx2", "avx512"} <= set(cpu.supported()):
            assert torch.equal(outs["avx2", 1], outs["avx512", 1])
        wide = torch.randn(m, 2 * cols, generator=g)[:, ::2]   # a strided input
        assert torch.equal(qmatmul.matmul(wide, w, qtype), qmatmul.matmul(wide.contiguous(), w,
                                                                            qtype))


def test_bound_is_tight_enough_to_catch_a_wrong_kernel():
    """The bound is about 1% of the products' magnitude, not a blanket tolerance: a
    kernel that dropped one block's contribution would fall outside it."""
    w = _weight("Q4_0", 16, 4, seed=3)
    x = torch.randn(2, 128)
    ref, bound = qmatmul.reference(x, w, "Q4_0"), qmatmul.error_bound(x, w, "Q4_0")
    dropped = qmatmul.reference(torch.cat([torch.zeros(2, 32), x[:, 32:]], 1), w, "Q4_0")
    assert ((dropped - ref).abs() > bound).any()
    magnitude = x.double().abs() @ torch.from_numpy(
        gguf.reference(w.numpy(), "Q4_0").reshape(16, 128)).double().abs().t()
    assert (bound < 0.02 * magnitude).all()


def test_zero_rows_and_the_prefill_road():
    """An all-zero activation row gives exact zeros (no 0/0 scale); more than INT_ROWS rows
    go through dequantized chunks of W and torch's matmul (bitwise the dequantized product),
    chunks as large as the scratch given holds."""
    w = _weight("Q4_K", 50, 2, seed=5)
    x = torch.randn(qmatmul.INT_ROWS + 3, 512)
    x[1] = 0
    with qmatmul.Pool(2) as pool:
        y = qmatmul.matmul(x[:4], w, "Q4_K", pool=pool)
    assert torch.equal(y[1], torch.zeros(50))
    dense = torch.from_numpy(gguf.reference(w.numpy(), "Q4_K").reshape(50, 512))
    small = torch.empty(7 * 512 * 4, dtype=torch.uint8)   # the scratch sets the chunk: 7 rows
    y = qmatmul.matmul(x, w, "Q4_K", scratch=small)
    want = torch.cat([x @ dense[r:r + 7].t() for r in range(0, 50, 7)], 1)
    assert torch.equal(y, want)


def test_fused_call_matches_matmul_and_refuses_bad_shapes():
    w = _weight("Q8_0", 9, 2, seed=7)
    x = torch.randn(1, 3, 64)
    with qmatmul.Pool(2) as pool:
        fused = qmatmul.Fused("Q8_0", pool)
        assert torch.equal(fused(x, w), qmatmul.matmul(x, w, "Q8_0"))
        assert fused(x, w).shape == (1, 3, 9)
    with pytest.raises(ValueError, match=r"Q8_0 weight of 9x64: x must be float32 \[\.\.\., 64\]"):
        qmatmul.matmul(torch.randn(2, 63), w, "Q8_0")
    with pytest.raises(ValueError, match="float32"):
        qmatmul.matmul(torch.randn(2, 64, dtype=torch.float64), w, "Q8_0")
    assert qmatmul.type_of("fused.Q4_K") == "Q4_K" and qmatmul.type_of("gguf.Q4_K") is None
    assert qmatmul.cols_of("Q6_K", 2 * 210) == 512


def test_pools_start_and_stop_cleanly():
    """Many pools made and closed (their threads joined: none left in the process), one
    closed twice."""
    import os

    def live() -> int:
        return len(os.listdir("/proc/self/task"))

    before = live()
    w, x = _weight("Q4_1", 33, 1, seed=9), torch.randn(1, 32)
    for n in (1, 2, 4, 8):
        pool = qmatmul.Pool(n)
        for _ in range(20):
            qmatmul.matmul(x, w, "Q4_1", pool=pool)
        pool.close()
        pool.close()
    assert live() == before
    with qmatmul.Pool(3):
        assert live() == before + 2   # the caller is the third


@pytest.mark.parametrize("qtype", ("Q4_1", "Q8_0", "Q6_K"))
def test_a_group_of_weights_gives_each_weights_own_bits(qtype):
    """``FusedGroup``: weights sharing an input, one call: each output bitwise what a call
    for that weight alone gives, on every path, threaded or not, the rows of all of them
    split over the threads together (7 + 2 + 30 rows over 1-3 threads); a prefill is left to
    the caller (None); a weight of the wrong height is refused."""
    _, block, _ = gguf.TYPES[qtype]
    ws = [_weight(qtype, rows, 3, seed=rows) for rows in (7, 2, 30)]
    x = torch.randn(2, 1, 3 * block)
    for isa in cpu.supported():
        for threads in (1, 3):
            with qmatmul.Pool(threads) as pool:
                fused = qmatmul.Fused(qtype, pool, isa=isa)
                group = qmatmul.FusedGroup(fused, [7, 2, 30], 3 * block)
                ys = group(x, ws)
                assert [y.shape for y in ys] == [(2, 1, 7), (2, 1, 2), (2, 1, 30)]
                for y, w in zip(ys, ws):
                    assert torch.equal(y, fused(x, w)), (isa, threads)
    assert group(torch.randn(qmatmul.INT_ROWS + 1, 3 * block), ws) is None
    with pytest.raises(ValueError, match="weight 1 of the group has 7 rows, not 2"):
        group(x, [ws[0], ws[0], ws[2]])


def test_siblings_share_one_call_only_for_the_same_unchanged_input():
    """``hooks.fused_group`` on three linears: the first call multiplies all three and the
    others take their kept outputs for that same input; another input, or the same tensor
    changed in place, is multiplied afresh (never a stale output); biases added per linear."""
    from offload.hooks import fused_group

    ws = [_weight("Q4_0", rows, 2, seed=rows) for rows in (5, 3, 3)]
    mods = [torch.nn.Linear(64, w.shape[0], bias=i == 2) for i, w in enumerate(ws)]
    for m, w in zip(mods, ws):
        m._parameters["weight"] = torch.nn.Parameter(w, requires_grad=False)
    fused = qmatmul.Fused("Q4_0")
    group = qmatmul.FusedGroup(fused, [5, 3, 3], 64)
    calls = []

    def counted(x, blocks):
        calls.append(len(blocks))
        return group(x, blocks)

    undo = fused_group(mods, counted, fused)
    want = lambda x, i: fused(x, ws[i]) + (mods[i].bias if i == 2 else 0)   # noqa: E731
    x = torch.randn(1, 64)
    with torch.no_grad():
        ys = [m(x) for m in mods]
        assert calls == [3]                         # one call for the three
        assert all(torch.equal(y, want(x, i)) for i, y in enumerate(ys))
        other = torch.randn(1, 64)
        q = mods[0](x)
        assert calls == [3, 3] and torch.equal(q, want(x, 0))
        assert torch.equal(mods[1](other), want(other, 1))   # not x's kept output
        assert calls == [3, 3, 3]
        mods[0](x)
        x.mul_(2)                                   # the same tensor, changed
        assert torch.equal(mods[2](x), want(x, 2))
    for step in undo:
        step()
    assert all("forward" not in m.__dict__ for m in mods)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "Q4_K"])
def test_every_path_rounds_activations_to_the_same_bytes(qtype):
    """The vector rounding of activations (AVX2 and up) against the scalar one, byte for byte:
    ordinary rows over six decades, exact ties (x.5 steps, rounded to even), a block whose
    values are all equal, zeros, a block of subnormals (a step so small its inverse is
    infinite), NaN and the infinities."""
    _, block, _ = gguf.TYPES[qtype]
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(4 * block, generator=g) * 10.0 ** torch.randint(-3, 4, (1,), generator=g)
            for _ in range(6)]
    ties = (torch.arange(block, dtype=torch.float32) - block / 2) / 2   # halves of a step of 1
    ties[0] = 127.0   # amax 127: a step of exactly 1
    special = torch.randn(block, generator=g)
    special[[1, 5, 9]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    rows += [ties, torch.full((block,), 3.25), torch.zeros(block),
             torch.full((block,), 1e-45) * torch.arange(block), special]
    paths = cpu.supported()
    assert "scalar" in paths
    for x in rows:
        bytes_ = {isa: qmatmul.quantize_row(x, qtype, isa) for isa in paths}
        for isa in paths:
            assert torch.equal(bytes_[isa], bytes_["scalar"]), (isa, x[:4])


@pytest.mark.parametrize("qtype", qmatmul.TYPES)
def test_a_row_of_activations_gives_the_same_bits_beside_any_other_rows(qtype):
    """The vector paths multiply up to four rows of activations per unpacked weight block
    (every type); each output must still be the one its row gives alone (1 to INT_ROWS rows,
    tiles of 4 and their remainders, on every path), so a sequence's logits do not depend on
    the batch it is in."""
    g = torch.Generator().manual_seed(11)
    w = _weight(qtype, 9, 3, seed=5)
    cols = qmatmul.cols_of(qtype, w.shape[1])
    x = torch.randn(qmatmul.INT_ROWS, cols, generator=g)
    for isa in cpu.supported():
        with qmatmul.Pool(2) as pool:
            alone = torch.cat([qmatmul.matmul(x[i:i + 1], w, qtype, pool=pool, isa=isa)
                               for i in range(len(x))])
            for m in (2, 3, 4, 5, 8, qmatmul.INT_ROWS):
                assert torch.equal(qmatmul.matmul(x[:m], w, qtype, pool=pool, isa=isa),
                                   alone[:m]), (isa, m)
