"""Layout rules shared by the ops and their launchers, so every backend and the fake (meta) kernels agree
on output strides."""
from __future__ import annotations

import torch


def preserved_format(input: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) for an input stored that way, else contiguous — as torch's pointwise ops do."""
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def in_format(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the memory format :func:`preserved_format` gives for ``like`` (no copy if already)."""
    return tensor.contiguous(memory_format=preserved_format(like))


def channel_view(input: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int], int]:
    """``input`` (N, C, *) as a dense tensor with strides (image, channel, position) over its flattened
    positions: channels-last storage is used as it is, anything else made contiguous."""
    batch, channels = input.shape[:2]
    positions = input[0, 0].numel() if batch and channels else 0
    dense = in_format(input, input)
    if preserved_format(input) == torch.contiguous_format:
        return dense, (channels * positions, positions, 1), positions
    return dense, (channels * positions, 1, channels), positions
