"""Calibration for Wanda pruning: per input feature, the norm of each projection's inputs.

``api.input_norms`` runs the dense model (offloaded) through ``record_input_norms``; the packer
receives the result through the encoder's ``input_norms`` callable.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Used when no calibration texts are given: plain English prose, about 300 tokens.
DEFAULT_TEXT = (
    "The river rose in the night, and by morning the lower fields were under water. Farmers "
    "moved their animals to the high pasture, while the children watched from the bridge as "
    "branches and broken fences drifted past. In the town, the baker opened early and gave "
    "bread to anyone who had spent the night carrying sandbags. Nobody could remember a flood "
    "like it, although the oldest residents said their grandparents had told stories of the "
    "year the church bells rang for three days to call people out of the valley. By noon the "
    "rain stopped. The sun came out over a landscape of shining water, and the first boats "
    "went out to check on the farms along the old road. Engineers arrived in the afternoon to "
    "inspect the dam upstream, which had held, though water had poured over its spillway all "
    "night. They measured the cracks, took photographs, and promised a report within a week. "
    "Meanwhile the school became a shelter, with blankets spread across the gymnasium floor and "
    "a long table of soup, coffee and sandwiches donated by families who had stayed dry.")


def record_input_norms(model, adapter, batches) -> dict[str, torch.Tensor]:
    """Run ``batches`` of token ids through ``model`` and return ``||X_j||_2`` over every token,
    per input feature ``j``, for each of ``adapter``'s prunable modules (keyed by checkpoint
    name without ``.weight``)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in adapter.prunable_modules(model).items():
        def pre(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = sums.get(name)
            sums[name] = x.pow(2).sum(0) if acc is None else acc + x.pow(2).sum(0)
        hooks.append(module.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, logits_to_keep=1)   # the norms need no logits
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def token_batches(prepared, texts, max_tokens: int):
    """The calibration texts (default ``DEFAULT_TEXT``) as token ids, one text a batch."""
    texts = texts or (DEFAULT_TEXT,)
    tokenizer = _tokenizer(prepared.manifest.path)
    vocab = prepared.source.config.vocab_size
    for text in texts:
        if tokenizer is not None:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
        else:   # no tokenizer in the store: character codes, folded into the vocabulary
            log.info("no tokenizer beside the store; calibrating on character codes")
            ids = torch.tensor([[ord(c) % vocab for c in text[:max_tokens]]])
        if ids.numel():
            yield ids


def _tokenizer(store_path):
    path = store_path / "tokenizer"
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
