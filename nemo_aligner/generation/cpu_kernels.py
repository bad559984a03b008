"""Compiled CPU kernels for a decoding step: the weight products and the attention
(``csrc/decode_kernels.c``).

Why: a decoding step multiplies each weight by a few rows (16 at batch 16), and on CPU
every weight comes from memory (a hidden-256 model streams ~14 MB per step, more than the
last-level cache keeps). MKL's kernel for these shapes first copies (packs) the weight and
then computes, so a product costs its arithmetic plus a separate read of the weight (16 x
256 against 1376 x 256: 108 us in cache, 270 us from memory). :class:`Product` walks each
thread's rows of the weight once while computing, so the read overlaps the arithmetic (the
17 products of a hidden-256 step: 3.1-3.9 -> 2.3-2.9 ms from memory). torch's CPU
attention for one new query position spends most of its time per (row, head) task rather
than in arithmetic; :class:`DecodeAttention` does a task in one pass over its keys and
values (hidden-256 shapes: 170-210 -> 70-110 us a layer in cache). Both run on torch's own
OpenMP threads: the library binds the ``libgomp`` torch has loaded (a second OpenMP
runtime would fight torch's for the cores, which is why a numba product was not adopted).
docs/generation.md has the engine numbers.

No library computes these on CPU without the packing copy or the per-task overhead, hence
hand-written kernels. They are compiled once per machine with the system C compiler
(``$CC``, else ``cc``; GCC's OpenMP) into ``~/.cache/nemo_aligner/kernels``
(``$NEMO_ALIGNER_KERNEL_CACHE`` to move it) and loaded with ``ctypes``; where that is
impossible (no compiler, another OpenMP runtime, not Linux) the decoder uses torch's
kernels, and ``NEMO_ALIGNER_CPU_KERNELS=0`` makes it do so always. Results are float32,
within rounding of torch's (not bitwise): a product's every entry is one FMA chain in
``k`` order, the same whatever the thread count and the other rows of the batch.
"""

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
# Up to this many rows a decoding step's products run on the kernel; past it MKL's blocked
# kernels are faster (a hidden-256 step's 17 products from memory: 16 rows 3.3 vs 4.5 ms,
# 32 rows 5.1 vs 5.8, 64 rows 8.3 vs 7.2, 128 rows 16 vs 12). The prefill keeps MKL's.
MAX_ROWS = 32

_state = {"tried": False, "lib": None}


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process."""
    names = ("libgomp", "libomp", "libiomp")
    try:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if any(n in line for n in names)}
    except OSError:
        return set()


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return ""


def _cache_dir() -> Path:
    root = os.environ.get("NEMO_ALIGNER_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nemo_aligner" / "kernels"


def _compile(compiler: list[str], target: Path) -> None:
    """Build the library into ``target`` (atomically: a temporary file, then a rename)."""
    import fcntl  # POSIX only, as the kernels are

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent processes build it once
        if target.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        try:
            subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _load():
    if os.environ.get("NEMO_ALIGNER_CPU_KERNELS", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not compiler:
        logger.warning("no C compiler found (cc, or $CC): CPU decoding steps use torch's kernels, about 1.2x "
                       "slower; install gcc for the compiled ones, or set NEMO_ALIGNER_CPU_KERNELS=0")
        return None
    before = _openmp_runtimes()
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256("\0".join((SOURCE.read_text(), version, *compiler, *FLAGS, _cpu_key())).encode())
        target = _cache_dir() / f"decode_kernels-{key.hexdigest()[:16]}.so"
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip()[:500]
        logger.warning("could not build the CPU decoding kernels (%s%s); decoding steps use torch's kernels",
                       e, f": {detail}" if detail else "")
        return None
    if _openmp_runtimes() - before:
        # The library brought an OpenMP runtime of its own (e.g. a compiler that is not
        # GCC): its threads would compete with torch's, so it is not used.
        logger.warning("the CPU decoding kernels brought another OpenMP runtime; decoding steps use torch's kernels")
        return None
    lib.decode_product_args.argtypes = [ctypes.c_void_p]
    lib.decode_attention_args.argtypes = [ctypes.c_void_p, ctypes.c_float]
    lib.decode_product_args.restype = lib.decode_attention_args.restype = ctypes.c_int
    return lib


def library():
    """The compiled kernels (a ``ctypes`` library), loaded (and built if needed) at the
    first call; ``None`` where they are unavailable."""
    if not _state["tried"]:
        _state["tried"] = True
        _state["lib"] = _load()
    return _state["lib"]


def applies(weight: torch.Tensor) -> bool:
    """Whether :func:`product` can compute with ``weight`` (a float32 CPU matrix with
    contiguous rows) here."""
    return (
        weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
        and weight.stride(1) == 1 and library() is not None
    )


def _check(name: str, t: torch.Tensor, dim: int) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d float32 CPU tensor, got {tuple(t.shape)} {t.dtype} on {t.device}")


class Product:
    """``out = weight @ x`` (``out += weight @ x`` when ``accumulate``) into a fixed ``out``
    ``[M, B]`` for a fixed ``weight`` ``[M, K]`` (see :func:`applies`), checked once; each
    call takes ``x`` ``[K, B]`` (float32, any strides) and returns ``out``. The weight and
    ``out`` are read through their addresses: the weight may change in place (a refit), not
    be replaced."""

    def __init__(self, weight: torch.Tensor, out: torch.Tensor, accumulate: bool = False):
        if not applies(weight):
            raise ValueError(f"product: weight {tuple(weight.shape)} {weight.dtype} strides {weight.stride()} "
                             "is not a float32 CPU matrix with contiguous rows, or the kernels are unavailable")
        _check("product: out", out, 2)
        (m, k), b = weight.shape, out.shape[1]
        if out.shape[0] != m:
            raise ValueError(f"product: out {tuple(out.shape)} for weight {tuple(weight.shape)}")
        self.weight, self.out, self.x_shape = weight, out, (k, b)
        self._args = (ctypes.c_int64 * 13)(
            weight.data_ptr(), m, k, weight.stride(0), 0, b, 0, 0, out.data_ptr(), *out.stride(), int(accumulate), 1)
        self._fn = library().decode_product_args

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.x_shape or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"product: x {tuple(x.shape)} {x.dtype} for weight {tuple(self.weight.shape)}, out {tuple(self.out.shape)}")
        a = self._args
        a[4] = x.data_ptr()
        a[6], a[7] = x.stride()
        a[12] = torch.get_num_threads()
        if self._fn(a) != 0:
            raise MemoryError("the CPU decoding kernel could not allocate its packed activations")
        return self.out


def product(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """``out = weight @ x`` (``out += weight @ x`` when ``accumulate``) for ``weight`` ``[M, K]``
    (see :func:`applies`), ``x`` ``[K, B]`` and ``out`` ``[M, B]`` float32 CPU tensors of any
    strides; returns ``out`` (:class:`Product` for a weight and an ``out`` used repeatedly)."""
    return Product(weight, out, accumulate)(x)


class DecodeAttention:
    """One decoding step's attention on fixed buffers, checked once: ``q`` ``[B, G, P, D]``
    (the ``P`` query heads of each key/value group), ``keys`` / ``values`` ``[B, G, slots, D]``,
    ``bias`` ``[B, slots]`` added to the scores (``None``: nothing) and ``out`` ``[B, G, P, D]``;
    float32 CPU tensors with ``D`` contiguous, the kernels available (:func:`library`).
    ``attend(length)`` attends over the first ``length`` slots and returns ``out``: the same
    as ``scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length],
    bias[:, None, None, :length], scale=scale)`` within rounding."""

    def __init__(self, q, keys, values, bias, scale: float, out):
        b, g, p, d = q.shape
        for name, t in (("q", q), ("keys", keys), ("values", values), ("out", out)):
            _check(f"attention: {name}", t, 4)
            if t.stride(3) != 1 or tuple(t.shape[:2]) != (b, g) or t.shape[3] != d:
                raise ValueError(f"attention: {name} {tuple(t.shape)} strides {t.stride()} for q {tuple(q.shape)}")
        if tuple(out.shape) != tuple(q.shape) or keys.shape[2] != values.shape[2]:
            raise ValueError(f"attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}, out {tuple(out.shape)}")
        self.slots = keys.shape[2]
        if bias is not None:
            _check("attention: bias", bias, 2)
            if bias.stride(1) != 1 or tuple(bias.shape) != (b, self.slots):
                raise ValueError(f"attention: bias {tuple(bias.shape)} strides {bias.stride()} for {b} rows of {self.slots} slots")
        if library() is None:
            raise ValueError("attention: the CPU kernels are unavailable")
        self._keep = (q, keys, values, bias, out)  # the addresses below stay valid
        self.out = out
        self._args = (ctypes.c_int64 * 24)(
            q.data_ptr(), *q.stride()[:3], keys.data_ptr(), *keys.stride()[:3],
            values.data_ptr(), *values.stride()[:3],
            0 if bias is None else bias.data_ptr(), 0 if bias is None else bias.stride(0),
            out.data_ptr(), *out.stride()[:3], b, g, p, d, 0, 1,
        )
        self.scale = float(scale)
        self._fn = library().decode_attention_args

    def __call__(self, length: int) -> torch.Tensor:
        if not 0 < length <= self.slots:
            raise ValueError(f"attention over {length} slots of {self.slots}")
        a = self._args
        a[22], a[23] = length, torch.get_num_threads()
        if self._fn(a, self.scale) != 0:
            raise MemoryError("the CPU decoding kernel could not allocate its attention scores")
        return self.out
