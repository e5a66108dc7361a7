import copy
import functools
import io
import warnings

import pytest
import torch
from torch import nn

import smallbn
from smallbn.experiments.models import SmallResNet
from smallbn.layers.norm_act import NormActivation

NAMES = [
    "bn",
    "syncbn",
    "brn",
    "ghostbn",
    "frozenbn",
    "domainbn",
    "gn",
    "ln",
    "in",
    "sn",
    "mabn",
    "cbn",
]
BN_EVAL_NAMES = ["syncbn", "brn", "ghostbn", "frozenbn", "domainbn", "cbn", "shufflebn"]
# MABN centres the convs that feed it (a different function); the round trip is exact when
# that is turned off, and a model trained with MABN keeps its centred convs when converted back.
OPTIONS = {"mabn": {"center_producer": False}}


def _pretrained_resnet(seed: int = 0) -> SmallResNet:
    """A BN ResNet whose norm layers hold non-trivial weights and running statistics."""
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=10, in_channels=1, widths=(8, 16), blocks=1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 1, 12, 12) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_reproduces_eval_outputs_exactly(name, images):
    model = _pretrained_resnet()
    expected = model(images)
    converted = smallbn.convert(copy.deepcopy(model), name, **OPTIONS.get(name, {}))
    back = smallbn.convert(converted, "bn").eval()
    assert all(type(m) is nn.BatchNorm2d for m in back.modules() if smallbn.is_norm_layer(m))
    assert torch.equal(back(images), expected)
    assert back.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", BN_EVAL_NAMES)
def test_converted_eval_outputs_equal_bn(name, images):
    model = _pretrained_resnet()
    converted = smallbn.convert(copy.deepcopy(model), name).eval()
    torch.testing.assert_close(converted(images), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_bn_state_dict_loads_into_converted_model(name, images):
    pretrained = _pretrained_resnet(seed=1)
    converted = smallbn.convert(_pretrained_resnet(seed=2), name)
    converted.load_state_dict(pretrained.state_dict())  # strict
    if name in BN_EVAL_NAMES:
        torch.testing.assert_close(
            converted.eval()(images), pretrained(images), rtol=1e-5, atol=1e-5
        )
    if name in ("domainbn", "sn", "mabn", "cbn", "gn", "ln", "in"):
        # State beyond BN's (per-domain rows, mixture logits, moving-average windows, CBN's
        # iteration counters) or none of its statistics (GN/LN/IN checkpoints are
        # nn.GroupNorm's): the way out is converting back to BN.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", smallbn.ConversionWarning)
            pretrained.load_state_dict(smallbn.convert(converted, "bn").state_dict())
    else:
        pretrained.load_state_dict(converted.state_dict())


def test_convert_keeps_parameters_and_other_modules():
    model = _pretrained_resnet()
    stem_conv, stem_weight = model.stem.weight, model.stem_norm.weight
    converted, report = smallbn.convert_with_report(model, "brn")
    assert converted.stem.weight is stem_conv
    assert converted.stem_norm.weight is stem_weight  # an optimizer built before keeps working
    assert isinstance(converted.stem_norm, smallbn.BatchRenorm2d)
    assert [entry.name for entry in report][:2] == ["stem_norm", "stages.0.bn1"]
    assert {entry.target for entry in report} == {"BatchRenorm2d"}
    assert len(report) == sum(isinstance(m, smallbn.BatchRenorm2d) for m in converted.modules())


def test_convert_nested_containers_root_and_1d_layers():
    model = nn.ModuleDict(
        {
            "body": nn.ModuleList([nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4))]),
            "head": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
            "vol": nn.BatchNorm3d(2),
        }
    )
    smallbn.convert(model, "ghostbn", group_size=2)
    assert type(model["body"][0][1]) is smallbn.GhostBatchNorm1d
    assert model["body"][0][1].group_size == 2
    assert type(model["head"][1]) is smallbn.GhostBatchNorm1d
    assert type(model["vol"]) is smallbn.GhostBatchNorm3d
    root = smallbn.convert(nn.BatchNorm2d(3), "frozenbn")
    assert type(root) is smallbn.FrozenBatchNorm2d


def test_convert_torch_syncbatchnorm_and_back_keeps_dimension():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.SyncBatchNorm(4))
    smallbn.convert(model, "brn")
    assert type(model[1]) is smallbn.BatchRenorm
    smallbn.convert(model, "syncbn", dim=2)
    assert type(model[1]) is smallbn.SyncBatchNorm
    smallbn.convert(model, "bn", dim=2)
    assert type(model[1]) is nn.BatchNorm2d


def test_convert_remembers_dimension_through_rank_agnostic_layers():
    model = nn.Sequential(nn.BatchNorm3d(4))
    smallbn.convert(model, "syncbn")
    smallbn.convert(model, "bn")
    assert type(model[0]) is nn.BatchNorm3d


def test_convert_preserves_mode_and_overrides_options():
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)).train()
    smallbn.convert(model, "brn", momentum=0.05)
    assert model[0].training and model[0].eps == 1e-3 and model[0].momentum == 0.05
    model.eval()
    smallbn.convert(model, "bn")
    assert not model[0].training and model[0].momentum == 0.05


def test_domain_statistics_convert_to_bn_per_domain():
    model = nn.Sequential(nn.BatchNorm2d(3))
    smallbn.convert(model, "domainbn", num_domains=3)
    with torch.no_grad():
        model[0].running_mean.copy_(torch.arange(9.0).reshape(3, 3))
    back = smallbn.convert(copy.deepcopy(model), "bn", source_domain=2)
    assert torch.equal(back[0].running_mean, torch.tensor([6.0, 7.0, 8.0]))


def test_freeze_norms_freezes_every_norm():
    model = _pretrained_resnet()
    frozen = smallbn.freeze_norms(copy.deepcopy(model)).train()
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(frozen(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())


def test_convert_error_names_the_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(
        ValueError, match=r"cannot replace '1' \(BatchNorm2d\).*track_running_stats"
    ):
        smallbn.convert(model, "frozenbn")


def test_converted_layers_name_themselves_in_errors():
    model = smallbn.convert(_pretrained_resnet(), "brn")
    with pytest.raises(ValueError, match="at 'stages.0.bn1'"):
        model.stages[0].bn1(torch.randn(2, 3, 4, 4))


def test_mabn_convert_centres_producing_convs_and_keeps_them_when_converted_back(images):
    model = _pretrained_resnet()
    copied = copy.deepcopy(model)
    stem_weight = copied.stem.weight
    converted = smallbn.convert(copied, "mabn")
    assert isinstance(converted.stem, smallbn.CenteredConv2d)
    assert converted.stem.weight is stem_weight  # the replaced conv's Parameter, shared
    centred = converted.stem.centered_weight().detach().clone()
    images = images[:4]
    expected = converted.eval()(images)
    back = smallbn.convert(converted, "bn")
    # Back to BN, the convs are plain again and hold the centred weights (the same Parameter
    # objects): the same function, in a state_dict a plain torch model loads strictly.  They
    # used to stay CenteredConv2d holding raw weights, which a plain model loaded as another
    # function (differences of 2 on resnet18).
    assert type(back.stem) is nn.Conv2d and isinstance(back.stem_norm, nn.BatchNorm2d)
    assert back.stem.weight is stem_weight
    torch.testing.assert_close(back.stem.weight.detach(), centred)
    assert not any(isinstance(m, smallbn.CenteredConv2d) for m in back.modules())
    plain = _pretrained_resnet()
    plain.load_state_dict(back.state_dict(), strict=True)
    torch.testing.assert_close(plain.eval()(images), expected, rtol=1e-5, atol=1e-5)


# -- edge cases of the model walk --------------------------------------------------------------


def test_dim_applies_to_rank_agnostic_sources_only():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.SyncBatchNorm(4), nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5)
    )
    smallbn.convert(model, "brn", dim=2)
    assert type(model[1]) is smallbn.BatchRenorm2d
    assert type(model[4]) is smallbn.BatchRenorm1d
    model.train()(torch.randn(3, 1, 5, 5))


def test_a_norm_registered_under_two_names_stays_one_layer():
    norm = nn.BatchNorm2d(2)
    model = nn.Module()
    model.a, model.b = norm, norm  # two names in one parent
    model.inner = nn.Sequential(norm)  # and a third in another
    smallbn.convert(model, "brn")
    assert type(model.a) is smallbn.BatchRenorm2d
    assert model.a is model.b is model.inner[0]


def test_partial_options_beat_the_old_layers_and_kwargs_beat_both():
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-5, momentum=0.1))
    smallbn.convert(model, functools.partial(smallbn.BatchRenorm2d, momentum=0.01, eps=1e-3))
    assert model[0].momentum == 0.01 and model[0].eps == 1e-3
    smallbn.convert(model, functools.partial(smallbn.GhostBatchNorm2d, momentum=0.2), momentum=0.3)
    assert model[0].momentum == 0.3 and model[0].eps == 1e-3


def test_a_failed_convert_leaves_the_model_unchanged():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), smallbn.DomainBatchNorm2d(4, 2))
    with pytest.raises(ValueError, match="cannot replace '2'"):
        smallbn.convert(model, "domainbn", num_domains=3)  # 2 domains' statistics: no map to 3
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.Conv2d, smallbn.DomainBatchNorm2d]


def test_domain_statistics_errors_name_the_layer_and_the_fix():
    model = nn.Sequential(nn.BatchNorm2d(3))
    smallbn.convert(model, "domainbn", num_domains=2)
    with pytest.raises(ValueError, match=r"cannot replace '0'.*convert to 'bn' first"):
        smallbn.convert(model, "domainbn", num_domains=3)
    for bad in (5, -1):
        with pytest.raises(ValueError, match=r"cannot replace '0'.*source_domain=.* out of range"):
            smallbn.convert(model, "bn", source_domain=bad)
    assert type(model[0]) is smallbn.DomainBatchNorm2d


def test_bn_affine_converts_to_every_domain_of_a_per_domain_affine():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    model = smallbn.convert(
        nn.Sequential(copy.deepcopy(bn)), "domainbn", num_domains=2, per_domain_affine=True
    )
    layer = model[0]
    assert layer.per_domain_affine and layer.weight.shape == (2, 3)
    assert isinstance(layer.weight, nn.Parameter)  # its own (2, 3) parameter, not BN's (3,)
    for d in range(2):
        assert torch.equal(layer.weight[d], bn.weight) and torch.equal(layer.bias[d], bn.bias)
    # a shared-affine domain BN's γ, β the same way; a per-domain one of the same shape is
    # handed on as the same Parameter (an optimizer built earlier keeps working)
    shared = smallbn.convert(nn.Sequential(copy.deepcopy(bn)), "domainbn", num_domains=2)
    again = smallbn.convert(copy.deepcopy(shared), "domainbn", per_domain_affine=True)
    assert torch.equal(again[0].weight, bn.weight.expand(2, 3))
    weight = model[0].weight
    smallbn.convert(model, "domainbn", per_domain_affine=True)
    assert model[0].weight is weight


def test_per_domain_affine_to_one_affine_needs_source_domain():
    """A (D, C) γ, β does not silently become one domain's: converting to BN (or to a
    shared-affine domain BN) names the option and the fix; source_domain picks the domain."""
    model = nn.Sequential(smallbn.DomainBatchNorm2d(3, num_domains=3, per_domain_affine=True))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(9.0).reshape(3, 3))
        model[0].bias.copy_(-torch.arange(9.0).reshape(3, 3))
        model[0].running_mean.copy_(torch.arange(9.0).reshape(3, 3))
    model[0].active_domain = 1
    for spec, options in [("bn", {}), ("frozenbn", {}), ("domainbn", {"num_domains": 3})]:
        with pytest.raises(
            ValueError,
            match=r"cannot replace '0' \(DomainBatchNorm2d\): it has a separate affine per "
            r"domain \(per_domain_affine=True: γ and β of shape \(3, 3\)\).*Pass "
            r"source_domain=d .* or convert to 'domainbn' with per_domain_affine=True",
        ):
            smallbn.convert(model, spec, **options)
    assert type(model[0]) is smallbn.DomainBatchNorm2d
    back = smallbn.convert(copy.deepcopy(model), "bn", source_domain=2)
    assert torch.equal(back[0].weight, torch.tensor([6.0, 7.0, 8.0]))
    assert torch.equal(back[0].bias, -torch.tensor([6.0, 7.0, 8.0]))
    assert torch.equal(back[0].running_mean, torch.tensor([6.0, 7.0, 8.0]))
    x = torch.randn(2, 3, 4, 4)
    model.eval()
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model[0](x, 2))
    with pytest.raises(ValueError, match=r"cannot map an affine .* of shape \(3, 3\) to \(2, 3\)"):
        smallbn.convert(model, "domainbn", num_domains=2, per_domain_affine=True)


def test_a_layer_instance_or_a_lazy_layer_gets_a_clear_error():
    with pytest.raises(TypeError, match="pass its class"):
        smallbn.convert(nn.Sequential(nn.BatchNorm2d(4)), smallbn.BatchRenorm2d(4))
    with pytest.raises(ValueError, match="run one forward pass before converting"):
        smallbn.convert(nn.Sequential(nn.LazyBatchNorm2d()), "brn")


def test_dtype_override_reaches_the_affine_parameters():
    model = nn.Sequential(nn.BatchNorm2d(3))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
    weight = model[0].weight.detach().clone()
    smallbn.convert(model, "brn", dtype=torch.float64)
    for tensor in (model[0].weight, model[0].bias, model[0].running_mean):
        assert tensor.dtype == torch.float64
    torch.testing.assert_close(model[0].weight.float(), weight, rtol=0, atol=0)


def test_a_source_without_tensors_takes_the_models_dtype():
    model = nn.Sequential(
        nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    ).double()
    smallbn.convert(model, "sn")
    assert model[1].mean_weight.dtype == torch.float64
    model.train()(torch.randn(2, 1, 4, 4, dtype=torch.float64))


def test_freeze_norms_freezes_what_equals_its_eval_map_and_leaves_switchable_norm():
    model = _pretrained_resnet()
    smallbn.convert(model, "sn", where=lambda name, _: name.startswith("stages.0"))
    smallbn.convert(model, "brn", where=lambda name, _: name == "stem_norm")
    model.train()(torch.randn(4, 1, 12, 12))
    model.eval()
    images = torch.randn(3, 1, 12, 12)
    expected = model(images)
    smallbn.freeze_norms(model)
    assert type(model.stem_norm) is smallbn.FrozenBatchNorm2d
    assert type(model.stages[0].bn1) is smallbn.SwitchableNorm2d
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)


def test_binding_survives_other_smallbn_layers_and_later_converts():
    model = _pretrained_resnet().train()
    smallbn.convert(model, "brn")
    smallbn.convert(model, "cbn", window=2, where=lambda name, _: name == "stem_norm")
    assert model.stem_norm.producer is model.stem
    for _ in range(3):
        model(torch.randn(4, 1, 12, 12)).sum().backward()
    window = model.stem_norm.window_var_grad.clone()
    smallbn.convert(model, "frozenbn", where=lambda name, _: name == "stages.0.bn1")
    assert model.stem_norm.producer is model.stem
    torch.testing.assert_close(model.stem_norm.window_var_grad, window, rtol=0, atol=0)


@pytest.mark.parametrize("method", smallbn.available_norms())
def test_bias_false_is_honoured_by_every_layer_and_by_convert(method: str) -> None:
    # torch's norms take bias=False (γ without β); a converted layer used to get a trainable
    # bias, and BatchRenorm2d(8, bias=False) raised TypeError.
    options = {"num_domains": 2} if method == "domainbn" else {}
    layer = smallbn.build_norm(method, 8, bias=False, **options)
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert layer.weight is not None or method == "frozenbn"
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    layer.train()(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    source = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        converted = smallbn.convert(source, method, **options)
        assert converted[1].bias is None
        assert all(not name.endswith("1.bias") for name, _ in converted.named_parameters())
        back = smallbn.convert(converted, "bn")
    assert isinstance(back[1], nn.BatchNorm2d) and back[1].bias is None
    nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, bias=False)).load_state_dict(
        back.state_dict()
    )


# -- norms with behaviour of their own: timm's BatchNormAct2d and other BN subclasses ----------


class _TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's behaviour, written out (BN, then ``drop``, then ``act``;
    timm keeps BN's keys by subclassing BatchNorm2d)."""

    def __init__(self, num_features: int, act: nn.Module) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            0.1, self.eps,
        )  # fmt: skip
        return self.act(self.drop(y))


def _norm_act_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        _TimmStyleBatchNormAct2d(8, nn.SiLU()),
        nn.Conv2d(8, 4, 1),
        _TimmStyleBatchNormAct2d(4, nn.PReLU(4)),  # an activation with a parameter
    )
    with torch.no_grad():
        for norm in (model[1], model[3]):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("method", ["bn", *BN_EVAL_NAMES, "frozenbn", "sn", "gn"])
def test_norm_act_layers_keep_their_activation(method: str) -> None:
    # BatchNormAct2d used to become a plain norm, the activation gone (eval output moved by
    # 46-110 on timm models).  Now every method runs inside the same drop/act, with the
    # same state_dict keys both ways.
    x = torch.randn(2, 3, 9, 9)
    expected = _norm_act_net()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", smallbn.ConversionWarning)
        converted = smallbn.convert(_norm_act_net(), method)
    assert isinstance(converted[3].act, nn.PReLU) and isinstance(converted[1].act, nn.SiLU)
    assert "3.act.weight" in converted.state_dict()
    if method in ("bn", *BN_EVAL_NAMES, "frozenbn"):
        torch.testing.assert_close(converted.eval()(x), expected, rtol=1e-5, atol=1e-5)
    else:  # another method: check the activation is applied to the new norm's output
        norm = converted[3]
        z = converted[2](converted[1](converted[0](x)))
        inner = super(NormActivation, norm).forward(z)  # the norm alone
        torch.testing.assert_close(norm(z), norm.act(inner))
    converted.train()(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", smallbn.ConversionWarning)
        back = smallbn.convert(converted, "bn")
    assert isinstance(back[1], nn.BatchNorm2d) and isinstance(back[1].act, nn.SiLU)
    original = _norm_act_net()
    original.load_state_dict(back.state_dict(), strict=True)
    torch.testing.assert_close(original.eval()(x), back.eval()(x))


def test_norm_act_layers_fold_leaving_their_activation_and_pickle() -> None:
    x = torch.randn(2, 3, 9, 9)
    model = smallbn.convert(_norm_act_net(), "brn").eval()
    folded, report = smallbn.fold_with_report(model)
    assert len(report.folded) == 2
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    timm_style = _norm_act_net()
    folded_timm, report = smallbn.fold_with_report(timm_style)
    assert len(report.folded) == 2
    torch.testing.assert_close(folded_timm(x), timm_style(x), rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), model(x))


def test_bn_subclass_with_unknown_forward_is_refused_naming_the_layer() -> None:
    class Doubled(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Doubled(4))
    with pytest.raises(ValueError, match=r"cannot replace '1' \(Doubled\): its class overrides"):
        smallbn.convert(model, "brn")
    assert type(model[1]) is Doubled  # nothing changed
    smallbn.convert(model, "brn", where=lambda name, m: name != "1")  # the documented way out


def test_conversions_that_change_the_eval_function_say_so() -> None:
    model = _pretrained_resnet()
    with pytest.warns(smallbn.ConversionWarning, match=r"MABN centres the weights.*'stem_norm'"):
        smallbn.convert(copy.deepcopy(model), "mabn")
    sn = smallbn.convert(copy.deepcopy(model), "sn")
    mixture = r"'stem_norm' \(SwitchableNorm2d\).*mixture"
    with pytest.warns(smallbn.ConversionWarning, match=mixture):
        _, report = smallbn.convert_with_report(sn, "bn")
    assert all("mixture" in item.note for item in report)
    with warnings.catch_warnings():  # conversions that keep the eval function stay quiet
        warnings.simplefilter("error")
        brn = smallbn.convert(copy.deepcopy(model), "brn")
        _, report = smallbn.convert_with_report(brn, "bn")
    assert not any(item.note for item in report)


# -- norms in the wild: frozen BNs, batch-independent norms, the report ------------------------


class _TorchvisionFrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's behaviour, written out: BN's statistics and affine as
    buffers, no num_batches_tracked (it drops one from a checkpoint)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args):  # type: ignore[no-untyped-def]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


FrozenBatchNorm2d = type("FrozenBatchNorm2d", (_TorchvisionFrozenBatchNorm2d,), {})


def _frozen_backbone() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        FrozenBatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        FrozenBatchNorm2d(4),
    )
    for norm in (model[1], model[4]):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("method", ["bn", *BN_EVAL_NAMES, "frozenbn"])
def test_frozen_batch_norms_of_detection_backbones_are_converted(method: str) -> None:
    # torchvision's FrozenBatchNorm2d used to be invisible: convert replaced 0 layers and fold
    # folded 0, without a word.
    x = torch.randn(2, 3, 9, 9)
    expected = _frozen_backbone()(x)
    converted, report = smallbn.convert_with_report(_frozen_backbone(), method)
    assert [item.name for item in report] == ["1", "4"]
    assert all(item.source == "FrozenBatchNorm2d" for item in report)
    torch.testing.assert_close(converted.eval()(x), expected, rtol=1e-5, atol=1e-5)
    back = smallbn.convert(converted, "bn")
    original = _frozen_backbone()
    original.load_state_dict(back.state_dict(), strict=True)
    torch.testing.assert_close(original(x), expected, rtol=1e-5, atol=1e-5)


def test_frozen_batch_norms_fold() -> None:
    model = _frozen_backbone()
    x = torch.randn(2, 3, 9, 9)
    folded, report = smallbn.fold_with_report(model)
    assert [f.norm for f in report.folded] == ["1", "4"]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_report_lists_kept_layers_and_pairing_and_warns_when_nothing_is_replaced() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(196)
    )
    converted, report = smallbn.convert_with_report(model, "cbn")
    assert [item.name for item in report] == ["1"]
    assert [(k.name, k.kind) for k in report.kept] == [("2", "GroupNorm"), ("4", "LayerNorm")]
    assert report.producers == {"1": "0"}
    assert "replaced 1 norm layer(s), kept 2" in report.summary()
    assert "paired 1 of 1" in report.summary()
    transformer_like = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.warns(smallbn.ConversionWarning, match=r"replaced no layer.*LayerNorm"):
        smallbn.convert(transformer_like, "cbn")
    with pytest.warns(smallbn.ConversionWarning, match=r"where= selected none of its 1"):
        smallbn.convert(nn.Sequential(nn.BatchNorm2d(2)), "brn", where=lambda n, m: False)
