"""No silent wrong results (issue 18): every registered method on inputs at the edges.

For each method of :func:`smallbn.available_norms` hypothesis draws an input shape (1d with
and without length, 2d, 3d; batch 1 and spatial 1×1 included), an input dtype (float32,
float64, bfloat16, float16) and a parameter dtype (the input's, or float32 as a model left in
float32 or under autocast has), a scale and an offset of the values anywhere in
1e-20 … 1e20 (as far as the dtype holds them), a memory format (contiguous, channels-last in
2d and 3d) and training or eval mode.  Every case must end in one of two ways:

(a) an output and input/parameter gradients that are finite and agree with a float64
    reference computed from the method's definition (tests/reference.py, which never calls
    smallbn) within the rounding the dtypes allow (:func:`tolerance`), or
(b) an error of type ValueError/TypeError/FloatingPointError/RuntimeError whose message
    names the layer (its ``describe()`` text, with the layer's path) and says what was wrong
    and how to fix it.

Never a finite wrong number, a NaN/Inf without an error, or a foreign error (torch's "mixed
dtype (CPU)", an IndexError, ...).  Where the definition has no value — a batch statistic of a
single value per channel in training, a group norm group of a single value — the layer must
raise (b).  Where a statistic of a finite input overflows the statistics dtype (float32 for
float32/half inputs: |x| above ~1e18) it may compute (a) or raise (b), but an error must not
blame NaN/Inf in the (finite) input.

torch's BatchNorm ("bn") is a third-party layer: it is held to (a) where it computes and to
raising where the definition has no value, not to the message rules; cases where torch itself
refuses the dtypes (a float64 input into a float32 layer) are not drawn for it.

Cross-iteration methods (cbn, mabn) are checked on their first training step (empty window,
warm-up: plain BN, and ``γ x/sqrt(E[x²] + eps) + β``); their later steps are the spec's and
tested in tests/layers.

Defects the property test found are fixed; the cases that showed them run on every test run
(``REGRESSIONS``, ``test_fixed_defect_stays_fixed``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, given, settings
from hypothesis import event as _event
from hypothesis import note as _note
from hypothesis import strategies as st
from torch import Tensor, nn

import smallbn
from reference import (
    Normalized,
    ref_batch_norm,
    ref_batch_renorm,
    ref_domain_batch_norm,
    ref_domain_population_norm,
    ref_ghost_batch_norm,
    ref_group_norm,
    ref_moving_average_first_step,
    ref_population_norm,
    ref_switchable_norm,
)

METHODS = smallbn.available_norms()
PATH = "block.norm"

#: Options that make the method's distinctive computation happen on small batches: Ghost BN
#: splits batches of 3 into groups of 2 and 1; GN has 2 groups where C allows; BRN clips with
#: its final limits (r_max = 3, d_max = 5) from the first step; DomainBN gets per-sample ids.
OPTIONS: dict[str, dict] = {
    "ghostbn": {"group_size": 2},
    "gn": {"num_groups": 2},
    "domainbn": {"num_domains": 2},
    "brn": {"warmup_steps": 0, "r_max_ramp_end": 0, "d_max_ramp_end": 0},
}
BRN_LIMITS = (3.0, 5.0)
GHOST_GROUP = 2

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: Unit roundoff of each dtype.
UNIT = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
#: Rounding-error allowance, in units of the dtypes' unit roundoff (see :func:`tolerance`).
K = 32.0
ALLOWED_ERRORS = (ValueError, TypeError, FloatingPointError, RuntimeError)
#: A message that tells the user what to do (imperative fixes used across smallbn's errors).
FIX = re.compile(
    r"\b(use|pass|scale|set|reshape|put|build|convert|keep|add|include|switch|lower|larger|"
    r"smaller|find the source|check|give|choose|call)\b",
    re.IGNORECASE,
)
#: A message that blames NaN/Inf values of the input.
BLAMES_NON_FINITE = re.compile(r"(contains|has|had|got) NaN|NaN/Inf|NaN or Inf", re.IGNORECASE)
#: What a "single value" error is about.
TOO_SMALL = re.compile(r"single value|more than one value|one value per", re.IGNORECASE)

EXAMPLES = max(150, 6 * settings().max_examples)  # the loaded profile's scale ("thorough": 600)
ROBUST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run and machine: CI is reproducible
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def note(text: str) -> None:
    """hypothesis's ``note`` inside a property test (printed with a failing example)."""
    if currently_in_test_context():
        _note(text)


def event(text: str) -> None:
    if currently_in_test_context():
        _event(text)


# -- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    method: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    param_dtype: torch.dtype
    channels_last: bool
    training: bool
    scale: float
    loc: float
    seed: int = 0
    #: Eval mode, and BRN's training step: running statistics near the data's (True) or the
    #: initial ones (mean 0, variance 1).
    data_stats: bool = True

    @property
    def values_per_sample(self) -> int:
        return math.prod(self.shape[2:])

    @property
    def dim(self) -> int:
        return max(len(self.shape) - 2, 1)

    def __repr__(self) -> str:  # a line to paste into a reproduction
        fmt = "channels_last" if self.channels_last else "contiguous"
        mode = "train" if self.training else "eval"
        return (
            f"Case({self.method!r}, {self.shape}, {self.dtype}, params {self.param_dtype}, "
            f"{fmt}, {mode}, scale={self.scale:g}, loc={self.loc:g}, seed={self.seed}, "
            f"data_stats={self.data_stats})"
        )


def _max_exponent(dtype: torch.dtype) -> int:
    """Largest power of ten for scale and offset such that the values stay finite."""
    return 4 if dtype == torch.float16 else 20


@st.composite
def cases(draw, method: str) -> Case:
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    n = draw(st.sampled_from([1, 1, 2, 3]))
    c = draw(st.sampled_from([1, 2, 3, 4]))
    most = 2 if ndim == 5 else 3
    spatial = tuple(draw(st.integers(1, most)) for _ in range(ndim - 2))
    if draw(st.integers(0, 3)) == 0:  # spatial 1×1 (×1) often
        spatial = (1,) * len(spatial)
    dtype = draw(st.sampled_from(DTYPES))
    if method == "bn" and dtype == torch.float64:
        param_dtype = torch.float64  # torch's BN refuses a float64 input into a float32 layer
    else:
        param_dtype = draw(st.sampled_from([dtype, torch.float32]))
    top = _max_exponent(dtype)
    scale = 10.0 ** draw(st.integers(-20, top))
    loc = 0.0
    if draw(st.booleans()):
        loc = draw(st.sampled_from([1.0, -1.0])) * 10.0 ** draw(st.integers(-20, top))
    return Case(
        method=method,
        shape=(n, c, *spatial),
        dtype=dtype,
        param_dtype=param_dtype,
        channels_last=ndim >= 4 and draw(st.booleans()),
        training=draw(st.booleans()),
        scale=scale,
        loc=loc,
        seed=draw(st.integers(0, 2**16)),
        data_stats=draw(st.booleans()),
    )


def make_input(case: Case) -> Tensor:
    """``loc + scale·(±1 + U(−½, ½))·f_c`` with the sign alternating along ``(N, *spatial)`` and
    a per-channel factor f_c in [0.5, 2]: every two consecutive values differ by about
    ``scale`` (no group is constant unless the dtype rounds the spread away), cast to the
    case's dtype and memory format."""
    gen = torch.Generator().manual_seed(case.seed)
    n, c = case.shape[:2]
    k = case.values_per_sample
    sign = (1 - 2 * (torch.arange(n * k) % 2)).to(torch.float64).reshape(n, 1, k)
    noise = torch.rand((n, c, k), generator=gen, dtype=torch.float64) - 0.5
    factor = 0.5 + 1.5 * torch.rand((1, c, 1), generator=gen, dtype=torch.float64)
    x = (case.loc + case.scale * factor * (sign + noise)).reshape(case.shape).to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=_layout(x))
    return x


def _layout(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


# -- layers and references -----------------------------------------------------------------------


def build(case: Case) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = smallbn.build_norm(
            case.method, case.shape[1], dim=case.dim, dtype=case.param_dtype,
            **OPTIONS.get(case.method, {}),
        )  # fmt: skip
    layer.model_path = PATH  # as smallbn.convert names the layers it installs
    return layer


def domain_ids(case: Case) -> list[int]:
    return [n % 2 for n in range(case.shape[0])]


def _fits(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Clamp to a sixteenth of what ``dtype`` holds (a stored statistic stays finite)."""
    top = torch.finfo(dtype).max / 16
    return values.clamp(-top, top)


@torch.no_grad()
def set_state(layer: nn.Module, case: Case, x64: Tensor) -> None:
    """Random affine (γ in [0.5, 1.5], β ~ N(0, 1)) and mixture logits; running statistics
    near the data's (mean off by 0.1σ, variance times 0.5…2) where ``case.data_stats``."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    c = case.shape[1]
    if getattr(layer, "weight", None) is not None:
        layer.weight.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
    if getattr(layer, "bias", None) is not None:
        layer.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    for name in ("mean_weight", "var_weight"):
        if hasattr(layer, name):
            getattr(layer, name).copy_(torch.randn(getattr(layer, name).shape, generator=gen))
    if not case.data_stats or getattr(layer, "running_var", None) is None:
        return
    running_mean, running_var = layer.running_mean, layer.running_var
    flat = x64.transpose(0, 1).reshape(c, -1)
    if case.method == "mabn":  # MABN tracks E[x²] with a zero mean
        mean, var = torch.zeros(c, dtype=torch.float64), flat.square().mean(1)
    else:
        mean, var = flat.mean(1), flat.var(1, correction=0)
    shape = running_mean.shape
    mean = mean + 0.1 * var.sqrt() * torch.randn(shape, generator=gen, dtype=torch.float64)
    var = var * (0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64))
    running_mean.copy_(_fits(mean.expand(shape), running_mean.dtype))
    running_var.copy_(_fits(var.expand(shape), running_var.dtype))


def parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in layer.named_parameters() if p.requires_grad}


def expects_error(case: Case, layer: nn.Module) -> bool:
    """Whether the method's definition has no value for the case (a statistic of a single
    value): the layer must raise."""
    n, c = case.shape[:2]
    k = case.values_per_sample
    method = case.method
    if method in ("gn", "ln", "in"):
        return (c // layer.num_groups) * k <= 1
    if not case.training or method in ("frozenbn", "mabn"):
        return False
    if method == "sn":
        return k <= 1 and k * c <= 1 and n * k <= 1
    if method == "ghostbn":
        return min(min(GHOST_GROUP, n - s) for s in range(0, n, GHOST_GROUP)) * k <= 1
    if method == "domainbn":
        ids = domain_ids(case)
        return min(ids.count(d) for d in set(ids)) * k <= 1
    return n * k <= 1


def reference(case: Case, layer: nn.Module, x: Tensor, params: dict[str, Tensor]) -> Normalized:
    """The float64 reference of the case's forward, from the layer's parameter values and
    state before the call (``params``: float64 leaves standing for the layer's Parameters)."""
    eps = layer.eps
    weight = params.get("weight", _buffer(layer, "weight"))
    bias = params.get("bias", _buffer(layer, "bias"))
    method = case.method
    if method in ("gn", "ln", "in"):
        return ref_group_norm(x, layer.num_groups, eps, weight, bias)
    running = (_buffer(layer, "running_mean"), _buffer(layer, "running_var"))
    if method == "sn":
        return ref_switchable_norm(
            x, params["mean_weight"], params["var_weight"], eps, weight, bias, *running,
            training=case.training, branches=layer.branches,
        )  # fmt: skip
    if method == "frozenbn" or not case.training:
        if method == "domainbn":
            return ref_domain_population_norm(x, domain_ids(case), *running, eps, weight, bias)
        return ref_population_norm(x, *running, eps, weight, bias)
    if method in ("bn", "syncbn", "cbn", "shufflebn"):  # CBN: its first step pools an empty
        # window; Shuffle BN without norm_batch_size in one process is BN
        return ref_batch_norm(x, eps, weight, bias)
    if method == "brn":
        return ref_batch_renorm(x, eps, weight, bias, *running, *BRN_LIMITS)
    if method == "ghostbn":
        return ref_ghost_batch_norm(x, GHOST_GROUP, eps, weight, bias)
    if method == "domainbn":
        return ref_domain_batch_norm(x, domain_ids(case), eps, weight, bias)
    if method == "mabn":  # the first step: warm-up, r = 1
        return ref_moving_average_first_step(x, eps, weight, bias)
    raise AssertionError(f"no reference for {method!r}: add one to tests/reference.py")


def _buffer(layer: nn.Module, name: str) -> Tensor | None:
    value = getattr(layer, name, None)
    return None if value is None else value.detach().double().clone()


def forward(case: Case, layer: nn.Module, x: Tensor) -> Tensor:
    if case.method == "domainbn":
        return layer(x, torch.tensor(domain_ids(case)))
    return layer(x)


# -- the check -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one case did: ``error`` (raised), else the output and the gradients."""

    error: BaseException | None = None
    y: Tensor | None = None
    grads: dict[str, Tensor | None] = field(default_factory=dict)


def run_layer(case: Case, layer: nn.Module, x: Tensor, g: Tensor) -> Outcome:
    xa = x.detach().clone().requires_grad_(True)
    if case.channels_last:
        assert xa.is_contiguous(memory_format=_layout(xa))
    params = parameters(layer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CBN without a producer, SN leaving out a branch
            y = forward(case, layer, xa)
            (y.double() * g).sum().backward()
    except ALLOWED_ERRORS as error:
        return Outcome(error=error)
    grads = {"input": xa.grad, **{name: p.grad for name, p in params.items()}}
    return Outcome(y=y, grads=grads)


def overflow_zone(case: Case, x64: Tensor) -> bool:
    """Whether a sum of squares of the input can overflow the statistics dtype (float32 for
    every input but float64), or a variance or mean square the layer's dtype (a float16
    module's running statistics hold at most 65504): there the layer may raise instead of
    computing."""
    stats = torch.float64 if case.dtype == torch.float64 else torch.float32
    peak = float(x64.abs().max()) if x64.numel() else 0.0
    square = peak * peak
    return (
        square * max(x64[:, 0].numel(), 1) > torch.finfo(stats).max / 64
        or square > torch.finfo(case.param_dtype).max / 64
    )


def tolerance(
    case: Case, x64: Tensor, ref: Normalized, weight: Tensor | None
) -> tuple[float, float]:
    """``(relative allowance, condition number)``.

    Rounding errors allowed: ``K·(u_io + u_st·(1 + cond)·sqrt(M))`` of each quantity's
    natural scale, with u_io the unit roundoff of the input and parameter dtypes (rounding of
    the output, the gradients and the affine), u_st that of the statistics dtype (float32 at
    least; float32 too for a float64 input into a float32 layer, whose running statistics
    are float32 numbers), M the values per channel and ``cond = max |x|·slope/|γ|``: an error
    of u·|x| in a mean or in ``x − μ`` moves the output by ``slope·u·|x|`` (|μ| ≫ σ, or
    σ² ≪ eps with a large |x|, make it large; float32 statistics cannot do better).
    """
    u_io = max(UNIT[case.dtype], UNIT[case.param_dtype])
    wide = case.dtype == case.param_dtype == torch.float64
    u_st = UNIT[torch.float64 if wide else torch.float32]
    view = (1, -1, *([1] * (x64.dim() - 2)))
    gamma = 1.0 if weight is None else weight.detach().abs().reshape(view)
    cond = float((x64.abs() * ref.slope.abs() / gamma).max()) if x64.numel() else 0.0
    values = max(x64[:, 0].numel(), 1)
    return K * (u_io + u_st * (1.0 + cond) * math.sqrt(values)), cond


def check_case(case: Case) -> None:
    """Run the case; raise AssertionError describing how it broke the contract."""
    note(repr(case))
    layer = build(case)
    x = make_input(case)
    x64 = x.detach().double()
    set_state(layer, case, x64)
    layer.train(case.training)
    gen = torch.Generator().manual_seed(case.seed + 2)
    g = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(case.dtype).double()
    leaves = {
        name: p.detach().double().clone().requires_grad_(True)
        for name, p in parameters(layer).items()
    }
    degenerate = expects_error(case, layer)
    ref, x_ref = None, x64.clone().requires_grad_(True)
    if not degenerate:  # before the call: the layer may update its running statistics
        ref = reference(case, layer, x_ref, leaves)
        (ref.y * g).sum().backward()
    if case.method == "bn" and overflow_zone(case, x64):
        event("bn: torch's own accuracy where its float32 statistics overflow, not checked")
        return
    outcome = run_layer(case, layer, x, g)
    if outcome.error is not None:
        check_error(case, layer, x64, outcome.error, degenerate)
        return
    if degenerate:
        raise AssertionError(
            f"no error where the definition has no value (a statistic of a single value); "
            f"output {outcome.y}"
        )
    assert ref is not None
    check_numbers(case, layer, x64, g, outcome, ref, x_ref.grad, leaves)


def check_error(
    case: Case, layer: nn.Module, x64: Tensor, error: BaseException, degenerate: bool
) -> None:
    """(b): an error is due, or allowed (overflow), and its message names the layer, says what
    was wrong and how to fix it (torch's BN: only whether an error is due)."""
    text = str(error)
    message = f"{type(error).__name__}: {text}"
    note(message)
    if not degenerate and not overflow_zone(case, x64):
        raise AssertionError(f"unexpected error for a computable case: {message}") from error
    if case.method == "bn":
        return
    description = layer.describe()
    assert description in text, f"the error does not name the layer ({description!r}): {message}"
    assert FIX.search(text), f"the error does not say how to fix it: {message}"
    if bool(torch.isfinite(x64).all()):
        assert not BLAMES_NON_FINITE.search(text), (
            f"the error blames NaN/Inf in a finite input: {message}"
        )
    if degenerate:
        assert TOO_SMALL.search(text), f"the error does not say what was wrong: {message}"


def check_numbers(
    case: Case,
    layer: nn.Module,
    x64: Tensor,
    g: Tensor,
    outcome: Outcome,
    ref: Normalized,
    ref_grad: Tensor | None,
    leaves: dict[str, Tensor],
) -> None:
    """(a): output and gradients finite and within :func:`tolerance` of the reference.  Each
    quantity's natural scale: the output's ``max|y| + max|β| + max|γ|``; the input
    gradient's ``slope·max|∂L/∂y|·(1 + sqrt(M))``; γ's ``Σ|∂L/∂y|·(|x̂| + 1)`` and β's
    ``Σ|∂L/∂y|`` per channel; SN's logits' ``Σ|∂L/∂y|·logit_scale``."""
    y = outcome.y
    assert y is not None and y.shape == x64.shape and y.dtype == case.dtype, (
        f"output of shape {None if y is None else tuple(y.shape)}, dtype "
        f"{None if y is None else y.dtype}"
    )
    weight = leaves.get("weight", _buffer(layer, "weight"))
    bias = leaves.get("bias", _buffer(layer, "bias"))
    rel, cond = tolerance(case, x64, ref, weight)
    note(f"tolerance {rel:.3g} (cond {cond:.3g})")
    view = (1, -1, *([1] * (x64.dim() - 2)))
    gamma = torch.ones(1) if weight is None else weight.detach().abs()
    beta = torch.zeros(1) if bias is None else bias.detach()
    ref_y = ref.y.detach()
    g_max = float(g.abs().max())

    def compare(what: str, actual: Tensor | None, expected: Tensor | None, scale) -> None:
        if expected is None:
            return
        assert actual is not None, f"{what}: no gradient"
        actual, expected = actual.detach().double(), expected.detach()
        assert torch.isfinite(actual).all(), f"{what} is not finite: {actual}"
        allowed = torch.as_tensor(rel * scale, dtype=torch.float64)
        error = (actual - expected).abs()
        assert bool((error <= allowed).all()), (
            f"{what} differs from the float64 reference by up to {float(error.max()):.4g} "
            f"(allowed {float(allowed.max()):.4g});\n"
            f"actual   {actual.flatten()[:12].tolist()}\n"
            f"expected {expected.flatten()[:12].tolist()}"
        )

    compare("output", y, ref_y, float(ref_y.abs().max() + beta.abs().max() + gamma.max()))
    values = max(x64[:, 0].numel(), 1)
    slope = float(ref.slope.abs().max())
    compare("input gradient", outcome.grads.get("input"), ref_grad,
            slope * g_max * (1.0 + math.sqrt(values)))  # fmt: skip
    reduce = [d for d in range(x64.dim()) if d != 1]
    for name, leaf in leaves.items():
        if name == "weight":
            x_hat = (ref_y - beta.reshape(view)) / leaf.detach().reshape(view)
            scale = (g.abs() * (x_hat.abs() + 1.0)).sum(reduce)
        elif name == "bias":
            scale = g.abs().sum(reduce)
        else:  # SN's mixture logits
            assert ref.logit_scale is not None, f"no scale for the gradient of {name}"
            scale = float((g.abs() * ref.logit_scale).sum()) + g_max
        compare(f"{name} gradient", outcome.grads.get(name), leaf.grad, scale)


# -- regressions: defects the property test found, fixed ----------------------------------------


f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

#: Each entry: a defect the property test found (what went wrong), and the cases that showed
#: it; they run as ordinary cases of :func:`check_case`, so the defect cannot come back.
REGRESSIONS: dict[str, tuple[str, tuple[Case, ...]]] = {
    "switchable_overflow_gives_bias": (
        "SwitchableNorm in eval mode on a finite input whose layer/batch variance overflows "
        "float32 (|x| ~1e20): the mixed variance was Inf and the output the bias alone",
        (Case("sn", (1, 3), f32, f32, False, False, 1e20, 0.0, 59269, False),),
    ),
    "half_precision_fold": (
        "float16/bfloat16 running statistics were folded into scale and shift in their own "
        "dtype (0.44 off at x = mu, sigma = 0 in bfloat16; Inf for a float16 shift > 65504)",
        (
            Case("frozenbn", (1, 3, 1), bf16, bf16, False, False, 1e9, 1e-11, 37424, True),
            Case("syncbn", (1, 2, 3), f16, f16, False, False, 0.1, -1000.0, 47198, True),
            Case("brn", (3, 2, 1, 1), bf16, bf16, True, False, 1e14, 1e19, 20417, True),
        ),
    ),
    "sample_stats_backward_underflow": (
        "the per-sample-statistics backward (Ghost BN, SN, DomainBN) formed inv_std**3, which "
        "underflows float32 for sigma above ~1e13 (input gradient 20% off at 1e15)",
        (
            Case("ghostbn", (2, 1, 1, 1, 1), f32, f32, False, True, 1e15, 0.0, 19684, True),
            Case("sn", (3, 2), f32, f32, False, True, 1e16, 0.0, 25443, True),
            Case("domainbn", (3, 2, 2, 2), f32, f32, False, True, 1e16, 0.0, 1, True),
        ),
    ),
    "switchable_eval_mixed_dtype": (
        "SN in eval with only the BN branch usable and running statistics in another dtype "
        "than the input's statistics: torch's 'mixed dtype (CPU)' without the layer's name",
        (
            Case("sn", (2, 1, 1), f64, f32, False, False, 0.1, 0.0, 18262, True),
            Case("sn", (3, 1, 1), f16, f16, False, False, 1e-15, 0.0, 47836, True),
        ),
    ),
    "switchable_half_mixture": (
        "SN with float16/bfloat16 logits mixed in that dtype: weights not summing to 1 (231.6 "
        "for beta on a constant 3000) and a NaN logits gradient without an error",
        (
            Case("sn", (2, 3, 1, 1, 1), f16, f16, True, True, 0.1, -10000.0, 7048, True),
            Case("sn", (1, 4, 2, 1), bf16, bf16, True, True, 1e-19, 1e5, 10658, True),
        ),
    ),
}


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@ROBUST
@given(data=st.data())
def test_no_silent_wrong_results(method: str, data) -> None:
    check_case(data.draw(cases(method), label="case"))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, id=f"{name}-{i}")
        for name, (_, examples) in REGRESSIONS.items()
        for i, case in enumerate(examples)
    ],
)
def test_fixed_defect_stays_fixed(case: Case) -> None:
    """Each case that showed a defect found by the property test (``REGRESSIONS`` says
    which) now passes it."""
    check_case(case)


#: Methods that compute statistics from the input in training (FrozenBN does not; torch's BN
#: passes NaN through).
FROM_INPUT = [m for m in METHODS if m not in ("bn", "frozenbn")]


@pytest.mark.parametrize("method", FROM_INPUT)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_is_an_error_naming_the_layer(method: str, bad: float) -> None:
    """A genuine NaN/Inf in a training input stays an error that names the layer (whatever
    the fix of the overflow defect changes in the finiteness checks)."""
    case = Case(method, (2, 4, 3, 3), f32, f32, True, True, 1.0, 0.0)
    layer = build(case)
    layer.train()
    x = make_input(case).clone()
    x[1, 2, 0, 1] = bad
    with warnings.catch_warnings(), pytest.raises(FloatingPointError) as error:
        warnings.simplefilter("ignore")
        forward(case, layer, x)
    assert layer.describe() in str(error.value) and BLAMES_NON_FINITE.search(str(error.value))


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("bn", "frozenbn", "mabn")])
def test_errors_name_the_path_convert_gave_the_layer(method: str) -> None:
    """Through smallbn.convert (not a hand-set name): a training batch of one value per
    channel is refused with the layer's path in the model."""
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.BatchNorm2d(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smallbn.convert(model, method).train()
        with pytest.raises(ValueError, match=r"at '1'.*(single value|more than one value)"):
            model(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("method", ["gn", "ln", "in"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_group_norms_take_a_float64_input_into_a_float32_layer(method: str, channels_last: bool):
    """torch's kernel refuses float64 inputs with float32 parameters ("mixed dtype (CPU)");
    the layers compute in float64 (the property test covers the other shapes and dtypes)."""
    check_case(Case(method, (2, 4, 3, 3), f64, f32, channels_last, True, 1.0, 3.0))


@pytest.mark.parametrize("method", ["gn", "ln", "in"])
@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_group_norms_at_1e20(method: str, dtype: torch.dtype, channels_last: bool):
    """Squared deviations of 1e20 overflow torch's float32 accumulation: it returned the
    bias alone (contiguous) or NaN (channels-last) without an error; the layers recompute
    such groups in float64."""
    check_case(Case(method, (2, 4, 3, 3), dtype, f32, channels_last, True, 1e20, -3e20))
