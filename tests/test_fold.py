"""smallbn.fold: folding eval-mode norms into the conv/linear before them keeps eval outputs."""

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import smallbn
from smallbn.experiments.models import SmallResNet
from smallbn.fold import fold, fold_with_report

BN_STYLE = ["bn", "syncbn", "brn", "ghostbn", "frozenbn", "domainbn", "shufflebn"]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial affine parameters (and, per domain, statistics) on every norm."""
    with torch.no_grad():
        for m in model.modules():
            if smallbn.is_norm_layer(m) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, smallbn.DomainBatchNorm):
                # domain 1 gets statistics of its own
                m.running_mean[1].uniform_(-1, 1)
                m.running_var[1].uniform_(0.2, 3)


def _trained_resnet(name: str, dtype: torch.dtype = torch.float32, **options: Any) -> SmallResNet:
    """A SmallResNet whose norms hold running statistics from a few training steps (as BN,
    then as ``name``, built with ``options``) and random affine parameters; in eval mode."""
    model = SmallResNet(widths=(8, 16), blocks=2).to(dtype)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 12, 12, dtype=dtype) * 2 + 0.5)
        model = smallbn.convert(model, name, **options)
        for _ in range(2):
            model(torch.randn(8, 1, 12, 12, dtype=dtype) * 1.5 - 0.3)
    _randomize_norms(model)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", BN_STYLE)
def test_folded_resnet_matches_eval_outputs(name, dtype, images):
    model = _trained_resnet(name, dtype)
    x = images.to(dtype)
    folded, report = fold_with_report(model)
    assert report.method == "fx" and report.kept == ()
    assert len(report.folded) == sum(smallbn.is_norm_layer(m) for m in model.modules())
    # every norm had a producer, so none is left
    assert not any(smallbn.is_norm_layer(m) for m in folded.modules())
    with torch.inference_mode():
        assert _relative_error(folded(x), model(x)) < TOLERANCE[dtype]


@pytest.mark.parametrize("per_domain_affine", [False, True], ids=["shared", "per_domain"])
def test_domain_bn_folds_the_active_domain(images, per_domain_affine):
    """The active domain's statistics and, with per_domain_affine, its γ, β rows."""
    model = _trained_resnet("domainbn", per_domain_affine=per_domain_affine)
    if per_domain_affine:
        norm = model.stem_norm
        assert norm.weight.shape == (2, 8) and not torch.equal(norm.weight[0], norm.weight[1])
        with torch.no_grad():  # the same statistics: only the affine tells the domains apart
            for m in model.modules():
                if isinstance(m, smallbn.DomainBatchNorm):
                    m.running_mean[1] = m.running_mean[0]
                    m.running_var[1] = m.running_var[0]
    with smallbn.use_domain(model, 1), torch.inference_mode():
        expected = model(images)
        folded = fold(model)
    with torch.inference_mode():
        assert _relative_error(folded(images), expected) < 1e-5
        assert _relative_error(fold(model)(images), expected) > 1e-3  # domain 0 differs
        assert _relative_error(fold(model)(images), model(images)) < 1e-5


def test_fold_is_not_in_place_by_default(images):
    model = _trained_resnet("bn")
    state = copy.deepcopy(model.state_dict())
    folded = fold(model)
    assert folded is not model
    assert isinstance(model.stem_norm, nn.BatchNorm2d) and model.stem.bias is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert isinstance(folded.stem_norm, nn.Identity) and folded.stem.bias is not None
    assert not folded.stem_norm.training  # the folded model is in eval mode throughout

    same = fold(model, inplace=True)
    assert same is model and isinstance(model.stem_norm, nn.Identity)


def _randomized(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.2, 3)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


LAYERS: list[tuple[str, Callable[[bool], nn.Module], Callable[[], nn.Module], tuple[int, ...]]] = [
    ("conv1d", lambda b: nn.Conv1d(4, 6, 3, bias=b), lambda: nn.BatchNorm1d(6), (5, 4, 9)),
    (
        "conv2d-g2",
        lambda b: nn.Conv2d(4, 6, 3, groups=2, bias=b),
        lambda: nn.BatchNorm2d(6),
        (5, 4, 7, 7),
    ),
    ("conv3d", lambda b: nn.Conv3d(4, 6, 3, bias=b), lambda: nn.BatchNorm3d(6), (3, 4, 5, 5, 5)),
    (
        "convtranspose1d-g2",
        lambda b: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2, bias=b),
        lambda: nn.BatchNorm1d(6),
        (5, 4, 9),
    ),
    (
        "convtranspose2d-g2",
        lambda b: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=b),
        lambda: nn.BatchNorm2d(6),
        (5, 4, 6, 6),
    ),
    (
        "convtranspose3d-g2",
        lambda b: nn.ConvTranspose3d(4, 6, 2, groups=2, bias=b),
        lambda: nn.BatchNorm3d(6),
        (3, 4, 4, 4, 4),
    ),
    ("linear", lambda b: nn.Linear(4, 6, bias=b), lambda: nn.BatchNorm1d(6), (5, 4)),
    (
        "linear-syncbn",
        lambda b: nn.Linear(4, 6, bias=b),
        lambda: smallbn.SyncBatchNorm(6),
        (5, 4),
    ),
    (
        "conv2d-torch-syncbn",
        lambda b: nn.Conv2d(4, 6, 3, bias=b),
        lambda: nn.SyncBatchNorm(6),
        (5, 4, 7, 7),
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    ("producer", "norm", "shape"),
    [entry[1:] for entry in LAYERS],
    ids=[entry[0] for entry in LAYERS],
)
def test_each_producer_type_folds_exactly(producer, norm, shape, bias, dtype):
    model = nn.Sequential(producer(bias), _randomized(norm()), nn.ReLU()).to(dtype).eval()
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    folded, report = fold_with_report(model)
    assert [(f.norm, f.producer) for f in report.folded] == [("1", "0")]
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert folded[0].bias.requires_grad and folded[0].bias.dtype == dtype
    with torch.inference_mode():
        assert _relative_error(folded(x), model(x)) < TOLERANCE[dtype]


def test_norm_without_affine_parameters_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.2, 3)
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        assert _relative_error(fold(model)(x), model(x)) < 1e-5


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = _randomized(nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        return self.bn(z) + z  # z is read twice: rewriting the conv would change the sum


def test_norm_whose_producer_output_is_used_twice_is_not_folded():
    model = _Residual().eval()
    x = torch.randn(2, 4, 5, 5)
    folded, report = fold_with_report(model)
    assert report.folded == ()
    assert [k.norm for k in report.kept] == ["bn"] and "also used" in report.kept[0].reason
    assert isinstance(folded.bn, nn.BatchNorm2d) and folded.conv.bias is not None
    torch.testing.assert_close(folded.conv.weight, model.conv.weight, rtol=0, atol=0)
    with torch.inference_mode():
        assert torch.equal(folded(x), model(x))


@pytest.mark.parametrize("name", ["gn", "ln", "in"])
def test_batch_independent_norms_are_left_unchanged(name, images):
    model = smallbn.convert(SmallResNet(widths=(8, 16)), name)
    _randomize_norms(model)
    model.eval()
    folded, report = fold_with_report(model)
    assert report.folded == ()
    assert len(report.kept) == sum(smallbn.is_norm_layer(m) for m in model.modules())
    assert all("not a per-channel affine map" in k.reason for k in report.kept)
    assert folded.state_dict().keys() == model.state_dict().keys()
    with torch.inference_mode():
        assert torch.equal(folded(images), model(images))


def test_torch_group_norm_model_is_left_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU()).eval()
    folded, report = fold_with_report(model)
    assert report.folded == () and report.kept == ()
    assert isinstance(folded[1], nn.GroupNorm) and folded[0].bias is not None
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        assert torch.equal(folded(x), model(x))


def test_training_mode_is_refused():
    model = SmallResNet(widths=(8, 16))
    with pytest.raises(ValueError, match=r"training mode.*'<root>'.*call model\.eval\(\)"):
        fold(model)
    model.eval()
    model.stages[0].bn1.train()
    with pytest.raises(ValueError, match=r"1 module\(s\).*'stages\.0\.bn1'"):
        fold(model)


def test_norms_that_cannot_fold_stay_and_say_why():
    tied = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1),
        nn.BatchNorm2d(3, track_running_stats=False),  # batch statistics in eval mode too
        tied,
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 3, 1),
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 3, 1),
        nn.BatchNorm2d(3),
    ).eval()
    model[4].weight = tied.weight  # tied weights: rescaling them would change both convs
    hooked = model[6].register_forward_hook(lambda module, args, out: None)
    folded, report = fold_with_report(model)
    reasons = {k.norm: k.reason for k in report.kept}
    assert "track_running_stats=False" in reasons["1"]
    assert "shared with another module" in reasons["3"] and "shared" in reasons["5"]
    assert "forward hooks" in reasons["7"]
    assert report.folded == ()
    hooked.remove()
    assert [f.norm for f in fold_with_report(model)[1].folded] == ["7"]
    x = torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        assert torch.equal(folded(x), model(x))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), _randomized(nn.BatchNorm2d(4)), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = _randomized(nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(x)
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = x * 2
        return self.bn(self.conv(x))


def test_untraceable_model_folds_within_traceable_submodules_and_warns():
    model = _Untraceable().eval()
    with pytest.warns(UserWarning, match=r"could not trace.*submodules.*1 norm\(s\) stay"):
        folded, report = fold_with_report(model)
    assert report.method == "submodules" and report.trace_error
    assert [(f.norm, f.producer) for f in report.folded] == [("body.1", "body.0")]
    assert [k.norm for k in report.kept] == ["bn"]
    x = torch.randn(3, 3, 6, 6)
    with torch.inference_mode():
        assert _relative_error(folded(x), model(x)) < 1e-5


class _ChildrenCalledOutside(nn.Module):
    """Untraceable, and it calls its Sequential's children one by one with an operation in
    between, which the sequential fallback cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), _randomized(nn.BatchNorm2d(4)))

    def forward(self, x: Tensor) -> Tensor:
        z = self.stem[0](x)
        if z.sum() != 12345.0:  # data-dependent control flow: fx cannot trace this
            z = z * 0.5
        return self.stem[1](z)


def test_untraceable_model_warns_even_when_every_norm_folds():
    """The submodule search pairs by the Sequential's forward; here that pairing is wrong
    although nothing is kept, so the warning must not depend on a norm staying in place."""
    model = _ChildrenCalledOutside().eval()
    with pytest.warns(
        UserWarning,
        match=r"could not trace.*every norm found was folded.*outside that forward",
    ):
        folded, report = fold_with_report(model)
    assert report.method == "submodules" and report.kept == ()
    assert [(f.norm, f.producer) for f in report.folded] == [("stem.1", "stem.0")]
    with pytest.warns(UserWarning, match="outside that forward"):
        fold(model)


def test_folding_a_folded_model_changes_nothing(images):
    folded = fold(_trained_resnet("bn"))
    again, report = fold_with_report(folded)
    assert report.folded == () and report.kept == ()
    with torch.inference_mode():
        assert torch.equal(again(images), folded(images))


def test_fold_mabn_bakes_centred_convs():
    import smallbn
    from smallbn.experiments.models import SmallResNet

    torch.manual_seed(0)
    model = smallbn.convert(SmallResNet(10, 1, (8, 16)), "mabn", warmup=2, clamp_start=3)
    for _ in range(4):
        model(torch.randn(4, 1, 12, 12)).sum().backward()
    model.eval()
    x = torch.randn(3, 1, 12, 12)
    folded, report = smallbn.fold_with_report(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(
        isinstance(m, (smallbn.MovingAverageBatchNorm, smallbn.CenteredConv2d))
        for m in folded.modules()
    )
    assert len(report.folded) == sum(
        isinstance(m, smallbn.MovingAverageBatchNorm) for m in model.modules()
    )
