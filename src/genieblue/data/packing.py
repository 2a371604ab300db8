"""Batches from `Sample`s: sequence packing (first-fit into rows of at most `max_length` tokens) and
plain right-padded collation.

Packed rows carry no attention mask: `position_ids` restart at 0 for every sample, and transformers
(>= 5, `masking_utils.find_packed_sequence_indices`) turns those restarts into a block-diagonal
causal mask, so packed samples never attend to each other. That detection only runs without a
KV cache, hence `use_cache=False` in every batch. Each sample's first label is dropped (-100) so the
loss never asks the last token of one sample to predict the first of the next; the shifted loss of
a lone sample never used that label either, so the packed loss equals the unpacked samples' loss
(the same mean over their tokens).
"""

from __future__ import annotations

import torch

from .processor import IGNORE_INDEX, Sample


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity; each item, in order, goes into the
    first bin with room (a new bin when none has). A max-tree over the bins' free room finds that
    bin in O(log n), so a million items pack in seconds; bins not yet opened count as empty."""
    size = 1 << max(0, len(lengths) - 1).bit_length()
    free = [capacity] * (2 * size)  # free[node]: the most room of any bin below node
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing length {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(i)
        free[node] -= n
        while node > 1:
            node //= 2
            room = max(free[2 * node], free[2 * node + 1])
            if free[node] == room:
                break
            free[node] = room
    return bins


def _pixel_values(rows: list[list[Sample]]) -> torch.Tensor | None:
    """All tiles in order of appearance (row-major), matching the placeholders in input_ids."""
    tiles = [s.pixel_values for row in rows for s in row if s.pixel_values is not None]
    return torch.cat(tiles) if tiles else None


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def _pack_row(row: list[Sample], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels, position_ids of one packed row, padded to `width`."""
    lengths = [len(s) for s in row]
    fill = width - sum(lengths)
    ids = torch.cat([s.input_ids for s in row] + [torch.full((fill,), pad_id)])
    labels = torch.cat([s.labels for s in row] + [torch.full((fill,), IGNORE_INDEX)])
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[starts] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths + [fill]])
    return ids, labels, positions


def pack(samples: list[Sample], max_length: int = 4096, pad_id: int = 0) -> dict:
    """One packed batch: input_ids, labels, position_ids (B, L) with L the longest row; padding
    is a trailing pseudo-sample of `pad_id` tokens (labels -100, its own positions)."""
    if not samples:
        raise ValueError("pack needs at least one sample")
    rows = [[samples[i] for i in b] for b in first_fit([len(s) for s in samples], max_length)]
    width = max(sum(len(s) for s in row) for row in rows)
    ids, labels, positions = (torch.stack(t) for t in zip(*(_pack_row(row, width, pad_id) for row in rows)))
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": None,
        "pixel_values": _pixel_values(rows),
        "use_cache": False,
    }


def collate(samples: list[Sample], pad_id: int = 0) -> dict:
    """One unpacked batch, right-padded: input_ids, labels, attention_mask, position_ids (B, L)."""
    ids = _pad([s.input_ids for s in samples], pad_id)
    mask = _pad([torch.ones(len(s), dtype=torch.long) for s in samples], 0)
    return {
        "input_ids": ids,
        "labels": _pad([s.labels for s in samples], IGNORE_INDEX),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "attention_mask": mask,
        "pixel_values": _pixel_values([samples]),
        "use_cache": False,
    }


def collate_prompts(prompts: list[tuple[torch.Tensor, torch.Tensor | None]], pad_id: int) -> dict:
    """Generation prompts (input_ids (1, T), pixel_values or None) from `GenieBlueProcessor.prompt`,
    left-padded into one batch: input_ids, attention_mask, pixel_values (tiles in row order) or None."""
    width = max(ids.shape[1] for ids, _ in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (p, _) in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    tiles = [px for _, px in prompts if px is not None]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(tiles) if tiles else None}
