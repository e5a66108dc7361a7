"""The authors' released models (smallbn.checkpoints): files in each release's exact layout
(keys, shapes and wrappers written from the authors' public code, values random) load into a
smallbn-converted torchvision ResNet whose eval outputs equal a float64 reference of the
release's own inference, computed here from the file's tensors by the release's formulas
(never through smallbn); every documented error names the key and the fix."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from smallbn import CrossIterationBatchNorm2d, checkpoints, cli
from smallbn.checkpoints import ReleaseLayoutError, load_release, release_state_dict

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
EPS = 1e-5


@pytest.fixture(scope="module")
def torchvision():  # type: ignore[no-untyped-def]
    from _thirdparty import torchvision as import_torchvision

    return import_torchvision()


# -- release files, written from the authors' layouts ----------------------------------------------


def _resnet_modules(arch: str = "resnet50") -> list[tuple[str, str, int, int, int]]:
    """(module path in torchvision's names, kind, in, out, kernel) of a bottleneck ResNet."""
    out = [("conv1", "conv", 3, 64, 7), ("bn1", "norm", 0, 64, 0)]
    inplanes = 64
    for stage, blocks in enumerate(BLOCKS[arch], start=1):
        planes = 64 * 2 ** (stage - 1)
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            out += [
                (f"{p}.conv1", "conv", inplanes, planes, 1),
                (f"{p}.bn1", "norm", 0, planes, 0),
                (f"{p}.conv2", "conv", planes, planes, 3),
                (f"{p}.bn2", "norm", 0, planes, 0),
                (f"{p}.conv3", "conv", planes, 4 * planes, 1),
                (f"{p}.bn3", "norm", 0, 4 * planes, 0),
            ]
            if i == 0:
                out += [
                    (f"{p}.downsample.0", "conv", inplanes, 4 * planes, 1),
                    (f"{p}.downsample.1", "norm", 0, 4 * planes, 0),
                ]
            inplanes = 4 * planes
    return out


def _conv_weight(generator: torch.Generator, cin: int, cout: int, k: int) -> Tensor:
    return torch.randn(cout, cin, k, k, generator=generator) * (2 / (cin * k * k)) ** 0.5


def _norm_values(generator: torch.Generator, c: int) -> dict[str, Tensor]:
    return {
        "weight": 1 + 0.1 * torch.randn(c, generator=generator),
        "bias": 0.1 * torch.randn(c, generator=generator),
        "running_mean": 0.2 * torch.randn(c, generator=generator),
        "running_var": 0.5 + torch.rand(c, generator=generator),
    }


def sn_release_file(arch: str = "resnet50", using_bn: bool = True, seed: int = 0) -> dict:
    """A ResNet v1 + SN checkpoint as the 2018 framework saves it (main.py: DataParallel,
    utils.save_checkpoint): SwitchNorm2d's weight/bias (1,C,1,1), running stats (1,C,1),
    logits of 3 (IN, LN, BN) or 2."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, kind, cin, cout, k in _resnet_modules(arch):
        sn = re.sub(r"(^|\.)bn(\d)", r"\1sn\2", name)
        if kind == "conv":
            state[f"module.{sn}.weight"] = _conv_weight(g, cin, cout, k)
            continue
        values = _norm_values(g, cout)
        state[f"module.{sn}.weight"] = values["weight"].view(1, cout, 1, 1)
        state[f"module.{sn}.bias"] = values["bias"].view(1, cout, 1, 1)
        logits = 3 if using_bn else 2
        state[f"module.{sn}.mean_weight"] = torch.randn(logits, generator=g)
        state[f"module.{sn}.var_weight"] = torch.randn(logits, generator=g)
        if using_bn:
            state[f"module.{sn}.running_mean"] = values["running_mean"].view(1, cout, 1)
            state[f"module.{sn}.running_var"] = values["running_var"].view(1, cout, 1)
    state["module.fc.weight"] = 0.01 * torch.randn(1000, 2048, generator=g)
    state["module.fc.bias"] = torch.zeros(1000)
    return {
        "epoch": 100,
        "model": "resnetv1sn50",
        "state_dict": state,
        "best_prec1": 77.49,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
    }


def mabn_release_file(detection: bool = False, seed: int = 1) -> dict:
    """cls/: torchvision names, MABN2d's running_var (C,), sta_matrix (16,32), pre_x2,
    pre_gz (16,C), iters (1,) float; {'model', 'iteration', 'optimizer', 'scheduler'}.
    det/ (maskrcnn-benchmark): module.backbone.body.stem.*, running_var (1,C,1,1), iters
    long, buffer_x2/buffer_gz (16,C), plus the FPN and heads; {'model', 'optimizer', ...}."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, kind, cin, cout, k in _resnet_modules():
        if detection:
            name = "module.backbone.body." + re.sub(r"^(conv1|bn1)$", r"stem.\1", name)
        if kind == "conv":
            state[f"{name}.weight"] = _conv_weight(g, cin, cout, k) + 0.05  # not centred
            continue
        values = _norm_values(g, cout)
        state[f"{name}.weight"] = values["weight"]
        state[f"{name}.bias"] = values["bias"]
        if detection:
            state[f"{name}.running_var"] = values["running_var"].view(1, cout, 1, 1)
            state[f"{name}.iters"] = torch.tensor([90000])
            state[f"{name}.buffer_x2"] = torch.rand(16, cout, generator=g)
            state[f"{name}.buffer_gz"] = torch.randn(16, cout, generator=g)
        else:
            state[f"{name}.running_var"] = values["running_var"]
            state[f"{name}.sta_matrix"] = torch.rand(16, 32, generator=g)
            state[f"{name}.pre_x2"] = torch.ones(16, cout)
            state[f"{name}.pre_gz"] = torch.zeros(16, cout)
            state[f"{name}.iters"] = torch.tensor([600000.0])
    if detection:
        state["module.backbone.fpn.fpn_inner1.weight"] = torch.randn(256, 256, 1, 1)
        state["module.rpn.head.conv.weight"] = torch.randn(256, 256, 3, 3)
        return {"model": state, "optimizer": {}, "scheduler": {}, "iteration": 180000}
    state["fc.weight"] = 0.01 * torch.randn(1000, 2048, generator=g)
    state["fc.bias"] = torch.zeros(1000)
    return {"model": state, "iteration": 600000, "optimizer": {}, "scheduler": {}}


def cbn_release_file(seed: int = 2) -> dict:
    """mmdetection 0.6 (mmcv save_checkpoint): {'meta', 'state_dict', 'optimizer'}; the
    backbone is nn.BatchNorm2d (with num_batches_tracked), the FPN and heads use CBatchNorm2d
    (weight, bias, running_mean, running_var (C,), no num_batches_tracked)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, kind, cin, cout, k in _resnet_modules():
        if kind == "conv":
            state[f"backbone.{name}.weight"] = _conv_weight(g, cin, cout, k)
            continue
        for key, value in _norm_values(g, cout).items():
            state[f"backbone.{name}.{key}"] = value
        state[f"backbone.{name}.num_batches_tracked"] = torch.tensor(0)
    for k, cin in enumerate((256, 512, 1024, 2048)):
        state[f"neck.lateral_convs.{k}.conv.weight"] = _conv_weight(g, cin, 256, 1)
        state[f"neck.fpn_convs.{k}.conv.weight"] = _conv_weight(g, 256, 256, 3)
        for conv in ("lateral_convs", "fpn_convs"):
            for key, value in _norm_values(g, 256).items():
                state[f"neck.{conv}.{k}.bn.{key}"] = value
        state[f"bbox_head.shared_convs.{k}.conv.weight"] = _conv_weight(g, 256, 256, 3)
        for key, value in _norm_values(g, 256).items():
            state[f"bbox_head.shared_convs.{k}.bn.{key}"] = value
    state["rpn_head.rpn_conv.weight"] = torch.randn(256, 256, 3, 3, generator=g)
    state["bbox_head.fc_cls.weight"] = torch.randn(81, 1024, generator=g)
    meta = {"mmdet_version": "0.6.0", "config": "...", "epoch": 12, "iter": 87960}
    return {"meta": meta, "state_dict": state, "optimizer": {}}


# -- the releases' inference, float64, from the file's tensors -------------------------------------


def _resnet_reference(
    x: Tensor,
    tensor: Callable[[str], Tensor],
    norm: Callable[[str, Tensor], Tensor],
    conv_weight: Callable[[Tensor], Tensor] = lambda w: w,
    stride_in_1x1: bool = False,
) -> Tensor:
    """A bottleneck ResNet-50 (stride on the 3×3 unless ``stride_in_1x1``), the modules
    named as torchvision's; ``tensor(name)`` gives a release tensor, ``norm(name, x)`` the
    release's normalization of the layer ``name``."""

    def conv(name: str, value: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
        return F.conv2d(value, conv_weight(tensor(f"{name}.weight")), None, stride, padding)

    x = F.relu(norm("bn1", conv("conv1", x, 2, 3)))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage, blocks in enumerate(BLOCKS["resnet50"], start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            stride = 2 if i == 0 and stage > 1 else 1
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            out = F.relu(norm(f"{p}.bn1", conv(f"{p}.conv1", x, s1)))
            out = F.relu(norm(f"{p}.bn2", conv(f"{p}.conv2", out, s3, 1)))
            out = norm(f"{p}.bn3", conv(f"{p}.conv3", out))
            if i == 0:
                x = norm(f"{p}.downsample.1", conv(f"{p}.downsample.0", x, stride))
            x = F.relu(out + x)
    x = x.mean((2, 3))
    return F.linear(x, tensor("fc.weight"), tensor("fc.bias"))


def sn_release_forward(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """SwitchNorm2d.forward in eval (devkit/ops/switchable_norm.py), ResNet v1."""

    def tensor(name: str) -> Tensor:
        return state["module." + re.sub(r"(^|\.)bn(\d)", r"\1sn\2", name)].double()

    def norm(name: str, value: Tensor) -> Tensor:
        n, c, h, w = value.shape
        v = value.view(n, c, -1)
        mean_in = v.mean(-1, keepdim=True)
        var_in = v.var(-1, keepdim=True)  # torch.var: unbiased
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in**2
        var_ln = temp.mean(1, keepdim=True) - mean_ln**2
        mw = torch.softmax(tensor(f"{name}.mean_weight"), 0)
        vw = torch.softmax(tensor(f"{name}.var_weight"), 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln
        var = vw[0] * var_in + vw[1] * var_ln
        if mw.numel() == 3:
            mean = mean + mw[2] * tensor(f"{name}.running_mean")
            var = var + vw[2] * tensor(f"{name}.running_var")
        v = (v - mean) / (var + EPS).sqrt()
        return v.view(n, c, h, w) * tensor(f"{name}.weight") + tensor(f"{name}.bias")

    return _resnet_reference(x, lambda name: tensor(name), norm)


def mabn_release_forward(state: dict[str, Tensor], x: Tensor, detection: bool) -> Tensor:
    """MABN2d eval (x / sqrt(running_var + eps), no centring) and CenConv2d (W − mean W)."""

    def tensor(name: str) -> Tensor:
        if detection:
            name = "module.backbone.body." + re.sub(r"^(conv1|bn1)(\.|$)", r"stem.\1\2", name)
        return state[name].double()

    def norm(name: str, value: Tensor) -> Tensor:
        c = value.shape[1]
        var = tensor(f"{name}.running_var").view(1, c, 1, 1)
        value = value / (var + EPS).sqrt()
        return tensor(f"{name}.weight").view(1, c, 1, 1) * value + tensor(f"{name}.bias").view(
            1, c, 1, 1
        )

    def centred(w: Tensor) -> Tensor:
        return w - w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)

    fc = {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}

    def any_tensor(name: str) -> Tensor:
        return fc[name].double() if detection and name in fc else tensor(name)

    return _resnet_reference(x, any_tensor, norm, centred, stride_in_1x1=detection)


def bn_release_forward(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """mmdetection's backbone: nn.BatchNorm2d in eval, (x − μ)/sqrt(σ² + eps) γ + β."""

    def tensor(name: str) -> Tensor:
        return state[f"backbone.{name}"].double()

    def norm(name: str, value: Tensor) -> Tensor:
        view = (1, -1, 1, 1)
        mean = tensor(f"{name}.running_mean").view(view)
        var = tensor(f"{name}.running_var").view(view)
        return (value - mean) / torch.sqrt(var + EPS) * tensor(f"{name}.weight").view(
            view
        ) + tensor(f"{name}.bias").view(view)

    fc = {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    return _resnet_reference(x, lambda n: fc[n].double() if n in fc else tensor(n), norm)


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max() / scale


def _input(seed: int = 3) -> Tensor:
    return torch.randn(
        2, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


# -- loads that keep the outputs -----------------------------------------------------------------


@pytest.mark.parametrize("using_bn", [True, False])
def test_sn_release_outputs_equal_the_releases(torchvision, using_bn):
    file = sn_release_file(using_bn=using_bn)
    model, report = load_release(torchvision.models.resnet50(), file, "sn")
    assert report.norm_options["unbiased_instance_var"] is True
    assert report.norm_options["branches"] == (("in", "ln", "bn") if using_bn else ("in", "ln"))
    x = _input()
    actual = model.double().eval()(x)
    _close(actual, sn_release_forward(file["state_dict"], x))
    dropped = dict(report.dropped)
    assert dropped["optimizer"] == "optimizer state: training only" and "best_prec1" in dropped
    # smallbn's own SN inference (population IN variance) is not the release's
    plain, _ = load_release(torchvision.models.resnet50(), file, "sn")
    for layer in plain.modules():
        if hasattr(layer, "unbiased_instance_var"):
            layer.unbiased_instance_var = False
    assert not torch.allclose(plain.double().eval()(x), actual, rtol=1e-4)


def test_sn_detectron_layout_is_the_same_model(torchvision):
    file = sn_release_file()
    # SwitchNorm_Detection tools/convert.py (with --use-FPN): 'Conv_Body.conv_body.resK…'
    converted = {}
    for key, value in file["state_dict"].items():
        sd = key[len("module.") :]
        if sd.startswith(("sn1", "conv1")):
            name = "Conv_Body.conv_body.res1." + sd
        elif sd.startswith("fc"):
            name = "Conv_Body.conv_body.classifier." + sd[3:]
        else:
            name = f"Conv_Body.conv_body.res{int(sd[5]) + 1}" + sd[6:]
        converted[name] = value
    from_detectron, report = checkpoints.sn_state_dict({"model": converted})
    from_classification, _ = release_state_dict("sn", file)
    assert report.layout.startswith("SwitchNorm_Detection")
    assert from_detectron.keys() == from_classification.keys()
    assert all(torch.equal(from_detectron[k], from_classification[k]) for k in from_detectron)


@pytest.mark.parametrize("detection", [False, True])
def test_mabn_release_outputs_equal_the_releases(torchvision, detection):
    file = mabn_release_file(detection=detection)
    model, report = load_release(torchvision.models.resnet50(), file, "mabn")
    assert report.stride_in_1x1 is detection
    if detection:  # no classifier in a backbone file: the model's own fc, zeroed here
        assert ("fc.weight", "the file has no classifier: the model's own") in report.added
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.zero_()
        assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    x = _input()
    _close(model.double().eval()(x), mabn_release_forward(file["model"], x, detection))
    dropped = {key for key, _ in report.dropped}
    # the report names the file's own keys
    buffer = "backbone.body.layer1.0.bn1.buffer_x2" if detection else "layer1.0.bn1.sta_matrix"
    assert buffer in dropped
    if detection:
        assert "module.rpn.head.conv.weight" not in dropped  # module. was stripped
        assert "rpn.head.conv.weight" in dropped
    # the release's conv weights were not centred: smallbn centres them in the forward
    assert abs(float(model.conv1.weight.detach().mean())) > 1e-3
    assert "CenteredConv2d" in type(model.conv1).__name__


def test_cbn_release_backbone_and_its_cbn_layers(torchvision):
    file = cbn_release_file()
    model, report = load_release(torchvision.models.resnet50(), file, "cbn")
    assert report.norm == "bn"  # the release's backbone is plain, frozen BN
    x = _input()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    _close(model.double().eval()(x), bn_release_forward(file["state_dict"], x))
    assert any(key.startswith("neck.") for key, _ in report.dropped)
    # part="detector": every key under mmdetection's names, the CBN layers with the release's
    # eps placement: CBatchNorm2d's eval (x − μ)/(sqrt(σ²) + eps) γ + β
    state, detector = checkpoints.cbn_state_dict(file, part="detector")
    assert detector.norm_options == {"eps_placement": "outside", "eps": EPS}
    prefix = "neck.fpn_convs.2.bn."
    layer = CrossIterationBatchNorm2d(256, **detector.norm_options)
    layer.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    y = torch.randn(2, 256, 5, 5, dtype=torch.float64)
    stats = {
        k: file["state_dict"][prefix + k].double().view(1, -1, 1, 1)
        for k in checkpoints._NORM_STATE
    }
    expected = (y - stats["running_mean"]) / (stats["running_var"] ** 0.5 + EPS)
    _close(layer.double().eval()(y), stats["weight"] * expected + stats["bias"])
    assert (prefix + "num_batches_tracked", "not stored by the release") in detector.added


def test_a_cbn_backbone_key_without_a_place_is_reported_dropped():
    """A backbone entry a torchvision ResNet has no place for (here a deformable conv's
    offsets) is listed as dropped, as the SN and MABN readers list theirs; it was left out of
    the report in silence."""
    file = cbn_release_file()
    extra = "backbone.layer2.0.conv2.conv_offset.weight"
    file["state_dict"][extra] = torch.zeros(18, 128, 3, 3)
    state, report = release_state_dict("cbn", file)
    assert extra not in state
    assert (extra, "not part of the torchvision architecture") in report.dropped
    used = {k for k, _ in report.mapped} | {k for k, _ in report.dropped}
    assert set(file["state_dict"]) <= used  # every entry of the file is accounted for


def test_release_state_dict_loads_strictly_into_the_converted_model(torchvision):
    import smallbn

    state, report = release_state_dict("sn", sn_release_file())
    model = smallbn.convert(torchvision.models.resnet50(), report.norm, **report.norm_options)
    model.load_state_dict(state)  # strict
    assert len(report.mapped) == len(state) - sum(1 for k, _ in report.added if k in state)
    text = report.summary()
    assert "mapped" in text and "num_batches_tracked" in text and "optimizer" in text
    # MABN's converted layers hold moving-average windows the release does not store: they
    # are added (reported) so that the file loads strictly too; the report names the
    # release's own keys
    state, report = release_state_dict("mabn", mabn_release_file(detection=True))
    with pytest.warns(smallbn.ConversionWarning, match="MABN centres"):
        model = smallbn.convert(torchvision.models.resnet50(), report.norm_spec())
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["fc.weight", "fc.bias"] and not unexpected  # a backbone file
    assert ("backbone.body.stem.bn1.running_var", "bn1.running_var") in report.mapped
    added = dict(report.added)
    assert added["layer1.0.bn1.chi2_window"].startswith("training state the release")


# -- errors that name the key and the fix --------------------------------------------------------


def test_a_pre_activation_sn_model_is_refused():
    file = sn_release_file()
    file["state_dict"]["module.sn_out.weight"] = torch.ones(1, 2048, 1, 1)
    with pytest.raises(ReleaseLayoutError, match="v2 \\(pre-activation"):
        release_state_dict("sn", file)


def test_another_architecture_is_named(torchvision):
    file = sn_release_file(arch="resnet101")
    with pytest.raises(ReleaseLayoutError, match="it is a resnet101: pass arch='resnet101'"):
        release_state_dict("sn", file, "resnet50")
    with pytest.raises(ReleaseLayoutError, match="resnet101"):
        load_release(torchvision.models.resnet50(), file, "sn")


def test_a_missing_key_is_named():
    file = mabn_release_file()
    del file["model"]["layer3.2.bn2.running_var"]
    with pytest.raises(ReleaseLayoutError, match="missing key 'layer3.2.bn2.running_var'"):
        checkpoints.mabn_state_dict(file)
    file = mabn_release_file()
    del file["model"]["layer2.1.conv2.weight"]
    with pytest.raises(ReleaseLayoutError, match="missing key 'layer2.1.conv2.weight'"):
        release_state_dict("mabn", file)


def test_a_wrong_shape_is_named():
    file = sn_release_file()
    file["state_dict"]["module.layer1.0.sn2.running_var"] = torch.ones(64)  # (C,), not (1,C,1)
    state, _ = release_state_dict("sn", file)  # (C,) is accepted as the same statistics
    assert state["layer1.0.bn2.running_var"].shape == (64,)
    file["state_dict"]["module.layer1.0.sn2.weight"] = torch.ones(1, 64, 3, 3)
    with pytest.raises(
        ReleaseLayoutError, match="'layer1.0.sn2.weight' has shape \\(1, 64, 3, 3\\)"
    ):
        release_state_dict("sn", file)
    file = sn_release_file()
    file["state_dict"]["module.layer1.0.sn2.bias"] = torch.zeros(1, 32, 1, 1)
    with pytest.raises(ReleaseLayoutError, match="'layer1.0.sn2.bias' has 32 channels"):
        release_state_dict("sn", file)
    file = sn_release_file()
    file["state_dict"]["module.layer4.2.sn3.mean_weight"] = torch.zeros(2)
    with pytest.raises(ReleaseLayoutError, match="logits have sizes \\[2, 3\\]"):
        release_state_dict("sn", file)


def test_other_errors(torchvision, tmp_path):
    with pytest.raises(ValueError, match="unknown release 'gn'"):
        release_state_dict("gn", {})
    with pytest.raises(ReleaseLayoutError, match="no tensors found"):
        release_state_dict("sn", {"epoch": 3})
    with pytest.raises(ReleaseLayoutError, match="named its backbone|names its backbone"):
        release_state_dict("cbn", sn_release_file())
    with pytest.raises(ValueError, match="expects a torchvision bottleneck ResNet"):
        load_release(torchvision.models.resnet18(), sn_release_file(), "sn")
    with pytest.raises(ReleaseLayoutError, match="num_classes=1000"):
        load_release(torchvision.models.resnet50(num_classes=10), sn_release_file(), "sn")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        release_state_dict("sn", tmp_path / "absent.pth")
    pickled = tmp_path / "object.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": _Namespace()}, pickled)
    with pytest.raises(ReleaseLayoutError, match="weights_only=False"):
        release_state_dict("sn", pickled)


class _Namespace:
    """Stands for the argparse Namespace some training scripts pickle beside the weights."""


# -- the command ---------------------------------------------------------------------------------


def test_import_checkpoint_command_writes_the_state_dict(torchvision, tmp_path, capsys):
    import smallbn

    source, out = tmp_path / "sn.pth", tmp_path / "converted.pt"
    torch.save(sn_release_file(), source)
    code = cli.main(
        ["import-checkpoint", "--from", "sn", "--arch", "resnet50", str(source), str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "unbiased_instance_var=True" in printed and "dropped optimizer" in printed
    state = torch.load(out, weights_only=True)
    model = smallbn.convert(
        torchvision.models.resnet50(), "sn", branches=("in", "ln", "bn"), unbiased_instance_var=True
    )
    model.load_state_dict(state)
    with pytest.raises(SystemExit):
        cli.main(["import-checkpoint", "--from", "xyz", str(source), str(out)])
    code = cli.main(["import-checkpoint", "--from", "mabn", str(source), str(out)])
    assert code == 1 and "missing key" in capsys.readouterr().err
    torch.save(cbn_release_file(), source)
    cli.main(["import-checkpoint", "--from", "cbn", "--part", "detector", str(source), str(out)])
    assert "norm_cfg=dict(type='CBN', eps_placement='outside')" in capsys.readouterr().out
    assert "neck.fpn_convs.0.bn.num_batches_tracked" in torch.load(out, weights_only=True)
