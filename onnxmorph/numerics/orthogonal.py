"""Random orthogonal factors for the solvers: QR of a Gaussian, or a structured DCT mix above 1024.

The depth morph fixes one factor at a scaled random orthogonal matrix, so that solving for the
other is a transpose and both survive float32 rounding. Above 1024 on both sides a Householder
QR costs seconds (O(n^3)); a randomly permuted DCT mixed by Haar-random 64-blocks is equally
dense and orthonormal, costs O(n^2 * 64) to build and applies as one FFT-based transform.
"""

from __future__ import annotations

import math

import numpy as np

# Above this size a Householder QR costs seconds (O(n^3) at LAPACK's QR speed); a
# structured random orthogonal matrix (see _mixed_dct_orthogonal) costs O(n^2 * 64).
_QR_MAX_DIM = 1024
_MIX_BLOCK = 64


def idct_rows(u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``D.T @ u`` along axis 0, ``D`` the orthonormal n x n DCT-II matrix (so this is the
    orthonormal DCT-III), via one inverse real FFT of length n and Makhoul's reordering.

    ``D.T @ u = x`` has ``x[2p] = v[p]`` and ``x[2p + 1] = v[n - 1 - p]`` where ``v`` is the
    inverse real FFT of ``V[m] = (u[m] - i u[n - m]) exp(i pi m / 2n) / s_m`` (``u[n] = 0``),
    ``s_m`` the row scale of ``D``: a real ``v`` has ``V[n - m] = conj(V[m])``, which is why
    coefficient ``n - m`` enters as the imaginary part. ``out`` (float64, not ``u``) may
    receive the result.
    """
    n = u.shape[0]
    h = n // 2 + 1
    shape = (h,) + (1,) * (u.ndim - 1)
    z = np.empty((h,) + u.shape[1:], dtype=np.complex128)
    z.real = u[:h]
    z.imag[0] = 0.0
    z.imag[1:] = u[n - 1 : n - h : -1]
    z.imag[1:] *= -1.0
    z.real[0] *= math.sqrt(2.0)
    z *= (math.sqrt(n / 2.0) * np.exp(0.5j * np.pi * np.arange(h) / n)).reshape(shape)
    v = np.fft.irfft(z, n, axis=0)
    del z
    half = (n + 1) // 2
    x = np.empty(u.shape) if out is None else out
    x[::2] = v[:half]
    x[1::2] = v[half:][::-1]
    return x


class BlockDiagonal:
    """Block-diagonal Haar-random orthogonal matrix: blocks of 64, plus a remainder block.

    Products are batched as 64 x 64 x 64 pieces: OpenBLAS runs pieces that small on one
    thread, several times faster on a busy 2-core machine than the threaded 64 x 64 x n
    calls of a block-by-block loop, with the same result.
    """

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        nb, rem = divmod(n, _MIX_BLOCK)
        self.full = _haar_stack(nb, _MIX_BLOCK, _MIX_BLOCK, rng) if nb else None
        self.rem = _haar_stack(1, rem, rem, rng)[0] if rem else None
        self.main = nb * _MIX_BLOCK

    def left(self, x: np.ndarray, transpose: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """``B @ x`` (or ``B.T @ x``) for a 2-D ``x``, into ``out`` (C-contiguous, not ``x``) if given."""
        m = x.shape[1]
        out = np.empty(x.shape) if out is None else out
        if self.full is not None:
            a = np.swapaxes(self.full, 1, 2) if transpose else self.full
            nb, b, main = a.shape[0], _MIX_BLOCK, self.main
            mc = m - m % b
            if mc:
                def pieces(v: np.ndarray) -> np.ndarray:
                    return v[:main].reshape(nb, b, m)[:, :, :mc].reshape(nb, b, mc // b, b).swapaxes(1, 2)

                np.matmul(a[:, None], pieces(x), out=pieces(out))
            if mc < m:
                np.matmul(a, x[:main, mc:].reshape(nb, b, m - mc), out=out[:main, mc:].reshape(nb, b, m - mc))
        if self.rem is not None:
            out[self.main :] = (self.rem.T if transpose else self.rem) @ x[self.main :]
        return out

    def right(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``x @ B`` for a 2-D ``x``, into ``out`` (C-contiguous, not ``x``) if given."""
        m = x.shape[0]
        out = np.empty(x.shape) if out is None else out
        if self.full is not None:
            nb, b, main = self.full.shape[0], _MIX_BLOCK, self.main
            mc = m - m % b
            if mc:
                def pieces(v: np.ndarray) -> np.ndarray:
                    return v[:mc, :main].reshape(mc // b, b, nb, b).transpose(2, 0, 1, 3)

                np.matmul(pieces(x), self.full[:, None], out=pieces(out))
            if mc < m:
                def tail(v: np.ndarray) -> np.ndarray:
                    return v[mc:, :main].reshape(m - mc, nb, b).swapaxes(0, 1)

                np.matmul(tail(x), self.full, out=tail(out))
        if self.rem is not None:
            out[:, self.main :] = x[:, self.main :] @ self.rem
        return out


class MixedDCT:
    """Random orthogonal ``Q = L @ D[k][:, j] @ R`` and its fast application.

    ``D`` is the orthonormal n x n DCT-II matrix, ``k`` and ``j`` random permutations of
    its rows and columns, ``L`` and ``R`` block-diagonal with Haar-random orthogonal
    blocks of 64 (plus a remainder). :meth:`dense` builds ``Q`` in O(n^2 * 64); every
    entry is a random combination of thousands of cosines, so ``Q`` is dense and
    unstructured enough for an initialisation, and orthogonal to rounding level.
    :meth:`apply_t` multiplies by ``Q.T`` through the FFT in O(n^2 log n) instead of a
    dense O(n^3) product.
    """

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n = n
        self.rows = rng.permutation(n)
        self.cols = rng.permutation(n)
        self.left = BlockDiagonal(n, rng)
        self.right = BlockDiagonal(n, rng)

    def dense(self) -> np.ndarray:
        n = self.n
        itype = np.int32 if 4 * n * n < 2**31 else np.int64
        k = self.rows.astype(itype)[:, None]
        j = self.cols.astype(itype)[None, :]
        # The integer phase modulo the period indexes a table of 4n cosines: exact small
        # arguments, and n^2 lookups instead of n^2 cos() calls.
        table = np.cos(np.pi * np.arange(4 * n) / (2.0 * n)) * math.sqrt(2.0 / n)
        phase = (2 * j + 1) * k
        np.remainder(phase, 4 * n, out=phase)
        c = np.take(table, phase)
        del phase
        c[k[:, 0] == 0] *= math.sqrt(0.5)  # the DC row of the orthonormal DCT-II
        # Fresh n^2 buffers cost page faults (the kernel zeroes them): c is reused.
        return self.right.right(self.left.left(c), out=c)

    def apply_t(self, x: np.ndarray) -> np.ndarray:
        """``Q.T @ x`` for ``x`` of shape ``[n, ...]``."""
        # Two n^2 buffers take turns (fresh ones cost page faults, the kernel zeroes them).
        a = self.left.left(x.reshape(self.n, -1), transpose=True)
        b = np.empty_like(a)
        b[self.rows] = a
        idct_rows(b, out=a)
        np.take(a, self.cols, axis=0, out=b, mode="clip")
        return self.right.left(b, transpose=True, out=a).reshape(x.shape)


def _mixed_dct_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Dense random n x n orthogonal matrix in O(n^2 * 64) instead of O(n^3) (see :class:`MixedDCT`)."""
    return MixedDCT(n, rng).dense()


def _haar_stack(n: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` Haar-distributed matrices with orthonormal rows (rows <= cols) or columns."""
    tall = rows >= cols
    shape = (n, rows, cols) if tall else (n, cols, rows)
    q, r = np.linalg.qr(rng.standard_normal(shape))
    # Fixing the signs of diag(R) makes the distribution exactly Haar.
    d = np.sign(np.diagonal(r, axis1=-2, axis2=-1))
    d[d == 0] = 1.0
    q = q * d[:, None, :]
    return q if tall else np.swapaxes(q, -1, -2)


def orthogonal_stack(n: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    return orthogonal_stack_ops(n, rows, cols, rng)[0]


def orthogonal_stack_ops(
    n: int, rows: int, cols: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[MixedDCT] | None]:
    """``n`` random ``rows x cols`` matrices with orthonormal rows or columns, and, for the
    structured ones (both sides above 1024), the fast operators whose leading block they are.
    """
    if min(rows, cols) <= _QR_MAX_DIM:
        return _haar_stack(n, rows, cols, rng), None
    ops = [MixedDCT(max(rows, cols), rng) for _ in range(n)]
    mats = [op.dense()[:rows, :cols] for op in ops]
    stack = np.ascontiguousarray(mats[0][None]) if n == 1 else np.stack(mats)
    return stack, ops


def random_orthogonal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random matrix with orthonormal rows (``rows <= cols``) or orthonormal columns.

    QR of a Gaussian matrix with the sign fix that makes it Haar-distributed. When both
    sides exceed 1024 a structured random orthogonal matrix (randomly permuted DCT mixed
    by Haar blocks of 64) is returned instead: equally dense and orthonormal, but
    O(n^2) to build where the QR of a 4096 x 4096 Gaussian takes seconds.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"random_orthogonal needs a positive shape, got {rows} x {cols}")
    return orthogonal_stack(1, rows, cols, rng)[0]
