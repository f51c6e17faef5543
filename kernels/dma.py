"""Strided copies on the GPU's copy engines (`cudaMemcpy2DAsync`), which torch does not expose.

A copy engine moves a block between the KV cache and pinned host memory without any SM and with one
pass over HBM, where gather-then-copy reads the KV, writes a staging buffer and reads that again. In a
layout whose runs of one block are equally spaced (vLLM's layer-compact views of one buffer: the
block's page in layer l lies `l * layer_stride` after layer 0's), one 2D copy moves a whole block.
"""

from __future__ import annotations

import ctypes
import functools

import torch

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the (unified) addresses


@functools.cache
def _cudart() -> ctypes.CDLL:
    """The CUDA runtime library torch has loaded (its name carries the CUDA major version)."""
    torch.cuda.init()
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "/libcudart.so" in line})
    if not paths:
        raise RuntimeError("torch has not loaded a shared CUDA runtime (libcudart) to issue 2D copies with")
    library = ctypes.CDLL(paths[0])
    library.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    library.cudaGetErrorString.restype = ctypes.c_char_p
    return library


def copy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, stream: torch.cuda.Stream) -> None:
    """Queue on `stream` a copy of `height` rows of `width` bytes, rows `src_pitch` / `dst_pitch` apart.

    Addresses are raw device or pinned host pointers; the caller keeps their memory alive until the
    stream has passed the copy.
    """
    cudart = _cudart()
    status = cudart.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, _MEMCPY_DEFAULT, stream.cuda_stream)
    if status:
        raise RuntimeError(f"cudaMemcpy2DAsync failed: {cudart.cudaGetErrorString(status).decode()}")
