"""smallbn in the frameworks: mmengine's registry, a detectron2-style get_norm, timm's
norm_layer, Lightning's PreciseBN callback (the frameworks themselves, where installed)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from _thirdparty import import_or_skip
from torch import nn

import smallbn
import smallbn.integrations.mmengine
from smallbn.integrations import FRAMEWORK_NAMES
from smallbn.integrations.detectron2 import get_norm


def test_mmengine_builds_every_method_by_its_mmcv_name_and_binds_after():
    mmengine_registry = import_or_skip("mmengine.registry")
    registry = mmengine_registry.Registry("smallbn_test_models")
    registered = smallbn.integrations.mmengine.register(registry)
    assert set(registered) == set(FRAMEWORK_NAMES)
    assert smallbn.integrations.mmengine.register(registry) == registered  # again: a no-op
    norm = registry.build({"type": "CBN", "num_features": 64})
    assert isinstance(norm, smallbn.CrossIterationBatchNorm) and norm.num_features == 64
    assert isinstance(registry.build({"type": "SN", "num_features": 8}), smallbn.SwitchableNorm)

    # a config-built model, then one call pairs its CBN layers with their convs
    @registry.register_module()
    class Block(nn.Module):
        def __init__(self, norm_cfg: dict) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = registry.build({**norm_cfg, "num_features": 8})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x))

    model = registry.build({"type": "Block", "norm_cfg": {"type": "CBN", "window": 2}})
    assert smallbn.bind_producers(model) == {"norm": "conv"}
    assert model.norm.producer is model.conv
    taken = mmengine_registry.Registry("taken")
    taken.register_module(name="CBN", module=nn.BatchNorm2d)
    with pytest.raises(KeyError, match="already has 'CBN'.*force=True"):
        smallbn.integrations.mmengine.register(taken)


def test_mmengine_norm_decay_mult_reaches_smallbn_layers():
    optim = import_or_skip("mmengine.optim")
    model = smallbn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "cbn")
    constructor = optim.DefaultOptimWrapperConstructor(
        {"type": "OptimWrapper", "optimizer": {"type": "SGD", "lr": 0.1, "weight_decay": 1e-4}},
        {"norm_decay_mult": 0.0},
    )
    wrapper = constructor(model)
    decay = {id(p): g["weight_decay"] for g in wrapper.optimizer.param_groups for p in g["params"]}
    assert decay[id(model[1].weight)] == decay[id(model[1].bias)] == 0.0
    assert decay[id(model[0].weight)] == 1e-4


def test_detectron2_style_get_norm():
    assert get_norm("", 8) is None and get_norm(None, 8) is None
    assert isinstance(get_norm("BN", 8), nn.BatchNorm2d)
    assert isinstance(get_norm("FrozenBN", 8), smallbn.FrozenBatchNorm2d)
    gn = get_norm("GN", 64)
    assert isinstance(gn, smallbn.GroupNorm) and gn.num_groups == 32
    sync = get_norm("SyncBN", 8)
    assert isinstance(sync, smallbn.SyncBatchNorm) and sync.sync
    for name, method in FRAMEWORK_NAMES.items():
        layer = get_norm(name, 16)
        assert type(layer) is smallbn.resolve_norm(method, 2), name
    assert isinstance(get_norm(lambda c: nn.GroupNorm(4, c), 8), nn.GroupNorm)
    with pytest.raises(KeyError, match="unknown norm 'XN'"):
        get_norm("XN", 8)


@pytest.mark.parametrize("method", ["cbn", "mabn", "brn", "sn", "ghostbn"])
def test_timm_models_take_smallbn_layers_as_norm_layer(method: str):
    timm = import_or_skip("timm")
    options = {"group_size": 2} if method == "ghostbn" else {}
    norm = functools.partial(smallbn.resolve_norm(method, 2), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("resnet18", pretrained=False, num_classes=4, norm_layer=norm)
        smallbn.bind_producers(model)
    kinds = {type(m) for m in model.modules() if isinstance(m, smallbn.layers.NormBase)}
    assert kinds == {smallbn.resolve_norm(method, 2)}
    loss = model.train()(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    assert torch.isfinite(loss)


def test_lightning_runs_precise_bn_before_validation_and_refuses_sync_batchnorm():
    lightning = import_or_skip("lightning")
    from smallbn.integrations.lightning import PreciseBN

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = smallbn.convert(
                nn.Sequential(
                    nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)
                ),
                "brn",
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, _):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, _):  # type: ignore[no-untyped-def]
            x, y = batch
            self.log("val", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 3, 6, 6, generator=g) * 3 + 1, torch.randint(0, 2, (16,), generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = Module()
    callback = PreciseBN(num_samples=16)
    trainer = lightning.Trainer(
        max_epochs=1,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():  # Lightning's advice on loaders and workers: not ours
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, loader)
    assert callback.runs == 1
    # the running statistics are the population's: those of the first conv's outputs
    with torch.no_grad():
        z = module.net[0](data.tensors[0])
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), correction=0)
    torch.testing.assert_close(module.net[1].running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module.net[1].running_var, var, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"sync_batchnorm=True\) converts every BatchNorm"):
        lightning.Trainer(
            max_epochs=1, callbacks=[PreciseBN()], accelerator="cpu", sync_batchnorm=True,
            logger=False, enable_progress_bar=False, enable_model_summary=False,
        ).fit(Module(), loader)  # fmt: skip


def test_mabn_keeps_a_pretrained_models_function_without_centring():
    """Weight centring cannot keep a pretrained conv's function: ``conv(x, W)`` is
    ``conv(x, W - m) + m·Σ_window x``, and the second term depends on the input, so no bias or
    shift reproduces it.  ``center_producer=False`` keeps the convs; eval is then BN's."""
    from _architectures import ARCHITECTURES

    model = ARCHITECTURES["tv_resnet18"].build()
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # "pretrained": statistics that are not 0/1
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=generator)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConversionWarning: nothing changes function
        kept = smallbn.convert(model, "mabn", center_producer=False).eval()
    assert not any(isinstance(m, smallbn.CenteredConv2d) for m in kept.modules())
    torch.testing.assert_close(kept(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.warns(smallbn.ConversionWarning, match="centres the weights"):
        centred = smallbn.convert(model, "mabn").eval()
    assert (centred(x) - expected).abs().max() > 1e-2
    back = smallbn.convert(centred, "bn")  # plain convs again, holding the centred weights
    assert not any(isinstance(m, smallbn.CenteredConv2d) for m in back.modules())
