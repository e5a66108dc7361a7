import functools

import pytest
import torch
from torch import nn

import smallbn
from smallbn import available_norms, build_norm, registry


@pytest.mark.parametrize(
    ("name", "dim", "expected"),
    [
        ("bn", 1, nn.BatchNorm1d),
        ("bn", 2, nn.BatchNorm2d),
        ("bn", 3, nn.BatchNorm3d),
        ("BatchNorm", 2, nn.BatchNorm2d),
        ("brn", 1, smallbn.BatchRenorm1d),
        ("brn", 3, smallbn.BatchRenorm3d),
        ("brn", None, smallbn.BatchRenorm),
        ("ghostbn", 2, smallbn.GhostBatchNorm2d),
        ("frozenbn", 2, smallbn.FrozenBatchNorm2d),
        ("domainbn", 3, smallbn.DomainBatchNorm3d),
        ("syncbn", 2, smallbn.SyncBatchNorm),
        ("syncbn", None, smallbn.SyncBatchNorm),
        ("shufflebn", 1, smallbn.ShuffleBatchNorm1d),
        ("shufflebn", 2, smallbn.ShuffleBatchNorm2d),
        ("shuffle", 3, smallbn.ShuffleBatchNorm3d),
        ("shufflebn", None, smallbn.ShuffleBatchNorm),
        ("gn", 2, smallbn.GroupNorm),
        ("ln", 1, smallbn.LayerNorm),
        ("in", 3, smallbn.InstanceNorm),
    ],
)
def test_build_norm_by_name(name, dim, expected):
    layer = smallbn.build_norm(name, 32, dim=dim)
    assert type(layer) is expected
    assert layer.num_features == 32


def test_build_norm_accepts_class_and_partial():
    assert type(smallbn.build_norm(smallbn.BatchRenorm2d, 8)) is smallbn.BatchRenorm2d
    layer = smallbn.build_norm(functools.partial(smallbn.GhostBatchNorm2d, group_size=3), 8)
    assert isinstance(layer, smallbn.GhostBatchNorm2d) and layer.group_size == 3


def test_build_norm_passes_device_dtype_and_options():
    layer = smallbn.build_norm("brn", 4, dtype=torch.float64, device="cpu", r_max=2.0, eps=1e-3)
    assert layer.weight.dtype == torch.float64 and layer.running_mean.dtype == torch.float64
    assert layer.r_max == 2.0 and layer.eps == 1e-3


def test_gn_fits_groups_to_channels():
    assert smallbn.build_norm("gn", 64).num_groups == 32
    assert smallbn.build_norm("gn", 16).num_groups == 16
    assert smallbn.build_norm("gn", 48, num_groups=32).num_groups == 24
    assert smallbn.build_norm("ln", 16).num_groups == 1
    assert smallbn.build_norm("in", 16).num_groups == 16


def test_unknown_name_lists_registered_names():
    with pytest.raises(KeyError, match="registered names: .*brn"):
        smallbn.build_norm("nope", 8)


def test_bn_without_dimension_asks_for_dim():
    with pytest.raises(ValueError, match="pass dim=1, 2 or 3"):
        smallbn.build_norm("bn", 8, dim=None)


def test_register_norm_rejects_duplicates_and_registers_new_names():
    with pytest.raises(ValueError, match="already registered"):
        smallbn.register_norm("bn", nn.BatchNorm2d)
    smallbn.register_norm("test_identity_norm", lambda c, **kw: nn.Identity(), aliases=("tin",))
    try:
        assert isinstance(smallbn.build_norm("TIN", 4), nn.Identity)
        assert "test_identity_norm" in smallbn.available_norms()
    finally:
        registry._FAMILIES.pop("test_identity_norm")
        registry._ALIASES.pop("tin")


def test_bad_spec_type():
    with pytest.raises(TypeError, match="name, a class or a functools.partial"):
        registry.resolve_norm(3)  # type: ignore[arg-type]


def test_register_norm_aliases_cannot_take_names_unless_overwriting():
    with pytest.raises(ValueError, match="'bn' already registered"):
        smallbn.register_norm("test_alias_norm", nn.Identity, aliases=("bn",))
    assert "test_alias_norm" not in smallbn.available_norms()
    assert type(smallbn.build_norm("bn", 4)) is nn.BatchNorm2d
    saved = dict(registry._FAMILIES), dict(registry._ALIASES)
    try:
        identity = lambda c, **kw: nn.Identity()  # noqa: E731
        smallbn.register_norm("test_alias_norm", identity, aliases=("ghost",), overwrite=True)
        assert type(smallbn.build_norm("ghost", 4)) is nn.Identity  # the alias moved
        assert type(smallbn.build_norm("ghostbn", 4)) is smallbn.GhostBatchNorm2d
        smallbn.register_norm("test_alias_norm", identity, aliases=("brn",), overwrite=True)
        assert "brn" not in smallbn.available_norms()  # the name became an alias ...
        with pytest.raises(KeyError):
            smallbn.build_norm("batchrenorm", 4)  # ... and its old aliases went with it
    finally:
        registry._FAMILIES.clear()
        registry._FAMILIES.update(saved[0])
        registry._ALIASES.clear()
        registry._ALIASES.update(saved[1])
    assert type(smallbn.build_norm("ghost", 4)) is smallbn.GhostBatchNorm2d


def test_a_layer_instance_is_not_a_spec():
    with pytest.raises(TypeError, match=r"layer instance .*pass its class \(GroupNorm\)"):
        smallbn.build_norm(nn.GroupNorm(2, 4), 4)


def test_bn_family_layers_are_found_by_code_that_checks_for_torch_batch_norm():
    # mmengine's norm_decay_mult, torchvision's split_normalization_params, timm's and
    # detectron2's helpers find norms with isinstance(m, _BatchNorm): layers whose eval map is
    # BN's are _BatchNorm instances (torch's helpers read their state as BN's, correctly);
    # SN and domain BN are not (their eval output is not BN's map of their state).
    from torch.nn.modules.batchnorm import _BatchNorm

    is_bn = {
        name: isinstance(
            build_norm(name, 4, **({"num_domains": 2} if name == "domainbn" else {})), _BatchNorm
        )
        for name in available_norms()
    }
    assert is_bn == {
        "bn": True,
        "brn": True,
        "cbn": True,
        "domainbn": False,
        "frozenbn": True,
        "ghostbn": True,
        "gn": False,
        "in": False,
        "ln": False,
        "mabn": True,
        "shufflebn": True,
        "sn": False,
        "syncbn": True,
    }
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    converted = smallbn.convert(model, "cbn")
    norm_params = [
        p for m in converted.modules() if isinstance(m, _BatchNorm) for p in m.parameters()
    ]
    assert len(norm_params) == 2  # γ and β get the norms' weight decay, as before convert
