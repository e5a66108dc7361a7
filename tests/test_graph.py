"""smallbn.graph: which conv/linear produced a norm's input, by fx tracing or, for untraceable
models, by nn.Sequential neighbours."""

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import smallbn
from smallbn.experiments.models import SmallResNet
from smallbn.graph import PRODUCER_TYPES, find_producers, trace_producers

is_norm = smallbn.is_norm_layer


def test_graph_imports_only_torch_and_the_standard_library():
    # graph is core: layers (Cross-Iteration BN) will import it, so it must not import them
    source = Path(smallbn.__file__).with_name("graph.py").read_text()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "collections", "dataclasses", "typing", "torch"}


def test_fx_pairs_every_norm_of_a_resnet_with_its_conv():
    model = SmallResNet(widths=(8, 16), blocks=2)
    search = trace_producers(model, is_norm)
    assert search.method == "fx" and search.trace_error is None
    assert search.unpaired == {}
    norms = [name for name, m in model.named_modules() if is_norm(m)]
    assert sorted(search.producers) == sorted(norms)
    assert search.producers["stem_norm"] == "stem"
    assert search.producers["stages.0.bn2"] == "stages.0.conv2"
    assert search.producers["stages.2.shortcut.1"] == "stages.2.shortcut.0"
    assert find_producers(model, is_norm) == search.producers


def test_fx_pairs_smallbn_layers_as_leaves():
    model = smallbn.convert(SmallResNet(widths=(8, 16)), "brn")
    assert find_producers(model, is_norm)["stages.0.bn1"] == "stages.0.conv1"


class _Residual(nn.Module):
    """conv → bn, but the conv output is also added to the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        return self.bn(z) + z


def test_fx_skips_a_producer_whose_output_is_used_twice():
    search = trace_producers(_Residual(), is_norm)
    assert search.producers == {}
    assert "also used elsewhere" in search.unpaired["bn"]


class _Shared(nn.Module):
    """One conv called twice (two norms after it), one norm called twice, one conv registered
    under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn_shared = nn.BatchNorm2d(3)
        self.conv3 = nn.Conv2d(3, 3, 1)
        self.alias = self.conv3
        self.bn3 = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))
        y = self.bn_shared(self.conv2(y)) + self.bn_shared(y)
        return self.bn3(self.conv3(y))


def test_fx_excludes_shared_modules():
    search = trace_producers(_Shared(), is_norm)
    assert search.producers == {}
    assert "called 2 times" in search.unpaired["bn_a"]
    assert "called 2 times" in search.unpaired["bn_b"]
    assert "called 2 times" in search.unpaired["bn_shared"]
    assert "several names" in search.unpaired["bn3"] and "'alias'" in search.unpaired["bn3"]


class _Odd(nn.Module):
    """Inputs that are not a producer's output, an extra argument, a norm never called, and a
    Conv2d subclass (which may transform its weight in forward)."""

    class _Standardized(nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.after_relu = nn.BatchNorm2d(3)
        self.domain_conv = nn.Conv2d(3, 3, 1)
        self.domain = smallbn.DomainBatchNorm2d(3)
        self.ws = self._Standardized(3, 3, 1)
        self.after_ws = nn.BatchNorm2d(3)
        self.unused = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.after_relu(F.relu(self.conv(x)))
        x = self.domain(self.domain_conv(x), domain=1)
        return self.after_ws(self.ws(x))


def test_fx_reasons_for_unpaired_norms():
    search = trace_producers(_Odd(), is_norm)
    assert search.producers == {}
    assert "not the output of a Conv1d/" in search.unpaired["after_relu"]
    assert "arguments besides its input" in search.unpaired["domain"]
    # the subclass is traced through (not a leaf), so the norm's input is a functional conv
    assert "not the output of" in search.unpaired["after_ws"]
    assert "not called" in search.unpaired["unused"]
    # naming the subclass as a producer type makes it one
    custom = trace_producers(_Odd(), is_norm, producer_types=(*PRODUCER_TYPES, _Odd._Standardized))
    assert custom.producers == {"after_ws": "ws"}


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.BatchNorm2d(4),  # follows a ReLU: not paired
        )
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)  # conv → bn in forward, invisible to the fallback

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(x)
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def test_submodules_are_traced_when_the_whole_model_cannot_be():
    search = trace_producers(_Untraceable(), is_norm)
    assert search.method == "submodules"
    assert search.trace_error and "TraceError" in search.trace_error
    assert set(search.untraced) == {"<root>"}
    assert search.producers == {"body.1": "body.0", "body.4": "body.3"}
    assert set(search.unpaired) == {"body.6", "bn"}
    assert "forward of '<root>', which calls it, cannot be traced" in search.unpaired["bn"]


class _Encoder(nn.Module):
    """A traceable submodule with its own forward (not a Sequential), as a segmentation
    model's encoder; its first output also leaves the module (a skip connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.conv1(x)  # also returned: used outside this module
        y = self.bn2(self.conv2(torch.relu(self.bn1(skip))))
        return skip, self.bn3(self.conv3(y))


class _Segmenter(nn.Module):
    """Untraceable at the top (control flow on the input's size), traceable inside; one level
    deeper an untraceable block sits beside traceable ones."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Encoder()
        self.decoder = nn.ModuleDict({"head": _Untraceable(), "proj": nn.Conv2d(4, 4, 1)})
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        skip, y = self.encoder(x)
        if x.shape[-1] % 2:
            y = y + skip
        y = self.decoder["head"](y)
        return self.bn(self.decoder["proj"](y))


def test_traceable_submodules_are_paired_at_any_depth():
    search = trace_producers(_Segmenter(), is_norm)
    assert search.method == "submodules"
    assert set(search.untraced) == {"<root>", "decoder.head"}
    assert search.producers == {
        "encoder.bn2": "encoder.conv2",
        "encoder.bn3": "encoder.conv3",
        "decoder.head.body.1": "decoder.head.body.0",
        "decoder.head.body.4": "decoder.head.body.3",
    }
    assert "also used elsewhere" in search.unpaired["encoder.bn1"]
    assert "forward of '<root>'" in search.unpaired["bn"]
    assert "forward of 'decoder.head'" in search.unpaired["decoder.head.bn"]


class _SharedInSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 3, 1)
        self.body = nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3))
        self.tail = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(x)
        if x.sum() > 0:
            x = -x
        return self.tail(x.mean((2, 3)))


class _Reordered(nn.Sequential):
    """A Sequential subclass with its own forward: children need not run in order."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self[0](x) + self[1](x)


def test_submodule_search_excludes_shared_producers_and_custom_forwards():
    search = trace_producers(_SharedInSequential(), is_norm)
    assert search.method == "submodules"
    assert search.producers == {"tail.1": "tail.0"}

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = _Reordered(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

        def forward(self, x: Tensor) -> Tensor:
            return self.block(x) if x.sum() > 0 else x

    assert trace_producers(Wrapper(), is_norm).producers == {}


def test_every_producer_type_is_recognized():
    producers = [
        nn.Conv1d(2, 2, 1),
        nn.Conv2d(2, 2, 1),
        nn.Conv3d(2, 2, 1),
        nn.ConvTranspose1d(2, 2, 1),
        nn.ConvTranspose2d(2, 2, 1),
        nn.ConvTranspose3d(2, 2, 1),
        nn.Linear(2, 2),
    ]
    for producer in producers:
        model = nn.Sequential(producer, nn.BatchNorm1d(2))
        assert find_producers(model, is_norm) == {"1": "0"}, type(producer).__name__


class _SharedActivation(nn.Module):
    """An untraceable forward around a Sequential that uses one ReLU twice: conv2 is not
    followed by the norm (the ReLU's second use sits between them)."""

    def __init__(self) -> None:
        super().__init__()
        act = nn.ReLU()
        self.body = nn.Sequential(
            nn.Conv2d(1, 2, 1), act, nn.Conv2d(2, 2, 1), act, nn.BatchNorm2d(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) if x.sum() > 0 else x


def test_submodule_search_keeps_a_child_used_twice_between_its_neighbours():
    search = trace_producers(_SharedActivation(), is_norm)
    assert search.method == "submodules"
    assert search.producers == {}


def test_data_parallel_wrappers_are_seen_through():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    search = trace_producers(nn.DataParallel(model), is_norm)
    assert search.method == "fx"
    assert search.producers == {"module.1": "module.0"}


class _SamePadConv(nn.Conv2d):
    """timm's Conv2dSame in miniature: pads by the input's size, which fx cannot trace."""

    def forward(self, x: Tensor) -> Tensor:
        pad = max(0, (math.ceil(x.shape[-1] / 2) - 1) * 2 + 3 - x.shape[-1])
        return super().forward(nn.functional.pad(x, [pad // 2, pad - pad // 2] * 2))


class _StridedBlock(nn.Module):
    """Untraceable only because of a child: its own dataflow is plain."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(4, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv_dw = _SamePadConv(8, 8, 3, stride=2, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv_pwl = nn.Conv2d(8, 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv_pw(x)))
        x = torch.relu(self.bn2(self.conv_dw(x)))
        return self.bn3(self.conv_pwl(x))


def test_a_module_untraceable_only_because_of_a_child_pairs_its_own_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), _StridedBlock())
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)  # the premise: the whole model cannot be traced
    search = trace_producers(model, is_norm)
    assert search.method == "submodules"
    assert set(search.untraced) == {"<root>", "2"}
    assert search.producers == {"1": "0", "2.bn1": "2.conv_pw", "2.bn3": "2.conv_pwl"}
    assert "_SamePadConv" in search.unpaired["2.bn2"]
    assert "subclass of Conv2d" in search.unpaired["2.bn2"]
