"""GPU check of the bitmap decode kernel (csrc/bitmap_decode.cu), for the device machine.

    python3 benches/gpu_sparse.py [--out DIR]

Builds the kernel with nvcc, checks it bit-exact against the torch reference on fresh random
inputs (every dtype, sparsity 0/50/90/100%, odd shapes, poisoned outputs), then times it on
large tensors with CUDA events (median of 20 after warm-up, rotating input sets) against the
device-to-device copy of the same dense bytes measured in the same run. Prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.kernels import bitmap  # noqa: E402


def check(device) -> int:
    g = torch.Generator().manual_seed(1)
    n_checked = 0
    for dtype in bitmap.DTYPES:
        for shape in [(1,), (63,), (3, 65), (17, 2049), (4099, 1031)]:
            for sp in (0.0, 0.5, 0.9, 1.0):
                t = torch.randn(shape, generator=g).to(dtype)
                t[torch.rand(shape, generator=g) < sp] = 0
                enc, nnz = bitmap.encode(t)
                out = torch.full((t.numel() * dtype.itemsize,), 0xA5, dtype=torch.uint8,
                                 device=device)
                bitmap.decode(enc.to(device), out, t.numel(), nnz, dtype.itemsize)
                ref = torch.empty(t.numel() * dtype.itemsize, dtype=torch.uint8)
                bitmap.decode_reference(enc, ref, t.numel(), nnz, dtype.itemsize)
                assert torch.equal(out.cpu(), ref), (dtype, shape, sp)
                assert torch.equal(ref, t.reshape(-1).view(torch.uint8))
                n_checked += 1
    assert bitmap.device_errors(device) == 0
    return n_checked


def time_events(fn, reps=20, warm=3) -> float:
    for _ in range(warm):
        fn(0)
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    lib = bitmap.cuda_kernel(device)
    assert lib is not None, "the CUDA kernel did not build"
    n = check(device)
    print(f"bit-exact vs the torch reference: {n} cases (3 dtypes x 5 shapes x 4 sparsities)")
    rows = []
    for dtype, sp in [(torch.bfloat16, 0.5), (torch.bfloat16, 0.9), (torch.float16, 0.5),
                      (torch.float32, 0.5), (torch.bfloat16, 0.0)]:
        numel = 64 << 20
        sets = []
        for k in range(3):   # rotate inputs: 3 x (~70 MB in, 128 MB out) >> 50 MB of L2
            t = torch.randn(numel, device=device).to(dtype)
            t[torch.rand(numel, device=device) < sp] = 0
            enc, nnz = bitmap.encode(t.cpu())
            sets.append((enc.to(device), nnz))
        out = torch.empty(numel * dtype.itemsize, dtype=torch.uint8, device=device)
        s = time_events(lambda i: bitmap.decode(sets[i % 3][0], out, numel, sets[i % 3][1],
                                                dtype.itemsize))
        src = [torch.empty_like(out) for _ in range(3)]
        c = time_events(lambda i: out.copy_(src[i % 3]))
        stored = sets[0][0].numel()
        dense = numel * dtype.itemsize
        moved = stored + dense
        rows.append({"dtype": str(dtype).split(".")[1], "sparsity": sp, "dense_bytes": dense,
                     "stored_bytes": stored, "decode_s": s, "copy_s": c,
                     "decode_gbps_moved": moved / s / 1e9, "copy_gbps_moved": 2 * dense / c / 1e9,
                     "dense_out_gbps": dense / s / 1e9})
    assert bitmap.device_errors(device) == 0
    print(f"\n{'dtype':<9}{'sparsity':>9}{'dense MB':>10}{'stored MB':>10}{'decode ms':>10}"
          f"{'copy ms':>9}{'decode GB/s':>12}{'copy GB/s':>10}{'of copy':>8}")
    for r in rows:
        print(f"{r['dtype']:<9}{r['sparsity']:>9.0%}{r['dense_bytes'] / 1e6:>10.0f}"
              f"{r['stored_bytes'] / 1e6:>10.0f}{r['decode_s'] * 1e3:>10.3f}"
              f"{r['copy_s'] * 1e3:>9.3f}{r['decode_gbps_moved']:>12.0f}"
              f"{r['copy_gbps_moved']:>10.0f}{r['decode_gbps_moved'] / r['copy_gbps_moved']:>8.2f}")
    print("GB/s count bytes read + written (decode: stored in + dense out; copy: 2 x dense); "
          "'of copy' = decode rate / device-to-device copy rate (the ceiling)")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu_sparse.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
             "checked": n, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
