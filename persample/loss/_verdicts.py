"""Words in pinned host memory that a kernel writes the verdict of a target range check into, and the host's
wait for them.

A cross-entropy must raise ``ValueError`` for an out-of-range target before it returns, yet the targets live
on the GPU. The kernel that first reads them writes one int64 word (``PENDING`` until then; see
``persample/kernels/target_stats.py``) straight into pinned host memory, which the GPU reaches over the bus,
and the host polls that word. It learns the verdict as soon as the check has run, without a copy, an event
or a wait for the rest of the kernel, which keeps running while the host goes on. On the CPU (the Triton
interpreter) the word is ordinary memory and is written before the launch returns.

A word is handed out again only after its verdict was read, since each launch writes it once. Words are never
freed: if a caller never waits (an exception in between), its word stays allocated, so a late write from the
GPU cannot land in memory that was handed to something else.
"""

import time

import torch

from persample.kernels.target_stats import FIRST_BAD, IN_RANGE, PENDING

_BLOCK = 64  # words per pinned allocation; each word starts 16 bytes after the last, so that every one is
# aligned alike (Triton compiles a kernel for each alignment of its pointers)
_SPIN_S = 1e-3  # then also ask the stream whether the kernel could still come


class Verdict:
    """One pending check: ``word`` is the one-element int64 tensor to hand to the kernel; :meth:`wait`
    returns the row of the first out-of-range target, or None."""

    __slots__ = ("word", "_host", "_index", "_free", "_device", "_stream")

    def __init__(self, word: torch.Tensor, host, index: int, free: list, device: torch.device):
        self.word, self._host, self._index, self._free = word, host, index, free
        self._device = device  # where the kernel runs; the word itself is host memory either way
        self._stream = 0  # the raw CUDA stream the kernel goes to, set by take()

    def wait(self) -> int | None:
        host, i = self._host, self._index
        value = int(host[i])
        if value == PENDING:
            value = self._poll()
        self._free.append(self)
        return None if value == IN_RANGE else value - FIRST_BAD

    def _poll(self) -> int:
        host, i = self._host, self._index
        start = time.perf_counter()
        stream = None
        while (value := int(host[i])) == PENDING:
            # Each turn releases the GIL for a moment, so that other threads (data loading) run while this one
            # waits, as they do during a CUDA synchronisation.
            time.sleep(0)
            if time.perf_counter() - start < _SPIN_S:
                continue
            # A long queue before the kernel, or a failed launch: let the stream report a CUDA error rather
            # than waiting for a word that will never come.
            if stream is None:
                if self._device.type != "cuda":
                    raise RuntimeError("persample: the target check's kernel returned without writing its verdict")
                # (an ExternalStream of handle 0 would be a new stream, not the default one)
                stream = (torch.cuda.default_stream(self._device) if self._stream == 0
                          else torch.cuda.ExternalStream(self._stream, self._device))
            if stream.query() and int(host[i]) == PENDING:
                stream.synchronize()  # a finished stream's writes to host memory are certain only after a sync
                if (value := int(host[i])) == PENDING:
                    raise RuntimeError("persample: the target check's kernel finished without writing its verdict")
                return value
        return value


_pools: dict = {}
_blocks: list = []  # every pinned allocation, kept alive for good (see the module docstring)


def take(device: torch.device) -> Verdict:
    """A word set to ``PENDING`` for a kernel on ``device`` to write (pinned host memory for CUDA), launched on
    that device's current stream."""
    free = _pools.get(device)
    if free is None:
        free = _pools[device] = []
    if not free:
        if device.type == "cuda":
            with torch.cuda.device(device):
                block = torch.zeros(2 * _BLOCK, dtype=torch.int64, pin_memory=True)
        else:
            block = torch.zeros(2 * _BLOCK, dtype=torch.int64)
        _blocks.append(block)
        host = block.numpy()
        free.extend(Verdict(block[i:i + 1], host, i, free, device) for i in range(0, 2 * _BLOCK, 2))
    verdict = free.pop()
    verdict._host[verdict._index] = PENDING
    if device.type == "cuda":
        verdict._stream = torch._C._cuda_getCurrentRawStream(device.index)
    return verdict
