"""Prefix caching: the KV of prompt prefixes seen before (a shared system prompt, a conversation's earlier
turns) is reused instead of prefilled again.

KV is kept in blocks of `block` tokens. A block is found by its tokens and its parent block (the chain from
the start of the sequence), so a hit means the whole prefix up to it is identical: a sequence's KV depends
on nothing else, positions included (prefixes always start at position 0). One copy of each distinct block
serves every request that shares it; a block's reference count is the number of blocks chained after it,
and only unreferenced blocks (chain tips) are evicted, least recently used first, when the store is over
its memory budget.

The decode batch keeps one contiguous KV row per sequence (continuous batching moves rows around), so a hit
is copied into the new row's slots: a copy of c tokens costs far less than their forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Block:
    key: tuple            # (parent key, this block's tokens)
    kv: torch.Tensor      # (n_layer, 2, H, block, D)
    children: int = 0     # blocks chained after this one: its reference count


class PrefixCache:
    def __init__(self, block: int = 16, max_bytes: int = 1 << 30):
        self.block, self.max_bytes = block, max_bytes
        self.blocks: OrderedDict[tuple, Block] = OrderedDict()  # LRU order: oldest first
        self.bytes = 0

    def _keys(self, tokens: list[int], n_blocks: int, ns: int = 0):
        key = None if not ns else ("adapter", ns)  # a LoRA adapter's KV is its own: one chain per adapter
        for i in range(n_blocks):
            key = (key, tuple(tokens[i * self.block:(i + 1) * self.block]))
            yield key

    def lookup(self, tokens: list[int], ns: int = 0) -> tuple[int, list[Block]]:
        """The longest cached prefix of `tokens` that leaves at least one token to prefill (its logits
        start the reply) -> (its length, its blocks in order)."""
        found = []
        for key in self._keys(tokens, (len(tokens) - 1) // self.block, ns):
            b = self.blocks.get(key)
            if b is None:
                break
            self.blocks.move_to_end(key)
            found.append(b)
        return len(found) * self.block, found

    def insert(self, tokens: list[int], read_kv, ns: int = 0) -> None:
        """Store the full blocks of `tokens` not stored yet; read_kv(a, b) -> (n_layer, 2, H, b - a, D), the
        sequence's KV for tokens a..b-1."""
        parent = None
        for i, key in enumerate(self._keys(tokens, len(tokens) // self.block, ns)):
            b = self.blocks.get(key)
            if b is None:
                b = Block(key, read_kv(i * self.block, (i + 1) * self.block).clone())
                self.blocks[key] = b
                self.bytes += b.kv.numel() * b.kv.element_size()
                if parent is not None:
                    parent.children += 1
            else:
                self.blocks.move_to_end(key)
            parent = b
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.max_bytes:
            victim = next((b for b in self.blocks.values() if b.children == 0), None)
            if victim is None:
                return
            del self.blocks[victim.key]
            self.bytes -= victim.kv.numel() * victim.kv.element_size()
            parent = self.blocks.get(victim.key[0])
            if parent is not None:
                parent.children -= 1
