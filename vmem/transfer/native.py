"""The native transfer library (``csrc/vmem_native.cu``): built on first use, loaded with ctypes.

Why on first use and not in the package build: installing vmem must never need a CUDA
toolkit, and a wheel built ahead of time would have to guess the GPU architecture. The
library is a plain C ABI over the CUDA runtime (statically linked), so it does not depend on
torch's C++ ABI or headers: ``nvcc`` alone builds it in a few seconds, into a cache keyed by
the source, the compiler and the architecture (``$VMEM_CACHE_DIR``, else
``~/.cache/vmem/native``). ``python -m vmem build-native`` builds it ahead of time.

Example::

    >>> from vmem.transfer import native
    >>> native.status()  # doctest: +SKIP
    'loaded (.../libvmem_native-0123abcd.so); no CUDA device (cudaErrorNoDevice: ...)'
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch

__all__ = ["NativeError", "NativeLibrary", "Arena", "ArenaStats", "Event", "build", "load",
           "source_path", "status"]

log = logging.getLogger("vmem")

ABI_VERSION = 2


class NativeError(RuntimeError):
    """A CUDA runtime error reported by the native library, or a failed build."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def source_path() -> Path:
    """Where the library's source is: ``csrc/`` beside the ``vmem`` package."""
    return Path(__file__).resolve().parents[2] / "csrc" / "vmem_native.cu"


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    found = shutil.which("nvcc")
    candidates += [Path(found)] if found else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((str(c) for c in candidates if c.is_file()), None)


def _arch_flags() -> list[str]:
    """SASS and PTX for this machine's GPU; PTX for compute 7.5 (the oldest CUDA 13 runs;
    the driver compiles it for any newer GPU) where there is none."""
    arch = os.environ.get("VMEM_CUDA_ARCH")  # e.g. "90"
    if arch is None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
    if arch is None:
        return ["-gencode", "arch=compute_75,code=compute_75"]
    return ["-gencode", f"arch=compute_{arch},code=[sm_{arch},compute_{arch}]"]


def _cache_dir() -> Path:
    root = os.environ.get("VMEM_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "vmem" / "native"


def build(cache_dir: Path | str | None = None, *, force: bool = False) -> Path:
    """Compile the library (if the cache does not hold this build yet); returns its path.

    Raises:
        NativeError: no ``nvcc``, no source, or the compiler failed (its output included).
    """
    nvcc, source = _nvcc(), source_path()
    if nvcc is None:
        raise NativeError("nvcc not found (set CUDA_HOME, or put the CUDA toolkit's bin on "
                          "PATH)")
    if not source.is_file():
        raise NativeError(f"{source} not found: the native library builds from a source "
                          "checkout of vmem")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    command = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *_arch_flags()]
    key = hashlib.sha256(source.read_bytes() + version.encode() + " ".join(command[1:]).encode())
    directory = Path(cache_dir) if cache_dir is not None else _cache_dir()
    library = directory / f"libvmem_native-{key.hexdigest()[:16]}.so"
    if library.is_file() and not force:
        return library
    directory.mkdir(parents=True, exist_ok=True)
    print(f"vmem: building the native transfer library with {nvcc} (once; cached in "
          f"{directory})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        target = Path(scratch) / library.name
        done = subprocess.run([*command, "-o", str(target), str(source)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise NativeError(f"nvcc failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        os.replace(target, library)  # atomic: a concurrent build never sees half a file
    return library


class ArenaStats(ctypes.Structure):
    """The arena's statistics (bytes and counts), as the library reports them."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "reserved", "in_use", "peak_in_use", "blocks", "block_allocations", "allocations",
        "frees", "reuses")]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_}


_P, _SIZE, _INT = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
_SIGNATURES = {
    "vmem_abi_version": ([], _INT),
    "vmem_error_string": ([_INT], ctypes.c_char_p),
    "vmem_error_name": ([_INT], ctypes.c_char_p),
    "vmem_device_count": ([ctypes.POINTER(_INT)], _INT),
    "vmem_arena_create": ([_SIZE, _INT, ctypes.POINTER(_P)], _INT),
    "vmem_arena_alloc": ([_P, _SIZE, ctypes.POINTER(_P)], _INT),
    "vmem_arena_free": ([_P, _P], _INT),
    "vmem_arena_trim": ([_P], _INT),
    "vmem_arena_stats_get": ([_P, ctypes.POINTER(ArenaStats)], _INT),
    "vmem_arena_destroy": ([_P], _INT),
    "vmem_copy_async": ([_P, _P, _SIZE, _P], _INT),
    "vmem_copy_batch": ([ctypes.POINTER(_P), ctypes.POINTER(_P), ctypes.POINTER(_SIZE), _SIZE,
                         _P], _INT),
    "vmem_event_create": ([ctypes.POINTER(_P)], _INT),
    "vmem_event_record": ([_P, _P], _INT),
    "vmem_stream_wait_event": ([_P, _P], _INT),
    "vmem_event_synchronize": ([_P], _INT),
    "vmem_event_destroy": ([_P], _INT),
    "vmem_compress_workspace_bytes": ([_SIZE], _SIZE),
    "vmem_decompress_workspace_bytes": ([_SIZE], _SIZE),
    "vmem_compress": ([_P, _SIZE, _INT, _P, _P, _P], _INT),
    "vmem_decompress": ([_P, _SIZE, _INT, _P, _P, _P], _INT),
}


class NativeLibrary:
    """The loaded library: its functions, with CUDA errors raised as :class:`NativeError`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(path))
        for name, (argtypes, restype) in _SIGNATURES.items():
            function = getattr(self.lib, name)
            function.argtypes, function.restype = argtypes, restype
        if self.lib.vmem_abi_version() != ABI_VERSION:
            raise NativeError(f"{path} has ABI {self.lib.vmem_abi_version()}, this vmem needs "
                              f"{ABI_VERSION}: rebuild with `python -m vmem build-native`")

    def check(self, code: int, what: str) -> None:
        if code != 0:
            name = self.lib.vmem_error_name(code).decode()
            text = self.lib.vmem_error_string(code).decode()
            raise NativeError(f"{what}: {name} ({text})", code)

    def device_count(self) -> tuple[int, str | None]:
        """The CUDA devices the runtime sees, and why there are none when that is so."""
        count = _INT()
        code = self.lib.vmem_device_count(ctypes.byref(count))
        if code != 0:
            name = self.lib.vmem_error_name(code).decode()
            return 0, f"{name}: {self.lib.vmem_error_string(code).decode()}"
        return count.value, None if count.value else "the runtime sees no device"

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Copy ``nbytes`` from address ``src`` to ``dst`` on ``stream``, asynchronously."""
        self.check(self.lib.vmem_copy_async(dst, src, nbytes, stream), "vmem_copy_async")

    def copy_batch(self, dsts: list[int], srcs: list[int], sizes: list[int], stream: int) -> None:
        """Many copies in one call, in order, on one stream."""
        n = len(sizes)
        self.check(self.lib.vmem_copy_batch((_P * n)(*dsts), (_P * n)(*srcs), (_SIZE * n)(*sizes),
                                            n, stream), "vmem_copy_batch")

    def compress_workspace_bytes(self, numel: int) -> int:
        return self.lib.vmem_compress_workspace_bytes(numel)

    def decompress_workspace_bytes(self, numel: int) -> int:
        return self.lib.vmem_decompress_workspace_bytes(numel)

    def compress(self, src: int, numel: int, elem_size: int, out: int, workspace: int,
                 stream: int) -> None:
        self.check(self.lib.vmem_compress(src, numel, elem_size, out, workspace, stream),
                   "vmem_compress")

    def decompress(self, src: int, numel: int, elem_size: int, out: int, workspace: int,
                   stream: int) -> None:
        self.check(self.lib.vmem_decompress(src, numel, elem_size, out, workspace, stream),
                   "vmem_decompress")


class Event:
    """A CUDA event of the native library (no timing), destroyed with the object."""

    def __init__(self, library: NativeLibrary) -> None:
        self.library, handle = library, _P()
        library.check(library.lib.vmem_event_create(ctypes.byref(handle)), "vmem_event_create")
        self.handle = handle.value

    def record(self, stream: int) -> None:
        self.library.check(self.library.lib.vmem_event_record(self.handle, stream),
                           "vmem_event_record")

    def block(self, stream: int) -> None:
        """Make ``stream`` wait for this event (the host does not wait)."""
        self.library.check(self.library.lib.vmem_stream_wait_event(stream, self.handle),
                           "vmem_stream_wait_event")

    def synchronize(self) -> None:
        self.library.check(self.library.lib.vmem_event_synchronize(self.handle),
                           "vmem_event_synchronize")

    def __del__(self) -> None:
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.library.lib.vmem_event_destroy(handle)


class Arena:
    """Host memory in a few large blocks (pinned with ``cudaHostAlloc`` unless ``pinned`` is
    false), handed out as ``uint8`` tensors that give their bytes back when freed.

    Example::

        >>> from vmem.transfer import native
        >>> arena = native.Arena(native.load(), block_bytes=1 << 20, pinned=False)
        >>> buf = arena.tensor(1000)
        >>> buf.numel(), arena.stats()["in_use"]
        (1000, 1024)
        >>> del buf
        >>> arena.stats()["in_use"]
        0
    """

    def __init__(self, library: NativeLibrary, block_bytes: int = 64 << 20,
                 pinned: bool = True) -> None:
        self.library, self.pinned, handle = library, pinned, _P()
        library.check(library.lib.vmem_arena_create(block_bytes, int(pinned),
                                                     ctypes.byref(handle)), "vmem_arena_create")
        self.handle = handle.value

    def alloc(self, nbytes: int) -> int:
        """The address of ``nbytes`` from the arena (512-byte aligned)."""
        ptr = _P()
        self.library.check(self.library.lib.vmem_arena_alloc(self.handle, nbytes,
                                                             ctypes.byref(ptr)),
                           f"allocating {nbytes} bytes of pinned host memory")
        return ptr.value

    def free(self, ptr: int) -> None:
        if self.handle:  # after close, the blocks are gone already
            self.library.check(self.library.lib.vmem_arena_free(self.handle, ptr),
                               "vmem_arena_free")

    def tensor(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` tensor over ``nbytes`` of the arena, given back when its storage dies."""
        ptr = self.alloc(nbytes)
        buffer = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
        t = torch.frombuffer(buffer, dtype=torch.uint8)[:nbytes]
        # weakref.finalize on the storage: it runs when the last view of the bytes is gone.
        weakref.finalize(t.untyped_storage(), self.free, ptr)  # holds the arena alive too
        return t

    def trim(self) -> None:
        """Give back the blocks nothing is allocated from."""
        self.library.check(self.library.lib.vmem_arena_trim(self.handle), "vmem_arena_trim")

    def __del__(self) -> None:
        # Every tensor's finalizer holds the arena, so no block is in use by now.
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.library.lib.vmem_arena_destroy(handle)

    def stats(self) -> dict[str, int]:
        stats = ArenaStats()
        self.library.check(self.library.lib.vmem_arena_stats_get(self.handle,
                                                                 ctypes.byref(stats)),
                           "vmem_arena_stats_get")
        return stats.as_dict()


def load() -> NativeLibrary:
    """The library, built first if need be; the outcome, failure included, is kept for the
    process, so a failed build is tried once.

    Raises:
        NativeError: it could not be built or loaded; the message says why.
    """
    outcome = _load()
    if isinstance(outcome, NativeError):
        raise outcome
    return outcome


@functools.cache
def _load() -> NativeLibrary | NativeError:
    path = os.environ.get("VMEM_NATIVE_LIBRARY")
    try:
        path = path or build()
        return NativeLibrary(path)
    except NativeError as error:
        return error
    except OSError as error:
        return NativeError(f"cannot load {path}: {error}")


def status() -> str:
    """One line: whether the library loads here, and what CUDA devices it sees."""
    try:
        library = load()
    except NativeError as error:
        return f"unavailable: {error}"
    count, why = library.device_count()
    devices = f"{count} CUDA device(s)" if count else f"no CUDA device ({why})"
    return f"loaded ({library.path}); {devices}"
