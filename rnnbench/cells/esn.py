"""Echo-state network: a fixed random reservoir of leaky tanh units; only the readout is trained."""

from __future__ import annotations

import warnings
import weakref

import torch

from rnnbench.cells.base import Cell, State, Weights
from rnnbench.cells.registry import register_cell


@register_cell
class EchoState(Cell):
    """Leaky-integrator echo-state network (Jaeger 2001; Lukoševičius 2012, "A Practical Guide to
    Applying Echo State Networks", eqs. 2-3, with the bias as W_in's column for the constant 1):

        h~_t = tanh(W_in x_t + b + W h_{t-1})
        h_t  = (1 - a) h_{t-1} + a h~_t

    W_in and b ~ U(-input_scale, input_scale). W is sparse with a fixed fan-in: each unit reads
    C = min(connections, H) distinct units, chosen uniformly, with weights U(-1, 1), then W is scaled
    so that its spectral radius (largest |eigenvalue|) is `spectral_radius` (ARPACK through scipy
    above DENSE_EIGVALS units, so a reservoir of 20,000 units is drawn in about a minute). a is the leak
    rate. All of it is drawn from the member's seed and never trained (`frozen`): only the output
    layer Linear(H, O) is, by the run's optimizer (train.readout=optimizer) or by ridge regression on
    the reservoir's states (train.readout=ridge, rnnbench/training/ridge.py).

    Weights (all frozen): weight_ih (H, D), bias (H), and W held sparse as weight_hh (H, C), the
    values of unit i's C inputs, with index_hh (H, C), their columns (exact small integers in the
    weights' float dtype, so that the reservoir stacks, moves and checkpoints like any cell's
    weights). Trained per layer: 0, so a budget counts the output layer (model.budget_convention=
    total); the run records n_params_frozen: H D + H + H C (the index is structure, not parameters).
    To try other reservoir settings, subclass and change the class attributes (one file).
    forget_bias and init_scale are ignored. No fast loop: nothing in the reservoir needs a gradient,
    so the reference loop runs without autograd.
    """

    name = "esn"
    gates = ()
    state_size = 1
    frozen = ("weight_ih", "weight_hh", "index_hh", "bias")
    structure = ("index_hh",)  # W's columns: counted nowhere
    spectral_radius = 0.95  # below 1: the echo-state property in practice (Lukoševičius 2012, 3.2.1)
    leak_rate = 0.5
    input_scale = 1.0
    connections = 10  # inputs per unit of W
    DENSE_EIGVALS = 512  # up to this many units the spectral radius comes from all eigenvalues

    @classmethod
    def fan_in(cls, hidden_size: int) -> int:
        return min(cls.connections, hidden_size)

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H, C = hidden_size, cls.fan_in(hidden_size)
        return {"weight_ih": (H, input_size), "weight_hh": (H, C), "index_hh": (H, C), "bias": (H,)}

    @classmethod
    def hidden_size_of(cls, w: Weights) -> int:
        return int(w["bias"].shape[-1])

    @classmethod
    def draw_(cls, w: Weights, hidden_size: int, generator: torch.Generator) -> None:
        H, C, dtype = hidden_size, cls.fan_in(hidden_size), w["weight_hh"].dtype
        if H > 2 / torch.finfo(dtype).eps:  # every integer up to 2^24 (float32) is exact
            raise ValueError(f"esn: {H} units cannot be indexed exactly in {dtype}")
        s = cls.input_scale
        w["weight_ih"].uniform_(-s, s, generator=generator)
        w["bias"].uniform_(-s, s, generator=generator)
        rows = max(1, 2_000_000 // H)  # the top-C of uniform keys per row: C distinct columns, rows at a time
        index = torch.cat([torch.rand(min(rows, H - r), H, generator=generator).topk(C, dim=1).indices
                           for r in range(0, H, rows)])
        values = torch.empty(H, C, dtype=torch.float64).uniform_(-1.0, 1.0, generator=generator)
        radius = cls.radius(values, index)
        w["weight_hh"].copy_((values * (cls.spectral_radius / radius) if radius > 0 else values).to(dtype))
        w["index_hh"].copy_(index.to(dtype))

    @classmethod
    def radius(cls, values: torch.Tensor, index: torch.Tensor) -> float:
        """The spectral radius of the (H, H) matrix with row i's values at columns index[i]."""
        H = values.shape[0]
        if H <= cls.DENSE_EIGVALS:
            return float(torch.linalg.eigvals(cls.dense(values, index)).abs().max())
        import numpy as np
        import scipy.sparse
        import scipy.sparse.linalg

        C = values.shape[1]
        W = scipy.sparse.csr_matrix((values.numpy().ravel(), index.numpy().ravel(), np.arange(0, H * C + 1, C)),
                                    shape=(H, H))
        # A fixed start vector: the same reservoir from the same seed, run after run. The eigenvalues
        # of such a matrix crowd the edge of a disk, where ARPACK asked for one converges to a near
        # neighbour of the largest (0.7% low at 20,000 units); asked for six, it finds the largest up
        # to ARPACK's tolerance at 700 and 2,000 units (checked against all eigenvalues) and within
        # about 0.2% at 20,000 (against asking for 20).
        ev = scipy.sparse.linalg.eigs(W, k=6, which="LM", v0=np.ones(H), tol=1e-10, return_eigenvectors=False)
        return float(np.abs(ev).max())

    @staticmethod
    def dense(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """W as a dense (..., H, H) matrix (for tests and small reservoirs)."""
        W = torch.zeros(*values.shape[:-1], values.shape[-2], dtype=values.dtype, device=values.device)
        return W.scatter_add_(-1, index.long(), values)

    @classmethod
    def project(cls, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """x (T, K, B, D) -> xw (T, K, B, H) = x W_in^T + b, as a view of a unit-major (K, H, T, B)
        tensor: each step's slice then lies as the sparse product's output does (see `step`)."""
        T, K, B, D = x.shape
        xk = x.permute(1, 3, 0, 2).reshape(K, D, T * B)
        xw = torch.baddbmm(w["bias"].unsqueeze(-1), w["weight_ih"], xk)  # (K, H, T B)
        return xw.view(K, -1, T, B).permute(2, 0, 3, 1)

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        (h,) = state
        a = cls.leak_rate
        # Every term in the unit-major layout of the sparse product (K, H, B), xw_t too (`project`), so
        # that the new state is a (K, B, H) view of such a tensor and the next step's product reads it
        # without a copy: transposing h in and out of that layout cost more than the product.
        pre = cls.recurrent(w, h)  # (K, B, H), a view of a fresh (K, H, B) tensor
        if torch.is_grad_enabled():  # an operation's result takes its first operand's layout
            pre = torch.tanh(pre.add(xw_t))
            return (torch.mul(pre, a).add(torch.mul(h, 1 - a)),), {}  # a sum in either order: the same
        # Without autograd (states read for a readout): the same operations in place on the product's
        # tensor. Each new tensor of a step's size is fresh memory the kernel must fault in, which cost
        # as much as the arithmetic at 20,000 units.
        return (pre.add_(xw_t).tanh_().mul_(a).add_(torch.mul(h, 1 - a)),), {}

    @staticmethod
    def recurrent(w: Weights, h: torch.Tensor) -> torch.Tensor:
        """W h for K members, h (K, B, H): one sparse product with the K reservoirs as the blocks of a
        block-diagonal CSR matrix (a gather of every unit's C inputs was 4-6x slower at 20,000 units),
        differentiable in h (the gradient-flow probe follows it), never in W (frozen). The result is a
        (K, B, H) view of a unit-major (K, H, B) tensor; an h laid out so is read without a copy."""
        K, B, H = h.shape
        return (EchoState.block_matrix(w, K, H, h.dtype) @ h.transpose(1, 2).reshape(K * H, B)).view(K, H, B).transpose(1, 2)

    _block: dict[str, object] = {}  # the last block matrix, and what it was built from

    @staticmethod
    def block_matrix(w: Weights, K: int, H: int, dtype: torch.dtype) -> torch.Tensor:
        """The K reservoirs as one block-diagonal CSR matrix (K H, K H), built once for the weights and
        reused by every step: building it each step cost as much as the product for a batch of a few
        rows. The cache holds one entry, valid while it is these very tensors (a weak reference: a
        tensor freed and another allocated in its place is never mistaken for it) unchanged in place."""
        values, index = w["weight_hh"], w["index_hh"]
        c = EchoState._block
        key = (values._version, index._version, dtype, K, H)
        if c.get("values") is not None and c["values"]() is values and c["index"]() is index and c["key"] == key:
            return c["matrix"]  # type: ignore[return-value]
        C = values.shape[-1]
        columns = (index.long() + (torch.arange(K, device=values.device) * H).view(K, 1, 1)).reshape(-1)
        rows = torch.arange(0, K * H * C + 1, C, device=values.device)
        with warnings.catch_warnings():  # torch calls its CSR support beta
            warnings.simplefilter("ignore", UserWarning)
            # the values detached: frozen, and torch's CSR product has no exact gradient for them
            W = torch.sparse_csr_tensor(rows, columns, values.detach().reshape(-1).to(dtype), (K * H, K * H))
        EchoState._block = {"values": weakref.ref(values), "index": weakref.ref(index), "key": key, "matrix": W}
        return W
