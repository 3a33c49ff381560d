"""The public API over every cell: draw stacked weights, run layers of K models, trace them step by step.

    init_weights(cell, input_size, hidden_size, num_layers, generators, scale, forget_bias, dtype)
    run(cell, layers, x, steps=None, impl="auto", state=None, lengths=None) -> (out (K, B, T, H), final states per layer)
    run_bidirectional(cell, forward, backward, x, lengths, steps=None, impl="auto", last_step=False) -> out (K, B, T, 2H)
    run_steps(cell, layers, x, state=None) -> StepTrace (per-step h tensors and gates; the probes)
    implementation(cell, device, dtype, impl="auto") -> "cpp" | "triton" | "reference"

impl "auto": on the CPU in float32/float64 the cell's "cpp" loop when it has one and the extension
loads; on CUDA (or with TRITON_INTERPRET=1) its "triton" loop when triton imports; else the reference
step loop (the cell's `step` over time, batched matmuls over the K models, autograd throughout). All
implementations compute the same function; they agree to float rounding only, so the name is
recorded with every run. A Triton failure under "auto" (no compiler for this GPU, ...) warns once
and the reference runs from then on.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

from rnnbench.cells import compiled, triton_steps
from rnnbench.cells.base import Cell, State, Weights
from rnnbench.cells.registry import get_cell
from rnnbench.errors import RnnbenchError

IMPLS = ("auto", "reference", "cpp", "triton")
TRITON_FAILURES: list[str] = []  # reasons, once a Triton loop failed under impl="auto"


def init_weights(
    cell: str | type[Cell],
    input_size: int,
    hidden_size: int,
    num_layers: int,
    generators: list[torch.Generator],
    scale: float | None,
    forget_bias: float,
    dtype: torch.dtype,
    upper_input_size: int | None = None,
) -> list[Weights]:
    """Weights of `num_layers` layers for K = len(generators) models, each (K, *shape), on the CPU.

    Layer 0 reads input_size features, the layers above it upper_input_size (default hidden_size;
    2 * hidden_size above a bidirectional layer).

    Member k's weights come from generators[k] alone, drawn in a fixed order (layer, then the order
    of `weight_shapes`) from U(-s, s), s = scale or 1/sqrt(hidden_size) when scale is None (torch's
    default for its RNNs); then the cell's `init_` (forget-gate bias, ...). So member k gets the same
    numbers whatever K and its batch-mates (the cell's `draw_` runs per member, on its generator).
    Plain tensors: the caller moves them and sets requires_grad (never on the cell's `frozen`).
    """
    cls = get_cell(cell)
    if not generators:
        raise ValueError("init_weights needs one generator per member, got none")
    s = 1.0 / hidden_size**0.5 if scale is None else float(scale)
    per_member: list[list[Weights]] = []
    for g in generators:
        layers = []
        for l in range(num_layers):
            shapes = cls.weight_shapes(input_size if l == 0 else upper_input_size or hidden_size, hidden_size)
            layers.append({n: torch.empty(shape, dtype=dtype).uniform_(-s, s, generator=g) for n, shape in shapes.items()})
            cls.draw_(layers[-1], hidden_size, g)
        per_member.append(layers)
    stacked = [{n: torch.stack([m[l][n] for m in per_member]) for n in per_member[0][l]} for l in range(num_layers)]
    with torch.no_grad():
        for w in stacked:
            cls.init_(w, hidden_size, forget_bias)
    return stacked


def _triton_usable(device: torch.device) -> bool:
    return triton_steps.available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def implementation(cell: str | type[Cell], device: torch.device | str, dtype: torch.dtype, impl: str = "auto") -> str:
    """The time loop `run` uses for this cell on tensors of `device` and `dtype`: cpp, triton or reference.

    An explicit impl the cell or machine cannot serve is a one-line RnnbenchError naming why.
    """
    cls = get_cell(cell)
    device = torch.device(device)
    if impl not in IMPLS:
        raise RnnbenchError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl in ("cpp", "triton") and impl not in cls.loops:
        have = ", ".join(["reference", *cls.loops])
        raise RnnbenchError(f"cell {cls.name!r} has no {impl} loop; its implementations: {have}")
    if impl == "cpp":
        if not compiled.cpp_eligible(device, dtype):
            raise RnnbenchError(f"impl 'cpp' needs CPU float32/float64 tensors, got {device} {dtype}")
        if not compiled.load_extension():
            raise RnnbenchError(f"impl 'cpp' unavailable: {compiled.extension_info()['reason']}")
        return "cpp"
    if impl == "triton":
        if not triton_steps.available():
            raise RnnbenchError("impl 'triton' needs the triton package (it comes with torch's CUDA wheels)")
        if not _triton_usable(device):
            raise RnnbenchError(f"impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
        return "triton"
    if impl == "auto":
        if device.type == "cpu" and "cpp" in cls.loops and compiled.cpp_eligible(device, dtype) and compiled.load_extension():
            return "cpp"
        if "triton" in cls.loops and _triton_usable(device) and not TRITON_FAILURES:
            return "triton"
    return "reference"


def _zero_state(cls: type[Cell], x: torch.Tensor, hidden_size: int) -> State:
    K, B = x.shape[1], x.shape[2]
    return tuple(x.new_zeros(K, B, hidden_size) for _ in range(cls.state_size))


def _check_steps(steps: torch.Tensor | None, K: int, T: int) -> torch.Tensor | None:
    if steps is None:
        return None
    steps = torch.as_tensor(steps).to(torch.int64)
    if steps.shape != (K,):
        raise ValueError(f"steps must have shape ({K},), got {tuple(steps.shape)}")
    if K and (int(steps.min()) < 1 or int(steps.max()) > T):
        raise ValueError(f"steps must lie in 1..{T}, got {steps.tolist()}")
    return None if bool((steps == T).all()) else steps


def _check_lengths(lengths: torch.Tensor, K: int, B: int, T: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths).to(torch.int64)
    if lengths.shape != (K, B):
        raise ValueError(f"lengths must have shape ({K}, {B}), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in 1..{T}")
    return lengths.cpu()


def reference_loop(cls: type[Cell], w: Weights, xw: torch.Tensor, state: State,
                   steps: torch.Tensor | None, outputs: bool = True) -> tuple[torch.Tensor, State]:
    """The cell's `step` over time for K models (a Loop): member k's state stops at its steps[k]-th
    step and its outputs after that are zeros (steps (K, B): each sequence's at its own). With
    outputs=False the final state only (hs is empty): nothing of the T steps is kept."""
    T, K, B = xw.shape[:3]
    all_run, any_run = (T, T) if steps is None else (int(steps.min()), int(steps.max()))
    running = None if steps is None else steps.to(xw.device).view(K, -1)
    outs = []
    for t in range(any_run):
        new, _ = cls.step(w, xw[t], state)
        if t < all_run:
            state = new
            if outputs:
                outs.append(new[0])
        else:  # some members have ended: they keep their state and output zeros
            keep = (t < running).unsqueeze(-1)  # (K, 1 or B, 1)
            state = tuple(torch.where(keep, n, o) for n, o in zip(new, state))
            if outputs:
                outs.append(new[0] * keep.to(new[0].dtype))
    if not outputs:
        return xw.new_zeros(0), state
    outs += [torch.zeros_like(state[0])] * (T - any_run)
    return torch.stack(outs), state


def _layer(cls: type[Cell], which: str, w: Weights, xw: torch.Tensor, state: State,
           steps: torch.Tensor | None, impl: str) -> tuple[torch.Tensor, State]:
    if which == "reference":
        return reference_loop(cls, w, xw, state, steps)
    if which == "triton" and impl == "auto":
        try:
            return cls.loops["triton"](w, xw, state, steps)
        except Exception as e:  # noqa: BLE001 - any build or launch error means "fall back"
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            TRITON_FAILURES.append(reason)
            warnings.warn(f"rnnbench: Triton loop unavailable ({reason}); using the reference step loop",
                          RuntimeWarning, stacklevel=3)
            return reference_loop(cls, w, xw, state, steps)
    return cls.loops[which](w, xw, state, steps)


def run(
    cell: str | type[Cell],
    layers: list[Weights],
    x: torch.Tensor,
    steps: torch.Tensor | None = None,
    impl: str = "auto",
    state: list[State] | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[State]]:
    """K models' stacked layers over x (K, B, T, D) -> (top layer's h_t (K, B, T, H), final state per layer).

    steps (K,) int64: member k's own length (1..T); its outputs after that are zeros and its final
    state is the one after its own last step, so with zero padding member k's numbers (and gradients)
    equal those of its unpadded sequence. lengths (K, B) int64, instead: the same for each sequence,
    at its own length (steps is then each member's longest): the loops skip the padded steps of
    short sequences, and every output at a valid step is unchanged (the recurrence is causal).
    state: per layer a tuple of (K, B, H) tensors (zeros when None). Layer l's h_t is layer l+1's x_t.
    """
    out, finals = _stack(cell, layers, x, steps, impl, state, lengths, outputs=True)
    assert out is not None
    return out, finals


def _stack(cell: str | type[Cell], layers: list[Weights], x: torch.Tensor, steps: torch.Tensor | None, impl: str,
           state: list[State] | None, lengths: torch.Tensor | None, outputs: bool,
           ) -> tuple[torch.Tensor | None, list[State]]:
    """`run`, and with outputs=False `final_states` (the top layer's outputs are then None)."""
    cls = get_cell(cell)
    K, B, T, _ = x.shape
    which = implementation(cls, x.device, x.dtype, impl)
    if lengths is not None:
        lengths = _check_lengths(lengths, K, B, T)
        steps = lengths.max(1).values
    steps = _check_steps(steps, K, T)
    if lengths is not None and bool((lengths == lengths[:, :1]).all()):
        lengths = None  # every sequence as long as its member's longest: member-level steps say it all
    h = x.permute(2, 0, 1, 3)  # (T, K, B, D): time major inside
    finals = []
    for l, w in enumerate(layers):
        s0 = _zero_state(cls, h, cls.hidden_size_of(w)) if state is None else tuple(state[l])
        xw = _project(cls, w, h, steps, lengths)
        if not outputs and l == len(layers) - 1 and which == "reference":
            _, final = reference_loop(cls, w, xw, s0, steps if lengths is None else lengths, outputs=False)
            finals.append(final)
            return None, finals
        h, final = _layer(cls, which, w, xw, s0, steps if lengths is None else lengths, impl)
        finals.append(final)
    return (h.permute(1, 2, 0, 3) if outputs else None), finals


def final_states(
    cell: str | type[Cell],
    layers: list[Weights],
    x: torch.Tensor,
    steps: torch.Tensor | None = None,
    impl: str = "auto",
    lengths: torch.Tensor | None = None,
) -> list[State]:
    """`run`'s final state per layer without the top layer's outputs: the reference loop keeps none of
    its T steps (what a task that reads only each sequence's last step needs of a reservoir of 20,000
    units: its (K, B, T, H) outputs would be GBs). The same numbers as `run`'s final states."""
    return _stack(cell, layers, x, steps, impl, None, lengths, outputs=False)[1]


FUSED_LOSS_ELEMENTS = 1 << 21
"""From this many logits on (a population's), `bernoulli_nll` runs the compiled op whatever the thread
count, its rows split between the threads; below, on one thread only."""


def bernoulli_nll(logits: torch.Tensor, targets: torch.Tensor, target_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The Bernoulli NLL of 0/1 `targets` under `logits` (..., D), summed over the last dim -> (...):
    what binary_cross_entropy_with_logits gives summed over D, with autograd for the logits. With
    `target_rows` (R,) int64, logits are (R, D) and row r's targets are targets.reshape(-1, D)[target_rows[r]]
    (read where they lie by the compiled op, not gathered first).

    On the CPU in float32/float64, the compiled op (one pass forward, one backward) for a population's
    logits (FUSED_LOSS_ELEMENTS or more: tens of MB, where torch's four passes over them cost more than
    the recurrence) and on one thread; else torch's, whose passes split a small tensor between its
    threads (a population of one on 2 threads: torch's was faster than the op on one).
    """
    D = logits.shape[-1] if logits.dim() else 0
    targets = targets.to(logits.dtype)
    large = logits.numel() >= FUSED_LOSS_ELEMENTS
    fused = large or torch.get_num_threads() == 1
    if not (fused and rows_linear_available(logits.device, logits.dtype) and logits.dim() >= 1 and D > 0):
        if target_rows is not None:
            targets = targets.reshape(-1, D).index_select(0, target_rows.to(targets.device))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    if target_rows is not None:
        return compiled.BernoulliNLL.apply(logits, targets.reshape(-1, D), target_rows.to(logits.device), large)
    return compiled.BernoulliNLL.apply(logits.reshape(-1, D), targets.reshape(-1, D), None, large).view(logits.shape[:-1])


def rows_linear_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `rows_linear` serves tensors of this device and dtype (the compiled CPU ops)."""
    return compiled.cpp_eligible(device, dtype) and compiled.load_extension()


def rows_linear(x: torch.Tensor, starts: list[int], counts: list[int], W: torch.Tensor, b: torch.Tensor,
                coords: torch.Tensor | None = None) -> torch.Tensor:
    """Member k's linear map x W[k]^T + b[k] over its own rows starts[k] .. starts[k] + counts[k] - 1 of
    x (R, D) -> (R, O), 0 on rows no member owns: one product per member, the members in parallel, with
    autograd (e.g. the output layer over the packed valid steps). With `coords` (R, x.dim() - 1) int64,
    row r is x's row at those coordinates (x (..., D), read where it lies: no gather of x first).
    Where `rows_linear_available`."""
    return compiled.rows_linear(x, starts, counts, W, b, coords)


def _project(cls: type[Cell], w: Weights, x: torch.Tensor, steps: torch.Tensor | None,
             lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The cell's input projection x (T, K, B, D) -> (T, K, B, G); where sequences end early and the
    compiled ops serve this device and dtype, their steps only, the padded steps 0 (steps_linear): each
    sequence's own (lengths (K, B)) or each member's first steps (steps (K,)). Every loop reads a
    sequence's xw only up to its own end (the reference loop computes the later steps and discards
    them), so the numbers are the same and the padded steps cost nothing."""
    if ((steps is None and lengths is None) or cls.project.__func__ is not Cell.project.__func__  # type: ignore[attr-defined]
            or not rows_linear_available(x.device, x.dtype)):
        return cls.project(w, x)
    T, K, B, D = x.shape
    if lengths is None:  # each member's own steps: every sequence of member k runs steps[k]
        lengths = steps.to(x.device).view(K, 1).expand(K, B)
    # x is a time-major view of the batch-major input: steps_linear reads each sequence's rows where
    # they lie (one strided product per sequence), where a member-major copy of x first would move
    # tens of MB for a population (the same numbers; 1.8x faster for K = 32 measured)
    return compiled.steps_linear(x.transpose(0, 1), lengths, w["weight_ih"], w["bias"]).transpose(0, 1)


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (K, B, T, ...) with the first lengths[k, b] steps of each sequence in reverse order and the
    steps after them (padding) where they were; applied twice it gives x back."""
    K, B, T = x.shape[:3]
    t = torch.arange(T, device=x.device)
    L = lengths.to(x.device).view(K, B, 1)
    idx = torch.where(t < L, L - 1 - t, t)
    return x.gather(2, idx.view(K, B, T, *([1] * (x.dim() - 3))).expand_as(x))


def run_bidirectional(
    cell: str | type[Cell],
    forward: list[Weights],
    backward: list[Weights],
    x: torch.Tensor,
    lengths: torch.Tensor,
    steps: torch.Tensor | None = None,
    impl: str = "auto",
    last_step: bool = False,
) -> torch.Tensor:
    """A bidirectional stack (Schuster & Paliwal 1997) over x (K, B, T, D) -> out (K, B, T, 2H).

    Each layer runs `forward` over the sequences and `backward` over each sequence reversed within its
    own length (lengths (K, B)); the layer above reads [forward h_t, backward h_t], both in the input's
    order, so the backward h_t has read x_L .. x_t. At the top layer, last_step=True leaves the
    backward outputs in the reversed order instead: its output at each sequence's last step t = L-1 is
    then its state after reading the whole sequence (what a task that reads only that step needs).
    Padding steps (t >= L) reach no valid step in either direction.
    """
    h = x
    for l, (wf, wb) in enumerate(zip(forward, backward, strict=True)):
        fwd, _ = run(cell, [wf], h, steps, impl)
        bwd, _ = run(cell, [wb], reverse_within(h, lengths), steps, impl)
        if not (last_step and l == len(forward) - 1):
            bwd = reverse_within(bwd, lengths)
        h = torch.cat([fwd, bwd], dim=-1)
    return h


class StepTrace(NamedTuple):
    """What `run_steps` records: out (K, B, T, H) top layer; hs[t][l] the (K, B, H) tensor h of layer l
    after step t+1, the very tensor the later steps read (so gradients can be taken against it);
    gates {(layer, gate name): (K, B, T, H)}; final state per layer."""

    out: torch.Tensor
    hs: list[list[torch.Tensor]]
    gates: dict[tuple[int, str], torch.Tensor]
    final: list[State]


def run_steps(cell: str | type[Cell], layers: list[Weights], x: torch.Tensor,
              state: list[State] | None = None) -> StepTrace:
    """The reference step by step, all layers at each step before the next: x (K, B, T, D) -> StepTrace."""
    cls = get_cell(cell)
    T = x.shape[2]
    states = [_zero_state(cls, x.permute(2, 0, 1, 3), cls.hidden_size_of(w)) if state is None else tuple(state[l])
              for l, w in enumerate(layers)]
    hs: list[list[torch.Tensor]] = []
    gates: dict[tuple[int, str], list[torch.Tensor]] = {}
    for t in range(T):
        inp, row = x[:, :, t], []
        for l, w in enumerate(layers):
            states[l], g = cls.step(w, cls.project(w, inp.unsqueeze(0))[0], states[l])
            for name, v in g.items():
                gates.setdefault((l, name), []).append(v)
            inp = states[l][0]
            row.append(inp)
        hs.append(row)
    out = torch.stack([row[-1] for row in hs], dim=2)
    return StepTrace(out, hs, {k: torch.stack(v, dim=2) for k, v in gates.items()}, states)
