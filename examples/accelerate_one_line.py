"""Speed up a model you already load with Accelerate, by adding one line.

    python examples/accelerate_one_line.py CHECKPOINT_DIR [--budget 25%]

Before: Accelerate keeps what fits in ``max_memory`` and reads every other weight from disk,
module by module, synchronously, on every forward. After the one line, offload packs those
weights once into aligned Units beside Accelerate's offload folder, keeps the most useful
ones resident within the same budget and streams the rest with prefetched O_DIRECT reads that
overlap compute. Same logits, bit for bit (``tests/test_accelerate_hook.py``).
"""
import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import offload
from offload.sizes import parse_size

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("checkpoint")
p.add_argument("--budget", default="25%")
p.add_argument("--offload-folder", default="accelerate_offload")
a = p.parse_args()

weights = sum(f.stat().st_size for f in Path(a.checkpoint).glob("*.safetensors"))
budget = parse_size(a.budget, total_bytes=weights)
model = AutoModelForCausalLM.from_pretrained(a.checkpoint, device_map="auto",
                                             max_memory={"cpu": budget},
                                             offload_folder=a.offload_folder)
model = offload.from_accelerate(model, budget=budget)   # <- the one-line change

ids = torch.randint(0, model.config.vocab_size, (1, 16))
t0 = time.perf_counter()
out = model.generate(ids, max_new_tokens=16, do_sample=False)
print(f"16 tokens in {time.perf_counter() - t0:.1f} s")
print(offload.stats(model))
offload.close(model)
