"""GPU check of the fused GGUF matmul kernels (csrc/gguf_matmul.cu), for the device machine.

    python3 benches/gpu_qmatmul.py [--out DIR]

Builds the kernels (NVRTC through CuPy, else nvcc), checks each type against its CPU emulation
bit for bit and against the float64 reference within its bound (odd shapes, 1 to MAX_N rows of
activations), then times a decode's product (batch 1 and MAX_N) on Llama-3-8B/70B-sized
weights with CUDA events (median of 20 after warm-up, rotating weight sets beyond the L2)
against a device-to-device copy of the same stored bytes measured in the same run: the
kernel's GB/s of weights read, and its share of the copy's read rate (the ceiling: a matmul
of one row of activations reads each weight byte once). Prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_sparse import time_events  # noqa: E402

from offload.kernels import cuda, gguf, qmatmul, qmatmul_cuda as qc  # noqa: E402

SHAPES = ((1, 1, 1), (7, 3, 2), (37, 5, qc.MAX_N), (5, 33, 3), (4099, 16, 1))
TIMED = ((14336, 4096), (8192, 28672))   # Llama-3-8B's gate, 70B's down: [rows, cols]


def check(device) -> list[dict]:
    out = []
    for qtype in qc.TYPES:
        _, block, _ = gguf.TYPES[qtype]
        worst = 0.0
        for rows, nb, m in SHAPES:
            w = qc.sample_blocks(qtype, rows, nb * block, seed=rows + nb)
            x = torch.randn(m, nb * block) * torch.logspace(-2, 2, m).unsqueeze(1)
            y = qc.matmul(x.to(device), w.to(device), qtype).cpu()
            assert torch.equal(y, qc.emulated(x, w, qtype)), (qtype, rows, nb, m)
            err = (y.double() - qmatmul.reference(x, w, qtype)).abs()
            bound = qc.error_bound(x, w, qtype)
            assert (err <= bound).all(), (qtype, rows, nb, m)
            worst = max(worst, float((err / bound).max()))
        out.append({"type": qtype, "cases": len(SHAPES), "bitwise_emulation": True,
                    "worst_error_of_bound": worst})
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device("cuda")
    kernels = cuda.matmul_kernels(device)
    assert kernels is not None, "the CUDA kernels did not build"
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"built by {kernels.how}")
    checked = check(device)
    for c in checked:
        print(f"{c['type']:<6} bitwise the CPU emulation on {c['cases']} shapes; worst error "
              f"{c['worst_error_of_bound']:.3f} of the bound")
    rows = []
    for qtype in qc.TYPES:
        for r, c in TIMED:
            sets = [qc.sample_blocks(qtype, r, c, seed=k).to(device) for k in range(3)]
            stored = sets[0].numel()
            for n in (1, qc.MAX_N):
                x = torch.randn(n, c, device=device)
                y = torch.empty(n, r, device=device)
                s = time_events(lambda i: qc.matmul(x, sets[i % 3], qtype, y))
                dst = torch.empty_like(sets[0])
                copy = time_events(lambda i: dst.copy_(sets[i % 3]))
                rows.append({"type": qtype, "rows": r, "cols": c, "batch": n,
                             "stored_bytes": stored, "kernel_s": s, "copy_s": copy,
                             "kernel_gbps": stored / s / 1e9,
                             "copy_read_gbps": stored / copy / 1e9})
            del sets
    print(f"\n{'type':<6}{'weight':>14}{'batch':>6}{'stored MB':>10}{'kernel us':>10}"
          f"{'copy us':>9}{'kernel GB/s':>12}{'copy GB/s':>10}{'of copy':>8}")
    for r in rows:
        print(f"{r['type']:<6}{r['rows']:>7}x{r['cols']:<6}{r['batch']:>6}"
              f"{r['stored_bytes'] / 1e6:>10.1f}{r['kernel_s'] * 1e6:>10.1f}"
              f"{r['copy_s'] * 1e6:>9.1f}{r['kernel_gbps']:>12.0f}{r['copy_read_gbps']:>10.0f}"
              f"{r['kernel_gbps'] / r['copy_read_gbps']:>8.2f}")
    print("GB/s: stored weight bytes read per second; copy: a device-to-device copy of the same "
          "bytes (its read rate; it writes as much besides); 'of copy' = kernel / copy")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu_qmatmul.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
             "built_by": kernels.how, "checked": checked, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
