"""The fused GGUF matmul's CUDA kernels (csrc/gguf_matmul.cu): their arithmetic, checked on the
CPU through the lane-by-lane emulation that computes the same bits (every type, odd shapes,
against the float64 reference within the stated bound); that nvcc builds them (tests/test_gguf.py:
no fused multiply-add, which the emulation's bits rest on); and, on a GPU, the kernels
against the emulation bit for bit."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from offload.kernels import _build, cuda, gguf, qmatmul, qmatmul_cuda as qc

SHAPES = ((1, 1, 1), (7, 3, 2), (37, 5, qc.MAX_N), (5, 33, 3), (3, 70, 1))


def _inputs(qtype: str, rows: int, nb: int, m: int, seed: int):
    cols = nb * gguf.TYPES[qtype][1]
    w = qc.sample_blocks(qtype, rows, cols, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, cols, generator=g) * torch.logspace(-2, 2, m).unsqueeze(1)
    return w, x


@pytest.mark.parametrize("qtype", qc.TYPES)
def test_warp_arithmetic_within_its_bound(qtype):
    """Rows 1-37, 1 to 70 blocks a row (fewer blocks than lanes, a lane with two and three
    blocks), 1 to MAX_N rows of activations spanning four decades: every output within the
    float32 accumulation bound of the float64 product of the gguf package's dequantization."""
    for rows, nb, m in SHAPES:
        w, x = _inputs(qtype, rows, nb, m, seed=rows + nb)
        y = qc.emulated(x, w, qtype)
        err = (y.double() - qmatmul.reference(x, w, qtype)).abs()
        bound = qc.error_bound(x, w, qtype)
        assert (err <= bound).all(), (rows, nb, m, float((err / bound).max()))


def test_the_bound_catches_a_wrong_kernel_and_is_far_tighter_than_the_cpu_kernels():
    """A product that lost one block, or one activation off by 1, falls outside the bound; the
    bound (float32 accumulation) is a small fraction of the CPU kernel's (8-bit activations)."""
    w, x = _inputs("Q4_K", 16, 3, 2, seed=11)
    ref, bound = qmatmul.reference(x, w, "Q4_K"), qc.error_bound(x, w, "Q4_K")
    lost = x.clone()
    lost[:, 256:512] = 0
    assert ((qc.emulated(lost, w, "Q4_K").double() - ref).abs() > bound).all()
    one = x.clone()
    one[:, 7] += 1.0
    assert ((qc.emulated(one, w, "Q4_K").double() - ref).abs() > bound).any()
    assert (bound < qmatmul.error_bound(x, w, "Q4_K") / 100).all()


def test_rows_of_activations_are_independent_and_more_than_max_n_split():
    """A row's outputs do not depend on the other rows in the call (each lane's sums are per
    row): one row alone gives the bits it gives among MAX_N; MAX_N + 3 rows are the two calls."""
    w, x = _inputs("Q6_K", 9, 2, qc.MAX_N + 3, seed=4)
    y = qc.emulated(x, w, "Q6_K")
    assert torch.equal(y[2], qc.emulated(x[2:3], w, "Q6_K")[0])
    assert torch.equal(y[qc.MAX_N:], qc.emulated(x[qc.MAX_N:], w, "Q6_K"))


def test_bad_input_is_refused_by_name():
    w, x = _inputs("Q8_0", 4, 2, 1, seed=1)
    with pytest.raises(ValueError, match="not Q2_K"):
        qc.emulated(x, w, "Q2_K")
    with pytest.raises(ValueError, match=r"x must be float32 \[..., 64\]"):
        qc.emulated(x[:, :32], w, "Q8_0")
    with pytest.raises(ValueError, match="whole blocks of 34 bytes"):
        qc.emulated(x, w[:, :40], "Q8_0")
    with pytest.raises(ValueError, match="one GPU"):
        qc.matmul(x, w, "Q8_0")


def test_the_launchers_library_compiles_and_the_warps_shuffle(tmp_path):
    """nvcc builds the kernels with the C launcher offload loads where CuPy is missing, and the
    lanes meet in warp shuffles. (Every kernel present, no fused multiply-add in the PTX, NVRTC:
    tests/test_gguf.py's compile checks, which cover every CUDA source.)"""
    if shutil.which(_build.nvcc()) is None:
        pytest.skip("no nvcc on this machine")
    (name, kernels), = cuda.MATMUL.items()
    src = _build.CSRC / f"{name}.cu"
    done = subprocess.run(_build.nvcc_command(src, tmp_path / "k.ptx", "sm_90", ptx=True),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "shfl.sync.bfly" in (tmp_path / "k.ptx").read_text()
    done = subprocess.run(_build.nvcc_command(src, tmp_path / "k.so", "sm_90"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@gpu
@pytest.mark.parametrize("qtype", qc.TYPES)
def test_gpu_kernels_are_the_emulation_bit_for_bit(qtype):
    """On a GPU: every type and shape bitwise the CPU emulation (so within the bound), a
    strided input, and more than MAX_N rows through the prefill road within the bound."""
    dev = torch.device("cuda")
    for rows, nb, m in SHAPES + ((4099, 16, 1),):   # a grid of more than one block of warps
        w, x = _inputs(qtype, rows, nb, m, seed=rows + nb)
        y = qc.matmul(x.to(dev), w.to(dev), qtype)
        torch.cuda.synchronize()
        assert torch.equal(y.cpu(), qc.emulated(x, w, qtype)), (rows, nb, m)
    w, x = _inputs(qtype, 33, 4, qc.MAX_N + 5, seed=3)
    y = qc.matmul(x.to(dev), w.to(dev), qtype).cpu()
    err = (y.double() - qmatmul.reference(x, w, qtype)).abs()
    assert (err <= qmatmul.error_bound(x, w, qtype)).all()   # torch's matmul: a looser bound
