"""The demo's corpus: the Book of Genesis (King James Version, 1611, public domain), shipped in
the package as plain text and read as bytes (vocabulary 256)."""

from __future__ import annotations

from importlib import resources

import torch

CORPUS = "genesis_kjv.txt"
VOCAB_SIZE = 256


def load_corpus() -> torch.Tensor:
    data = resources.files("mhc_megatron.data").joinpath(CORPUS).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class ByteBatches:
    """Random windows of ``seq_len + 1`` bytes: the first 90% of the text trains, the rest
    validates (validation batches are fixed, so every mode is scored on the same text)."""

    def __init__(self, seq_len: int, batch_size: int, seed: int, val_fraction: float = 0.1):
        tokens = load_corpus()
        split = int(len(tokens) * (1 - val_fraction))
        self.train, self.val = tokens[:split], tokens[split:]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        val_gen = torch.Generator().manual_seed(seed + 1)
        self.val_batches = [self._sample(self.val, val_gen) for _ in range(8)]

    def _sample(self, tokens: torch.Tensor, gen: torch.Generator):
        starts = torch.randint(0, len(tokens) - self.seq_len - 1, (self.batch_size,), generator=gen)
        windows = torch.stack([tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def next_train(self):
        return self._sample(self.train, self.gen)
