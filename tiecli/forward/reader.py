"""Stored tensors read one at a time and put on their device as fresh allocations."""

from __future__ import annotations

from typing import Any

from ..checkpoint import Checkpoint


class Reader:
    """One stored tensor at a time, on the CPU.

    A safetensors tensor is read (``preadv``) into a fresh allocation, so a
    checkpoint never sits in host memory whole, not even as mapped pages; a
    pickle's tensor is the memory-mapped one ``torch.load(mmap=True)`` gave.
    Returns (tensor, fresh).
    """

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.pickles = ckpt.form.loaded_tensors(ckpt)
        self.staging: Any = None

    def read(self, name: str, reuse: bool = False) -> tuple[Any, bool]:
        """``reuse``: into one staging buffer, valid until the next read (for a tensor that
        is copied to a GPU or written to disk at once: no allocation per tensor piles up)."""
        import torch

        from ..dtypes import CODE_TO_TORCH

        entry = self.ckpt.entries[name]
        if entry.file in self.pickles:
            return self.pickles[entry.file].state_dict[name], False
        dtype = CODE_TO_TORCH.get(entry.dtype)
        if dtype is None:  # an element type torch has no name for: as safetensors reads it
            from safetensors import safe_open

            with safe_open(str(entry.file), framework="pt") as f:
                return f.get_tensor(name), False
        if reuse:
            if self.staging is None or self.staging.numel() < entry.nbytes:
                self.staging = None
                self.staging = torch.empty(max(entry.nbytes, 1), dtype=torch.uint8)
            flat = self.staging[: entry.nbytes]
            t = flat.view(getattr(torch, dtype)).reshape(entry.shape)
        else:
            t = torch.empty(entry.shape, dtype=getattr(torch, dtype))
            flat = t.reshape(-1).view(torch.uint8)
        if entry.nbytes:
            entry.blob.readinto(0, memoryview(flat.numpy()))
        return t, not reuse


def put(t: Any, fresh: bool, transposed: bool, device: Any, dtype: Any) -> Any:
    """``t`` on ``device`` as a fresh, contiguous allocation (cast when ``dtype`` asks).

    Never a view of the file's mapping: the allocator aligns a copy the same
    way whatever the tensor's offset in the file, so equal weights run through
    the same kernels and give equal outputs.
    """
    import torch

    if transposed:
        t = t.t()
    to = dtype if dtype is not None and t.is_floating_point() else t.dtype
    if fresh and not transposed and t.device == device and t.dtype == to:
        return t
    return t.to(device=device, dtype=to, copy=True, memory_format=torch.contiguous_format)
