"""Per-row numeric kernels: deterministic initializers and the sparse optimizers.

A row of the arena is `[embedding (dim) | optimizer state]`. State layouts:
- sgd: none;
- adagrad: accumulator (dim);
- ftrl: z (dim), n (dim), as in McMahan et al. 2013 with learning_rate_power -1/2;
- adam: m (dim), v (dim), step count (1): "lazy" Adam, which advances a row's moments
  only when the row gets a gradient, as sparse Adam does.
Hyper-parameters travel as a float64 array indexed by the HP_* constants. The kernels
take the table's constants as one `TableParams`, not as loose scalars.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from monolith.embedding.config import InitializerConfig, OptimizerConfig
from monolith.embedding.hashing import mix64, stream_value, to_unit_float

SGD, ADAGRAD, FTRL, ADAM = 0, 1, 2, 3
OPTIMIZER_CODES = {"sgd": SGD, "adagrad": ADAGRAD, "ftrl": FTRL, "adam": ADAM}
ZEROS, UNIFORM, NORMAL = 0, 1, 2
INITIALIZER_CODES = {"zeros": ZEROS, "uniform": UNIFORM, "normal": NORMAL}

HP_LR, HP_INIT_ACC, HP_EPS, HP_BETA1, HP_BETA2, HP_L1, HP_L2, HP_BETA, HP_OCCURRENCES = range(9)


class TableParams(NamedTuple):
    """One table's constants, as the kernels see them.

    Attributes:
        dim: embedding dimension.
        init_kind: initializer code (INITIALIZER_CODES).
        init_scale: initializer scale.
        init_seed: seed of the initializer's per-id random stream.
        opt_kind: optimizer code (OPTIMIZER_CODES).
        hp: float64 optimizer hyper-parameters (HP_*).
        filter_kind: admission filter code (table_kernels.FILTER_*).
        threshold: occurrences the counting filter needs.
        admit_probability: per-occurrence admission probability of the probabilistic filter.
    """

    dim: int
    init_kind: int
    init_scale: float
    init_seed: np.uint64
    opt_kind: int
    hp: np.ndarray
    filter_kind: int
    threshold: int
    admit_probability: float


def hyper_parameters(opt: OptimizerConfig) -> np.ndarray:
    """The optimizer's hyper-parameters as the float64 array the kernels read."""
    return np.array(
        [opt.learning_rate, opt.initial_accumulator, opt.epsilon, opt.beta1, opt.beta2, opt.l1, opt.l2, opt.beta,
         1.0 if opt.accumulate == "occurrences" else 0.0],
        dtype=np.float64,
    )


def initializer_params(init: InitializerConfig) -> tuple[int, float]:
    """(kind code, scale) for the kernels."""
    return INITIALIZER_CODES[init.kind], float(init.scale)


# The kernels take the arena and a row number rather than a row view: numba builds a new
# array object per slice, which costs more than the arithmetic on a 16-float row.


@numba.njit(inline="always", nogil=True, cache=True)
def init_embedding(values: np.ndarray, row: np.int64, key: np.int64, p: TableParams) -> None:
    """Sets a row's embedding from a random stream keyed by (the table's init seed, id)."""
    dim, kind, scale = p.dim, p.init_kind, p.init_scale
    if kind == ZEROS:
        for j in range(dim):
            values[row, j] = 0.0
        return
    base = mix64(np.uint64(key) ^ p.init_seed)
    for j in range(dim):
        u = to_unit_float(stream_value(base, 2 * j))
        if kind == UNIFORM:
            values[row, j] = (2.0 * u - 1.0) * scale
        else:
            # Box-Muller on two independent uniforms; 1 - u keeps the log argument > 0.
            v = to_unit_float(stream_value(base, 2 * j + 1))
            values[row, j] = scale * math.sqrt(-2.0 * math.log(1.0 - u)) * math.cos(2.0 * math.pi * v)


@numba.njit(inline="always", nogil=True, cache=True)
def init_state(values: np.ndarray, row: np.int64, p: TableParams) -> None:
    """Sets the optimizer state of a row whose embedding is already set."""
    dim, kind, hp = p.dim, p.opt_kind, p.hp
    if kind == ADAGRAD:
        for j in range(dim):
            values[row, dim + j] = hp[HP_INIT_ACC]
    elif kind == FTRL:
        n0 = hp[HP_INIT_ACC]
        denom = (hp[HP_BETA] + math.sqrt(n0)) / hp[HP_LR] + hp[HP_L2]
        for j in range(dim):
            w = values[row, j]
            # Choose z so that the FTRL closed form reproduces the initial weight.
            z = -w * denom
            if w > 0:
                z -= hp[HP_L1]
            elif w < 0:
                z += hp[HP_L1]
            values[row, dim + j] = z
            values[row, 2 * dim + j] = n0
    elif kind == ADAM:
        for j in range(dim, values.shape[1]):
            values[row, j] = 0.0


@numba.njit(inline="always", nogil=True, cache=True)
def apply_gradient(
    values: np.ndarray, row: np.int64, grads: np.ndarray, squares: np.ndarray, i: np.int64, p: TableParams
) -> None:
    """One optimizer step on `values[row]` with gradient `grads[i]`, computed in float64.

    `squares[i]` (when `squares` has rows) is the sum of the squares of the per-occurrence
    gradients summed into `grads[i]`; Adagrad and FTRL add it to their squared-gradient
    accumulators instead of `grads[i] ** 2` when the optimizer accumulates "occurrences".
    """
    dim, kind, hp = p.dim, p.opt_kind, p.hp
    per_occurrence = squares.shape[0] > 0 and hp[HP_OCCURRENCES] > 0
    lr = hp[HP_LR]
    if kind == SGD:
        for j in range(dim):
            values[row, j] -= lr * grads[i, j]
    elif kind == ADAGRAD:
        eps = hp[HP_EPS]
        for j in range(dim):
            g = np.float64(grads[i, j])
            acc = values[row, dim + j] + (np.float64(squares[i, j]) if per_occurrence else g * g)
            values[row, dim + j] = acc
            values[row, j] -= lr * g / (math.sqrt(acc) + eps)
    elif kind == FTRL:
        l1, l2, beta = hp[HP_L1], hp[HP_L2], hp[HP_BETA]
        for j in range(dim):
            g = np.float64(grads[i, j])
            w = np.float64(values[row, j])
            n = np.float64(values[row, 2 * dim + j])
            n_new = n + (np.float64(squares[i, j]) if per_occurrence else g * g)
            sigma = (math.sqrt(n_new) - math.sqrt(n)) / lr
            z = values[row, dim + j] + g - sigma * w
            values[row, dim + j] = z
            values[row, 2 * dim + j] = n_new
            if abs(z) <= l1:
                values[row, j] = 0.0
            else:
                sign = 1.0 if z > 0 else -1.0
                values[row, j] = (sign * l1 - z) / ((beta + math.sqrt(n_new)) / lr + l2)
    else:
        b1, b2, eps = hp[HP_BETA1], hp[HP_BETA2], hp[HP_EPS]
        t = values[row, 3 * dim] + 1.0
        values[row, 3 * dim] = t
        c1 = 1.0 - b1**t
        c2 = 1.0 - b2**t
        for j in range(dim):
            g = np.float64(grads[i, j])
            m = b1 * values[row, dim + j] + (1.0 - b1) * g
            v = b2 * values[row, 2 * dim + j] + (1.0 - b2) * g * g
            values[row, dim + j] = m
            values[row, 2 * dim + j] = v
            values[row, j] -= lr * (m / c1) / (math.sqrt(v / c2) + eps)
