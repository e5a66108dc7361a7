"""Domain-specific BN: BN per domain against the float64 reference (an int domain, per-sample
domain ids, absent domains), BN checkpoints broadcast to every domain, use_domain, errors, the
checks of tensor ids deferred where reading them would synchronize (CUDA, compiled graphs),
and a separate affine per domain (per_domain_affine=True: γ_d, β_d against the reference and
the formula, zero gradient for absent domains, eval_affine, checkpoints, the default kept)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import smallbn
from _host_reads import count_host_reads
from _layer_checks import (
    BN_STATE_KEYS,
    SHAPES,
    TORCH_BN,
    cases,
    check_step,
    close,
    make_input,
    randomize_affine,
    run_case,
    shape_id,
    upstream,
)
from reference import RefDomainBatchNorm
from smallbn import (
    DomainBatchNorm,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    DomainBatchNorm3d,
    use_domain,
)

DOMAIN = {2: DomainBatchNorm1d, 3: DomainBatchNorm1d, 4: DomainBatchNorm2d, 5: DomainBatchNorm3d}


def lockstep(layer, ref, shape, schedule, seed=0):
    """Train both on ``schedule`` (a list of domains args: int or per-sample list), then
    evaluate on every domain; compares outputs, gradients and per-domain running stats."""
    gen = torch.Generator().manual_seed(seed)
    params = [("weight", layer.weight, ref.weight), ("bias", layer.bias, ref.bias)]

    def compare(domains, x, reference):  # domains: an int or a per-sample list
        arg = domains if isinstance(domains, int) else torch.tensor(domains)
        g = upstream(shape, gen)
        check_step(
            lambda u: layer(u, domain=arg), lambda u: reference(u, domains), x, g, 1e-6, params
        )

    for step, domains in enumerate(schedule):
        compare(
            domains,
            make_input(shape, seed + step, loc=float(step), scale=1.0 + step),
            ref.train_step,
        )
        for name in ("running_mean", "running_var"):
            expected = torch.stack(getattr(ref, name))
            close(getattr(layer, name), expected, 1e-6, f"{name} after step {step}")
    layer.eval()
    per_sample = [n % layer.num_domains for n in range(shape[0])]
    for domains in [*range(layer.num_domains), per_sample]:
        compare(domains, make_input(shape, seed + 77, loc=0.5), ref.eval)


@pytest.mark.parametrize("per_domain_affine", [False, True])
def test_inference_with_one_domain_equals_per_sample_ids(per_domain_affine):
    """Inference with an int domain (torch's fused kernel) equals the per-sample path."""
    torch.manual_seed(0)
    layer = DomainBatchNorm2d(3, num_domains=2, per_domain_affine=per_domain_affine)
    if per_domain_affine:
        randomize_domain_affine(layer, 3)
    for domain in (0, 1, 1):
        layer(torch.randn(4, 3, 5, 5) * (domain + 1) + domain, domain=domain)
    layer.eval()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        for domain in (0, 1):
            torch.testing.assert_close(
                layer(x, domain=domain), layer(x, domain=torch.full((4,), domain))
            )
        assert not torch.allclose(layer(x, domain=0), layer(x, domain=1))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_int_domain_matches_reference(shape):
    layer = DOMAIN[len(shape)](shape[1], num_domains=3, momentum=0.2, dtype=torch.float64)
    weight, bias = randomize_affine(layer, 1)
    ref = RefDomainBatchNorm(shape[1], 3, momentum=0.2, weight=weight, bias=bias)
    lockstep(layer, ref, shape, [0, 2, 2, 0])  # domain 1 never seen: keeps its initial stats
    assert (layer.running_mean[1] == 0).all() and (layer.running_var[1] == 1).all()


@pytest.mark.parametrize(
    "shape, schedule",
    [
        ((6, 3), [[0, 1, 1, 0, 2, 2], [2, 2, 2, 1, 1, 1]]),
        ((5, 2, 4), [[0, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 2, 0, 2, 2]]),
        ((4, 3, 2, 3), [[2, 0, 0, 2], [0, 1, 2, 0]]),  # single samples with spatial dims
        ((3, 2, 2, 2, 2), [[1, 0, 1], [0, 0, 0]]),
    ],
    ids=str,
)
def test_per_sample_domains_match_reference(shape, schedule):
    layer = DOMAIN[len(shape)](shape[1], num_domains=3, momentum=0.1, dtype=torch.float64)
    weight, bias = randomize_affine(layer, 2)
    ref = RefDomainBatchNorm(shape[1], 3, momentum=0.1, weight=weight, bias=bias)
    lockstep(layer, ref, shape, schedule)


def test_one_domain_is_batchnorm():
    shape = (4, 3, 5, 5)
    layer = DomainBatchNorm2d(3, num_domains=1, dtype=torch.float64)
    bn = TORCH_BN[4](3, dtype=torch.float64)
    for step in range(3):
        x = make_input(shape, step, loc=step)
        torch.testing.assert_close(layer(x), bn(x))
    torch.testing.assert_close(layer.running_var[0], bn.running_var)
    layer.eval()
    bn.eval()
    x = make_input(shape, 9)
    torch.testing.assert_close(layer(x), bn(x))


@given(cases(), st.integers(1, 3), st.booleans(), st.data())
def test_matches_reference_over_shapes_and_dtypes(case, num_domains, per_domain_affine, data):
    """One affine shared by the domains or one per domain; per-sample ids, or an int domain
    (the fused path) where the batch is one domain."""
    n = case.shape[0]
    # any ids where every sample has >= 2 values (each then spans both signs of
    # conditioned_input); one domain for the whole batch otherwise
    if case.values_per_sample >= 2:
        ids = data.draw(st.lists(st.integers(0, num_domains - 1), min_size=n, max_size=n))
    else:
        ids = data.draw(st.sampled_from([[0] * n, [num_domains - 1] * n]))
    as_int = data.draw(st.booleans()) and len(set(ids)) == 1
    domain: int | Tensor = ids[0] if as_int else torch.tensor(ids)
    layer = DomainBatchNorm(
        case.shape[1],
        num_domains=num_domains,
        momentum=0.3,
        per_domain_affine=per_domain_affine,
        dtype=case.param_dtype,
    )
    randomize = randomize_domain_affine if per_domain_affine else randomize_affine
    weight, bias = randomize(layer, case.seed)
    ref = RefDomainBatchNorm(case.shape[1], num_domains, momentum=0.3, weight=weight, bias=bias)
    run_case(
        layer,
        ref,
        case,
        steps=2,
        layer_call=lambda m, x, step: m(x, domain=domain),
        ref_train=lambda r, x, step: r.train_step(x, ids),
        ref_eval=lambda r, x: r.eval(x, ids),
    )


def test_bn_checkpoint_loads_into_every_domain():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.num_batches_tracked.fill_(11)
    layer = DomainBatchNorm2d(4, num_domains=3)
    layer.load_state_dict(bn.state_dict(), strict=True)
    assert list(layer.state_dict().keys()) == BN_STATE_KEYS
    assert layer.running_mean.shape == layer.running_var.shape == (3, 4)
    for d in range(3):
        torch.testing.assert_close(layer.running_mean[d], bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(layer.running_var[d], bn.running_var, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight, bn.weight, rtol=0, atol=0)
    assert int(layer.num_batches_tracked) == 11
    # and every domain then normalizes as the BN did
    layer.eval()
    bn.eval()
    x = torch.randn(2, 4, 3, 3)
    for d in range(3):
        torch.testing.assert_close(layer(x, domain=d), bn(x))
    # its own checkpoint round-trips
    again = DomainBatchNorm2d(4, num_domains=3)
    again.load_state_dict(layer.state_dict(), strict=True)
    torch.testing.assert_close(again.running_var, layer.running_var, rtol=0, atol=0)


def test_use_domain_switches_no_layer_when_one_lacks_the_domain():
    model = nn.Sequential(DomainBatchNorm1d(3, num_domains=4), DomainBatchNorm1d(3, num_domains=2))
    with pytest.raises(ValueError, match=r"domain 3 not in \[0, 2\)"):
        with use_domain(model, 3):
            pass
    assert [m.active_domain for m in model] == [0, 0]


def test_use_domain_selects_the_domain_for_a_whole_model_and_restores_it():
    model = nn.Sequential(
        DomainBatchNorm1d(3, num_domains=3), nn.ReLU(), DomainBatchNorm1d(3, num_domains=3)
    )
    model.eval()
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.running_mean.copy_(torch.arange(3.0)[:, None].expand(3, 3))
    x = torch.randn(4, 3)
    with use_domain(model, 2) as same:
        assert same is model
        assert model[0].active_domain == model[2].active_domain == 2
        y = model(x)
    assert model[0].active_domain == model[2].active_domain == 0
    torch.testing.assert_close(y, model[2](torch.relu(model[0](x, domain=2)), domain=2))
    assert not torch.allclose(y, model(x))
    # restored also when the block raises
    with pytest.raises(KeyError):
        with use_domain(model, 1):
            raise KeyError("boom")
    assert model[0].active_domain == 0
    # training in the block updates the chosen domain only
    model.train()
    with use_domain(model, 1):
        model(torch.randn(8, 3) + 5)
    assert (model[0].running_mean[1] > 0.3).all()
    torch.testing.assert_close(model[0].running_mean[[0, 2]], torch.tensor([[0.0] * 3, [2.0] * 3]))


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain", [3, -1, torch.tensor([0, 1, 3, 0]), torch.tensor([0, -1, 0, 0])], ids=str
)
def test_rejects_out_of_range_domain(domain):
    layer = DomainBatchNorm1d(2, num_domains=3)
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(
            ValueError,
            match=r"DomainBatchNorm1d\(2\): domain ids must lie in \[0, 3\), got .*larger "
            r"num_domains",
        ):
            layer(torch.randn(4, 2), domain=domain)
    assert int(layer.num_batches_tracked) == 0


def test_rejects_wrong_number_of_domain_ids_and_bad_use_domain():
    layer = DomainBatchNorm1d(2, num_domains=2)
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm1d\(2\): got 3 domain ids for a batch of 4 samples; pass one id per "
        r"sample",
    ):
        layer(torch.randn(4, 2), domain=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"DomainBatchNorm1d\(2\): domain 5 not in \[0, 2\)"):
        with use_domain(layer, 5):
            pass
    assert layer.active_domain == 0


@pytest.mark.parametrize(
    "domain",
    [
        1,
        np.int64(1),
        torch.tensor(1),
        torch.tensor(1, dtype=torch.uint8),
        torch.tensor([1, 1, 1, 1], dtype=torch.int32),
        torch.tensor([1, 1, 1, 1]),
    ],
    ids=repr,
)
def test_accepts_integer_domain_ids(domain):
    """A Python or NumPy int and a 0-dim integer tensor choose one domain for the batch; a 1-D
    integer tensor of any integer dtype gives one id per sample (before the fix a 0-dim tensor
    was taken for one per-sample id and refused for a batch of 4)."""
    x = torch.randn(4, 2, 3)
    for mode in (True, False):
        layer, reference = DomainBatchNorm1d(2, num_domains=3), DomainBatchNorm1d(2, num_domains=3)
        layer.train(mode)
        reference.train(mode)
        torch.testing.assert_close(layer(x, domain=domain), reference(x, domain=1))
        torch.testing.assert_close(layer.running_mean, reference.running_mean)
        assert (layer.running_mean[[0, 2]] == 0).all()


_FLOAT_IDS = "domain ids must be integers"


_BAD_IDS = [
    (1.9, TypeError, rf"{_FLOAT_IDS}, got the float 1.9.*truncate.*domain=int\(d\)"),
    (1.0, TypeError, rf"{_FLOAT_IDS}, got the float 1.0"),
    (np.float32(1.0), TypeError, rf"{_FLOAT_IDS}, got the float 1.0"),
    (True, TypeError, r"got the bool True.*a Python bool is not a domain index"),
    (np.bool_(True), TypeError, r"got the bool True"),
    ("1", TypeError, r"got a str"),
    ([0, 1, 0, 1], TypeError, r"got a list.*torch.tensor\(ids\)"),
    (torch.tensor(1.0), TypeError, rf"{_FLOAT_IDS}, got a torch.float32 tensor.*ids.long\(\)"),
    (torch.tensor([0.0, 1.9, 0.0, 1.0]), TypeError, r"got a torch.float32 tensor"),
    (torch.tensor([0, 1, 0, 1], dtype=torch.float64), TypeError, r"got a torch.float64 tensor"),
    (torch.tensor([True, False, True, False]), TypeError, r"got a torch.bool tensor.*mask"),
    (
        torch.tensor([[0], [1], [0], [1]]),
        ValueError,
        r"1-D tensor of one id per sample.*got a tensor of shape \(4, 1\).*ids.flatten\(\)",
    ),
    (torch.zeros(1, 4, dtype=torch.long), ValueError, r"got a tensor of shape \(1, 4\)"),
]


@pytest.mark.parametrize(
    ("domain", "error", "message"),
    _BAD_IDS,
    ids=[repr(case[0]).replace("\n", "").replace(" ", "") for case in _BAD_IDS],
)
def test_rejects_float_bool_and_2d_domain_ids(domain, error, message):
    """Before the fix 1.9 was truncated to domain 1, bools were domains 0/1, float and bool
    tensors were cast to ids and a 2-D tensor was flattened: every one now raises, in
    training, evaluation and the population pass, naming the layer and the fix; the layer is
    unchanged."""
    layer = DomainBatchNorm1d(2, num_domains=3)
    x = torch.randn(4, 2, 3)
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(error, match=r"^DomainBatchNorm1d\(2\): .*" + message):
            layer(x, domain=domain)
    with pytest.raises(error, match=message):
        layer.population_moments(x, domain)
    assert int(layer.num_batches_tracked) == 0 and (layer.running_mean == 0).all()
    layer.active_domain = domain  # set directly instead of through use_domain
    with pytest.raises(error, match=message):
        layer(x)


@pytest.mark.parametrize("domain", [1.0, True, torch.tensor([0, 1, 0, 1])], ids=repr)
def test_use_domain_rejects_anything_but_one_int(domain):
    model = nn.Sequential(DomainBatchNorm1d(3, num_domains=3))
    with pytest.raises(
        TypeError,
        match=r"DomainBatchNorm1d\(3\): (domain ids must be integers|use_domain takes one int)",
    ):
        with use_domain(model, domain):
            pass
    assert model[0].active_domain == 0
    with use_domain(model, np.int64(2)):  # a NumPy int is an int
        assert model[0].active_domain == 2


def test_rejects_a_domain_with_one_value_in_training():
    layer = DomainBatchNorm1d(2, num_domains=2)
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm1d\(2\): training needs more than one value per channel.*domain "
        r"\[1\].*larger batch",
    ):
        layer(torch.randn(4, 2), domain=torch.tensor([0, 0, 0, 1]))
    assert int(layer.num_batches_tracked) == 0 and (layer.running_var == 1).all()


def test_rejects_wrong_rank_channels_and_non_finite_input():
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm3d\(2\): expected a \(N, C, D, H, W\) input, got a 4D "
        r"tensor.*DomainBatchNorm2d for \(N, C, H, W\)",
    ):
        DomainBatchNorm3d(2)(torch.randn(2, 2, 3, 3))
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm2d\(2\): expected 2 channels in dim 1, got 3",
    ):
        DomainBatchNorm2d(2)(torch.randn(2, 3, 3, 3))
    x = torch.randn(4, 2, 3)
    x[3, 0, 0] = float("nan")
    layer = DomainBatchNorm1d(2)
    with pytest.raises(
        FloatingPointError,
        match=r"DomainBatchNorm1d\(2\): batch statistics are NaN or Inf in channel\(s\) \[0\]",
    ):
        layer(x, domain=torch.tensor([0, 0, 1, 1]))
    assert int(layer.num_batches_tracked) == 0 and (layer.running_mean == 0).all()


def test_rejects_incompatible_checkpoint():
    with pytest.raises(
        RuntimeError,
        match=r"DomainBatchNorm2d\(8\): incompatible checkpoint.*\(2, 8\)",
    ):
        DomainBatchNorm2d(8).load_state_dict(nn.BatchNorm2d(16).state_dict())
    with pytest.raises(RuntimeError, match=r"DomainBatchNorm2d\(4\): incompatible checkpoint"):
        DomainBatchNorm2d(4, num_domains=3).load_state_dict(
            DomainBatchNorm2d(4, num_domains=2).state_dict()
        )


def test_incompatible_checkpoint_names_what_differs():
    """Before the fix another num_domains was reported as a channel mismatch ("build it with
    the checkpoint's num_features")."""
    with pytest.raises(RuntimeError) as info:
        DomainBatchNorm2d(4, num_domains=3).load_state_dict(
            DomainBatchNorm2d(4, num_domains=2).state_dict()
        )
    message = str(info.value)
    assert "DomainBatchNorm2d(4): incompatible checkpoint" in message
    assert "num_domains: the checkpoint has 2 domains, this layer 3" in message
    assert "Build the layer with num_domains=2, or load a checkpoint made for this model" in message
    assert "num_features" not in message
    with pytest.raises(
        RuntimeError,
        match=r"num_domains: the checkpoint has 2 domains, this layer 3; num_features: the "
        r"checkpoint has 8 channels, this layer 4\. Build the layer with num_domains=2 and "
        r"num_features=8",
    ):
        DomainBatchNorm2d(4, num_domains=3).load_state_dict(
            DomainBatchNorm2d(8, num_domains=2).state_dict()
        )
    with pytest.raises(
        RuntimeError,
        match=r"differs in num_features: the checkpoint has 8 channels, this layer 4\.",
    ) as info:
        DomainBatchNorm2d(4, num_domains=3).load_state_dict(
            DomainBatchNorm2d(8, num_domains=3).state_dict()
        )
    assert "num_domains" not in str(info.value)


def test_rejects_bad_constructor_args():
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d: num_domains must be >= 1, got 0"):
        DomainBatchNorm2d(4, num_domains=0)
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm2d: momentum=None .* not supported .*pass a momentum",
    ):
        DomainBatchNorm2d(4, momentum=None)
    with pytest.raises(ValueError, match=r"DomainBatchNorm2d: momentum .* must lie in \[0, 1\]"):
        DomainBatchNorm2d(4, momentum=1.5)


# -- deferred checks of tensor ids (CUDA, compiled graphs) --------------------------------------


@pytest.fixture
def off_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The layer behaves as on CUDA: checks of tensor ids' values are deferred (the finite
    check too)."""
    monkeypatch.setattr(DomainBatchNorm, "_checks_on_host", lambda self, x: False)
    old = smallbn.set_finite_check("deferred")
    yield
    smallbn.set_finite_check(old)


def test_deferred_steps_with_tensor_ids_read_nothing_back(off_cpu: None) -> None:
    layer = DomainBatchNorm2d(3, num_domains=3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    ids = torch.tensor([0, 2, 2, 0])

    def training() -> None:
        layer(x, ids).square().sum().backward()
        layer(x, torch.tensor(1)).sum().backward()

    def evaluation() -> None:
        with torch.no_grad():
            layer(x, ids)

    assert count_host_reads(training) == []
    layer.eval()  # reads the deferred flag: between the steps
    assert count_host_reads(evaluation) == []


def test_deferred_one_value_domain_raises_on_eval_naming_the_call(off_cpu: None) -> None:
    """Where the ids are not read per step, a domain with one value per channel is recorded
    (the step normalizes it to β, as a zero variance gives) and raised when the deferred
    flag is read: here by eval(), with the same ValueError as the immediate check."""
    layer = DomainBatchNorm1d(2, num_domains=2)
    layer(torch.randn(4, 2), domain=torch.tensor([0, 0, 1, 1]))
    layer(torch.randn(4, 2), domain=torch.tensor([0, 0, 0, 1]))  # domain 1 has one value
    layer(torch.randn(4, 2), domain=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm1d\(2\): training call 2 of this layer had a domain present in "
        r"the batch with a single value per channel.*deferred check",
    ):
        layer.eval()


def test_deferred_out_of_range_ids_are_clamped_and_reported(off_cpu: None) -> None:
    """An id outside [0, num_domains) cannot index out of bounds (a device-side assert on
    CUDA): the step uses it clamped into range, and check_finite reports it."""
    layer, clamped = DomainBatchNorm1d(2, num_domains=3), DomainBatchNorm1d(2, num_domains=3)
    x = torch.randn(4, 2, 3)
    y = layer(x, domain=torch.tensor([0, 5, -1, 2]))
    torch.testing.assert_close(y, clamped(x, domain=torch.tensor([0, 2, 0, 2])))
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm1d\(2\): training call 1 of this layer had domain ids outside "
        r"\[0, 3\)",
    ):
        smallbn.check_finite(layer)


def test_deferred_out_of_range_ids_in_eval_are_reported(off_cpu: None) -> None:
    layer = DomainBatchNorm1d(2, num_domains=3)
    layer(torch.randn(4, 2, 3), domain=torch.tensor([0, 1, 1, 0]))
    layer.eval()
    layer(torch.randn(4, 2, 3), domain=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(
        ValueError, match=r"an evaluation call after training call 1 of this layer had domain ids"
    ):
        smallbn.check_finite(layer)


def test_deferred_non_finite_statistics_with_tensor_ids(off_cpu: None) -> None:
    layer = DomainBatchNorm1d(2, num_domains=2)
    x = torch.randn(4, 2, 3)
    x[3, 0, 0] = float("nan")
    layer(x, domain=torch.tensor([0, 0, 1, 1]))
    with pytest.raises(
        FloatingPointError,
        match=r"DomainBatchNorm1d\(2\): batch statistics were NaN or Inf in "
        r"training call 1",
    ):
        smallbn.check_finite(layer)


# -- a separate affine per domain (per_domain_affine=True) --------------------------------------


def randomize_domain_affine(layer: DomainBatchNorm, seed: int) -> tuple[Tensor, Tensor]:
    """Distinct random γ_d, β_d rows for every domain of a per-domain-affine layer; returns
    float64 copies of what the layer holds (after rounding to its dtype)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (layer.num_domains, layer.num_features)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
    return layer.weight.detach().double(), layer.bias.detach().double()


def per_domain_formula(
    x: Tensor,
    ids: list[int],
    means: Tensor,
    variances: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """``y_n = γ_{d(n)} (x_n − μ_{d(n)}) / sqrt(σ²_{d(n)} + eps) + β_{d(n)}`` in float64,
    sample by sample, with ``(D, C)`` statistics and affine."""
    rows = []
    for n, d in enumerate(ids):
        view = (-1, *([1] * (x.dim() - 2)))
        xhat = (x[n].double() - means[d].reshape(view)) / torch.sqrt(variances[d] + eps).reshape(
            view
        )
        rows.append(weight[d].reshape(view) * xhat + bias[d].reshape(view))
    return torch.stack(rows)


def test_default_affine_stays_shared():
    """Without the option nothing changes: BN's (C,) γ, β, BN's state_dict keys, the repr."""
    layer = DomainBatchNorm2d(4, num_domains=3)
    assert layer.per_domain_affine is False
    assert list(layer.state_dict()) == BN_STATE_KEYS
    assert layer.state_dict()["weight"].shape == layer.state_dict()["bias"].shape == (4,)
    assert layer.state_dict()["running_mean"].shape == (3, 4)
    assert "per_domain_affine" not in repr(layer)
    assert DomainBatchNorm2d(4, num_domains=3, per_domain_affine=False).weight.shape == (4,)


def test_per_domain_affine_parameters_and_reset():
    layer = DomainBatchNorm2d(4, num_domains=3, per_domain_affine=True, dtype=torch.float64)
    assert isinstance(layer.weight, nn.Parameter) and isinstance(layer.bias, nn.Parameter)
    assert layer.weight.shape == layer.bias.shape == (3, 4)
    assert layer.weight.dtype == torch.float64
    assert (layer.weight == 1).all() and (layer.bias == 0).all()
    assert list(layer.state_dict()) == BN_STATE_KEYS  # BN's names, per-domain shapes
    randomize_domain_affine(layer, 0)
    layer.reset_parameters()
    assert (layer.weight == 1).all() and (layer.bias == 0).all()
    assert "num_domains=3, per_domain_affine=True" in repr(layer)
    no_bias = DomainBatchNorm1d(4, num_domains=2, per_domain_affine=True, bias=False)
    assert no_bias.weight.shape == (2, 4) and no_bias.bias is None


def test_per_domain_affine_needs_affine():
    with pytest.raises(
        ValueError,
        match=r"DomainBatchNorm2d: per_domain_affine=True gives every domain its own affine "
        r"\(γ, β\), but affine=False builds the layer without one; pass affine=True",
    ):
        DomainBatchNorm2d(4, affine=False, per_domain_affine=True)


def test_build_norm_passes_per_domain_affine():
    layer = smallbn.build_norm("domainbn", 6, per_domain_affine=True, num_domains=4)
    assert type(layer) is DomainBatchNorm2d and layer.per_domain_affine
    assert layer.weight.shape == (4, 6)
    assert smallbn.build_norm("dsbn", 6, dim=1).weight.shape == (6,)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_per_domain_affine_int_domain_matches_reference(shape):
    """Output, input gradient and the (D, C) γ, β gradients against the float64 reference
    with per-domain rows, training on int domains (domain 1 never trained: its γ, β rows
    get zero gradient there), then evaluating every domain and per-sample ids."""
    layer = DOMAIN[len(shape)](
        shape[1], num_domains=3, momentum=0.2, per_domain_affine=True, dtype=torch.float64
    )
    weight, bias = randomize_domain_affine(layer, 1)
    ref = RefDomainBatchNorm(shape[1], 3, momentum=0.2, weight=weight, bias=bias)
    lockstep(layer, ref, shape, [0, 2, 2, 0])


@pytest.mark.parametrize(
    "shape, num_domains, schedule",
    [
        ((6, 3), 3, [[0, 1, 1, 0, 2, 2], [2, 2, 2, 1, 1, 1]]),
        ((5, 2, 4), 2, [[0, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]),
        ((4, 3, 2, 3), 3, [[2, 0, 0, 2], [0, 1, 2, 0]]),  # single samples with spatial dims
        ((3, 2, 2, 2, 2), 2, [[1, 0, 1], [0, 0, 0]]),
    ],
    ids=str,
)
def test_per_domain_affine_per_sample_ids_match_reference(shape, num_domains, schedule):
    layer = DOMAIN[len(shape)](
        shape[1], num_domains=num_domains, per_domain_affine=True, dtype=torch.float64
    )
    weight, bias = randomize_domain_affine(layer, 2)
    ref = RefDomainBatchNorm(shape[1], num_domains, weight=weight, bias=bias)
    lockstep(layer, ref, shape, schedule)


def test_per_domain_affine_matches_the_formula():
    """y_n = γ_{d(n)} (x_n − μ_{d(n)}) / sqrt(σ²_{d(n)} + eps) + β_{d(n)}, written out here
    from the batch statistics of each domain's samples (training) and the running ones
    (evaluation)."""
    layer = DomainBatchNorm2d(3, num_domains=3, per_domain_affine=True, dtype=torch.float64)
    weight, bias = randomize_domain_affine(layer, 5)
    x = make_input((6, 3, 4, 4), 3, loc=0.3)
    ids = [2, 0, 2, 2, 0, 0]
    means = torch.zeros(3, 3, dtype=torch.float64)
    variances = torch.ones(3, 3, dtype=torch.float64)
    for d in (0, 2):
        part = x[[n for n, i in enumerate(ids) if i == d]].transpose(0, 1).reshape(3, -1)
        means[d], variances[d] = part.mean(1), part.var(1, unbiased=False)
    close(
        layer(x, torch.tensor(ids)),
        per_domain_formula(x, ids, means, variances, weight, bias),
        1e-10,
        "training output",
    )
    layer.eval()
    with torch.no_grad():
        expected = per_domain_formula(x, ids, layer.running_mean, layer.running_var, weight, bias)
        close(layer(x, torch.tensor(ids)), expected, 1e-10, "eval output, tensor ids")
        for d in range(3):
            expected = per_domain_formula(
                x, [d] * 6, layer.running_mean, layer.running_var, weight, bias
            )
            close(layer(x, d), expected, 1e-10, f"eval output, domain {d}")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_per_domain_affine_absent_domains_get_zero_gradient(bias, train):
    """γ_d, β_d get gradient from the samples of domain d only: the rows of domains absent
    from the batch stay exactly zero, those present do not."""
    layer = DomainBatchNorm2d(3, num_domains=4, per_domain_affine=True, bias=bias)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    layer.train(train)
    x = torch.randn(6, 3, 3, 3)
    g = torch.randn(6, 3, 3, 3)
    for domain, present in [(torch.tensor([0, 2, 2, 0, 0, 2]), [0, 2]), (1, [1])]:
        layer.zero_grad()
        (layer(x, domain) * g).sum().backward()
        params = [layer.weight] + ([layer.bias] if bias else [])
        for param in params:
            assert param.grad is not None and param.grad.shape == (4, 3)
            for d in range(4):
                row = param.grad[d]
                if d in present:
                    assert row.abs().sum() > 0, (d, row)
                else:
                    assert (row == 0).all(), (d, row)


def test_per_domain_affine_eval_affine_is_the_active_domains():
    """eval_affine (what smallbn.fold folds) uses the active domain's statistics and γ, β
    rows: scale·x + shift equals the layer's eval output on that domain."""
    layer = DomainBatchNorm2d(3, num_domains=3, per_domain_affine=True, dtype=torch.float64)
    weight, bias = randomize_domain_affine(layer, 4)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.2, 3)
    layer.eval()
    x = make_input((2, 3, 4, 4), 8)
    scales = []
    for d in range(3):
        with use_domain(layer, d):
            scale, shift = layer.eval_affine()
            inv_std = torch.rsqrt(layer.running_var[d] + layer.eps)
            close(scale, weight[d] * inv_std, 1e-12, f"scale of domain {d}")
            close(shift, bias[d] - layer.running_mean[d] * weight[d] * inv_std, 1e-12, "shift")
            with torch.no_grad():
                folded = x * scale.reshape(1, 3, 1, 1) + shift.reshape(1, 3, 1, 1)
                close(folded, layer(x), 1e-12, f"eval output of domain {d}")
            scales.append(scale)
    assert not torch.allclose(scales[0], scales[1])


def test_per_domain_affine_loads_bn_and_shared_checkpoints_into_every_domain():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    layer = DomainBatchNorm2d(4, num_domains=3, per_domain_affine=True)
    layer.load_state_dict(bn.state_dict(), strict=True)
    assert layer.weight.shape == layer.bias.shape == (3, 4)
    for d in range(3):
        torch.testing.assert_close(layer.weight[d], bn.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.bias[d], bn.bias, rtol=0, atol=0)
    layer.eval()
    bn.eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        for d in range(3):
            torch.testing.assert_close(layer(x, domain=d), bn(x))
    # a shared-affine domain BN's checkpoint: its (C,) γ, β to every domain as well
    shared = DomainBatchNorm2d(4, num_domains=3)
    with torch.no_grad():
        shared.weight.normal_()
        shared.running_mean.normal_()
    layer.load_state_dict(shared.state_dict(), strict=True)
    torch.testing.assert_close(layer.weight, shared.weight.expand(3, 4), rtol=0, atol=0)
    torch.testing.assert_close(layer.running_mean, shared.running_mean, rtol=0, atol=0)
    # its own checkpoint round-trips, rows kept apart
    randomize_domain_affine(layer, 6)
    again = DomainBatchNorm2d(4, num_domains=3, per_domain_affine=True)
    again.load_state_dict(layer.state_dict(), strict=True)
    torch.testing.assert_close(again.weight, layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(again.bias, layer.bias, rtol=0, atol=0)
    # γ without β
    gamma_only = DomainBatchNorm2d(4, num_domains=2, per_domain_affine=True, bias=False)
    gamma_only.load_state_dict(nn.BatchNorm2d(4, bias=False).state_dict(), strict=True)


def test_per_domain_checkpoint_into_a_shared_layer_names_the_option():
    per_domain = DomainBatchNorm2d(4, num_domains=3, per_domain_affine=True)
    shared = DomainBatchNorm2d(4, num_domains=3)
    before = shared.weight.detach().clone()
    with pytest.raises(RuntimeError) as info:
        shared.load_state_dict(per_domain.state_dict())
    message = str(info.value)
    assert "DomainBatchNorm2d(4): incompatible checkpoint" in message
    assert (
        "It differs in per_domain_affine: the checkpoint has a separate affine per domain "
        "(weight of shape (3, 4)), this layer one affine shared by the domains (shape (4,)). "
        "Build the layer with per_domain_affine=True, or load a checkpoint made for this model"
    ) in message
    assert "num_domains" not in message and "num_features" not in message
    torch.testing.assert_close(shared.weight, before)
    # and with another number of domains, both options
    with pytest.raises(
        RuntimeError,
        match=r"differs in per_domain_affine: .*; num_domains: the checkpoint has 2 domains, "
        r"this layer 3\. Build the layer with per_domain_affine=True and num_domains=2",
    ):
        shared.load_state_dict(
            DomainBatchNorm2d(4, num_domains=2, per_domain_affine=True).state_dict()
        )
    # a per-domain layer meeting another number of domains: num_domains, as for statistics
    with pytest.raises(
        RuntimeError,
        match=r"differs in num_domains: the checkpoint has 2 domains, this layer 3\. "
        r"Build the layer with num_domains=2,",
    ):
        per_domain.load_state_dict(
            DomainBatchNorm2d(4, num_domains=2, per_domain_affine=True).state_dict()
        )
    # without running statistics the (D, C) affine alone tells the options apart
    untracked = DomainBatchNorm2d(4, num_domains=3, track_running_stats=False)
    with pytest.raises(RuntimeError, match=r"Build the layer with per_domain_affine=True"):
        untracked.load_state_dict(
            DomainBatchNorm2d(
                4, num_domains=3, per_domain_affine=True, track_running_stats=False
            ).state_dict()
        )


def test_per_domain_affine_deferred_steps_read_nothing_back(off_cpu: None) -> None:
    layer = DomainBatchNorm2d(3, num_domains=3, per_domain_affine=True)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)

    def training() -> None:
        layer(x, torch.tensor([0, 2, 2, 0])).square().sum().backward()
        layer(x, 1).square().sum().backward()

    assert count_host_reads(training) == []
    assert (layer.weight.grad != 0).any(dim=1).tolist() == [True, True, True]


def test_stats_recorder_refuses_a_per_domain_affine():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), DomainBatchNorm2d(4, num_domains=2, per_domain_affine=True)
    )
    with pytest.raises(
        ValueError,
        match=r"StatsRecorder: layer '1' \(DomainBatchNorm2d\) has a separate affine per domain "
        r"\(per_domain_affine=True\).*Pass layers= without it",
    ):
        smallbn.StatsRecorder(model)
    smallbn.StatsRecorder(model, layers=["0"])  # the others can still be recorded
