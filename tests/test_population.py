"""PreciseBN, batch-statistics evaluation and FreezeNormsAt against naive references."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import smallbn
from _spawn import run_world  # tests/ is on sys.path (conftest.py)

EPS = 1e-5


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Dropout(0.5),  # must be inactive during PreciseBN
        nn.BatchNorm2d(4, eps=EPS),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        nn.BatchNorm2d(3, eps=EPS),
    ).double()
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 2.0)
        model[2].bias.uniform_(-1, 1)
    return model


def _batches(sizes: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64) * 3 + 1 for n in sizes]


def _population(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel over every value of every batch (float64)."""
    allv = torch.cat([v.transpose(0, 1).reshape(v.shape[1], -1) for v in values], dim=1)
    return allv.mean(1), allv.var(1, correction=0)


def _naive_reference(model: nn.Sequential, batches: list[torch.Tensor]):
    """Per batch: layer-1 BN normalizes with its batch statistics (training-mode BN, written
    with F.batch_norm, no smallbn), dropout off; collect each BN's inputs."""
    conv1, bn1, conv2 = model[0], model[2], model[4]
    first, second = [], []
    with torch.no_grad():
        for x in batches:
            z1 = conv1(x)
            first.append(z1)
            y1 = F.batch_norm(z1, None, None, bn1.weight, bn1.bias, training=True, eps=EPS)
            second.append(conv2(F.relu(y1)))
    return _population(first), _population(second)


@pytest.mark.parametrize("sizes", [[3, 5, 2, 7, 4], [1, 1, 6], [16]])
@pytest.mark.parametrize("method", ["bn", "syncbn", "brn", "ghostbn"])
def test_precise_bn_equals_population_over_concatenated_samples(sizes, method):
    model = _model()
    if method != "bn":  # BRN in warm-up and Ghost with large groups normalize as BN does
        smallbn.convert(model, method, **({"group_size": 64} if method == "ghostbn" else {}))
    batches = _batches(sizes)
    (m1, v1), (m2, v2) = _naive_reference(model, batches)
    smallbn.precise_bn(model, batches, num_samples=sum(sizes), progress=False)
    for layer, mean, var in ((model[2], m1, v1), (model[5], m2, v2)):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-6, atol=1e-9)


def test_precise_bn_stops_after_num_samples_and_accepts_tuples():
    model = _model()
    batches = _batches([4, 4, 4, 4])
    (m1, v1), _ = _naive_reference(model, batches[:2])
    data = [(x, torch.zeros(len(x))) for x in batches]
    smallbn.precise_bn(model, data, num_samples=6, progress=False)
    torch.testing.assert_close(model[2].running_mean, m1)
    torch.testing.assert_close(model[2].running_var, v1)


@pytest.mark.parametrize("training", [True, False])
def test_precise_bn_restores_mode_counters_and_other_state(training):
    model = smallbn.convert(_model(), "brn", warmup_steps=2, r_max_ramp_end=4, d_max_ramp_end=4)
    model.train()
    for x in _batches([4, 4, 4], seed=3):
        model(x)
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smallbn.precise_bn(model, _batches([8, 8]), num_samples=16, progress=False)
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    assert all(m.training == training for m in model.modules())
    assert model[2].momentum == 0.1 and model[2].num_batches_tracked.item() == 3


@pytest.mark.filterwarnings("ignore:.*no producing conv")
def test_precise_bn_leaves_cross_iteration_training_unchanged():
    """After PreciseBN, CBN's next training steps (window, burn-in) are those it would have
    taken without it: its host-side step and window counters follow the restored buffers."""
    torch.manual_seed(0)
    model = smallbn.convert(_model().double(), "cbn", window=3, burnin=2)
    model[1].eval()  # dropout off: the two copies must draw nothing random
    data = _batches([4, 4, 4, 4, 4, 4], seed=5)
    for x in data[:3]:
        model(x)
    twin = copy.deepcopy(model)
    smallbn.precise_bn(model, _batches([8, 8]), num_samples=16, progress=False)
    for x in data[3:]:
        torch.testing.assert_close(model(x), twin(x))
    assert model[2].iteration.item() == twin[2].iteration.item() == 6


def test_precise_bn_per_domain():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.norm = smallbn.DomainBatchNorm2d(3, num_domains=3)

        def forward(self, x, domain):
            return self.norm(self.conv(x), domain=domain)

    torch.manual_seed(0)
    net = Net().double()
    batches = _batches([5, 6, 3])
    domains = [torch.tensor(d) for d in ([0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 0], [0, 0, 1])]
    data = list(zip(batches, domains, strict=True))
    with torch.no_grad():
        net.norm.running_mean[2].fill_(7.0)
    smallbn.precise_bn(net, data, 14, forward=lambda m, b: m(b[0], b[1]), progress=False)
    with torch.no_grad():
        for d in (0, 1):
            values = [net.conv(x[dom == d]) for x, dom in data]
            mean, var = _population(values)
            torch.testing.assert_close(net.norm.running_mean[d], mean)
            torch.testing.assert_close(net.norm.running_var[d], var)
    assert torch.all(net.norm.running_mean[2] == 7.0)  # no samples of domain 2: untouched


def test_precise_bn_domain_layer_called_once_per_level():
    """One DomainBatchNorm shared by the levels of an FPN head, one domain per level (Wu &
    Johnson 2021, §4): each domain's population is that level's inputs over every batch."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.norm = smallbn.DomainBatchNorm2d(3, num_domains=4)

        def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
            return [self.norm(self.conv(f), domain=i) for i, f in enumerate(levels)]

    torch.manual_seed(0)
    head = Head().double()
    data = [[x[:, :, : 5 - i, : 5 - i] + i for i in range(3)] for x in _batches([2, 3, 4])]
    with torch.no_grad():
        head.norm.running_mean[3].fill_(7.0)
    smallbn.precise_bn(
        head, data, 9, forward=lambda m, b: m(b), batch_size=lambda b: len(b[0]), progress=False
    )
    with torch.no_grad():
        for level in range(3):
            mean, var = _population([head.conv(levels[level]) for levels in data])
            torch.testing.assert_close(head.norm.running_mean[level], mean)
            torch.testing.assert_close(head.norm.running_var[level], var)
    assert torch.all(head.norm.running_mean[3] == 7.0)  # no level used domain 3: untouched


def test_precise_bn_refuses_non_finite_populations_and_changes_nothing():
    """torch's BN computes statistics of an Inf input without complaint; PreciseBN must not
    store them.  The error names the layer where the Inf enters and its channel."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)).double()
    data = _batches([4, 4, 4])
    data = [torch.cat([x, -x[:, :1]], dim=1) for x in data]  # 3 channels
    data[1][0, 1, 2, 3] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError) as raised:
        smallbn.precise_bn(model, data, num_samples=12, progress=False)
    message = str(raised.value)
    assert "layer '0' (BatchNorm2d) in channel(s) [1] are NaN or Inf" in message
    assert "also 1 later layer(s): layer '1' (BatchNorm2d) in channel(s) [1]" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_precise_bn_data_runs_out():
    with pytest.raises(ValueError, match="ran out after 6 samples, before num_samples=100"):
        smallbn.precise_bn(_model(), _batches([3, 3]), num_samples=100, progress=False)


def test_precise_bn_rejects_a_layer_used_twice():
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(bn, nn.Conv2d(2, 2, 1), bn)
    with pytest.raises(ValueError, match=r"layer '0' \(BatchNorm2d\) was called 2 times") as err:
        smallbn.precise_bn(model, [torch.randn(4, 2, 3, 3)], num_samples=4, progress=False)
    assert "exclude" not in str(err.value)  # precise_bn has no way to exclude a layer


def test_batch_stats_eval_uses_batch_statistics_and_restores_everything():
    model = smallbn.convert(_model(), "brn", warmup_steps=0, r_max_ramp_end=1, d_max_ramp_end=1)
    model.train()
    for x in _batches([4, 4], seed=5):
        model(x)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    x = _batches([6], seed=9)[0]
    with smallbn.batch_stats_eval(model):
        got = model(x)
        assert not model[1].training  # dropout stays in eval mode
    conv1, bn1, conv2, bn2 = model[0], model[2], model[4], model[5]
    with torch.no_grad():
        y1 = F.batch_norm(conv1(x), None, None, bn1.weight, bn1.bias, training=True, eps=EPS)
        z2 = conv2(F.relu(y1))
        want = F.batch_norm(z2, None, None, bn2.weight, bn2.bias, training=True, eps=EPS)
    torch.testing.assert_close(got, want)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m.training for m in model.modules())
    assert all(m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats"))


@pytest.mark.filterwarnings("ignore:.*no producing conv")
def test_batch_stats_eval_cross_iteration_uses_the_current_batch_only():
    """CBN trains in training mode and pools the iterations in its window; inside the block it
    must give BN with the current batch's statistics, whatever the training history and the
    test batches before, and leave window, counters and later training unchanged."""
    torch.manual_seed(0)
    model = smallbn.convert(_model(), "cbn", window=3, burnin=2)
    model[1].eval()  # dropout off: model and twin must draw nothing random
    model.train()
    for x in _batches([4, 4, 4, 4], seed=5):
        model(x * 2 + 1)  # a training distribution unlike the test batches
    model.eval()
    twin = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    x, other = _batches([6, 5], seed=9)
    with smallbn.batch_stats_eval(model):
        model(other)  # an earlier test batch must not leak into the next output either
        got = model(x)
    conv1, bn1, conv2, bn2 = model[0], model[2], model[4], model[5]
    with torch.no_grad():
        y1 = F.batch_norm(conv1(x), None, None, bn1.weight, bn1.bias, training=True, eps=EPS)
        z2 = conv2(F.relu(y1))
        want = F.batch_norm(z2, None, None, bn2.weight, bn2.bias, training=True, eps=EPS)
    torch.testing.assert_close(got, want)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model[2].iteration.item() == 4
    for net in (model, twin):
        net.train()
        net[1].eval()
    for x in _batches([4, 4], seed=6):  # the restored window is the one training goes on with
        torch.testing.assert_close(model(x), twin(x))


def test_freeze_norms_at_epoch_with_precise_bn():
    model = nn.Sequential(_model(), smallbn.GroupNorm(3, num_groups=3, dtype=torch.float64))
    batches = _batches([8, 8])
    freeze = smallbn.FreezeNormsAt(2, precise_data=lambda: batches, num_samples=16)
    for epoch in range(2):
        model = freeze(model, epoch)
        assert isinstance(model[0][2], nn.BatchNorm2d)
    reference = copy.deepcopy(model)
    smallbn.precise_bn(reference, batches, 16, progress=False)
    model = freeze(model, 2)
    assert isinstance(model[0][2], smallbn.FrozenBatchNorm2d)
    assert isinstance(model[1], smallbn.GroupNorm)  # batch-independent norms stay
    torch.testing.assert_close(model[0][5].running_var, reference[0][5].running_var)
    assert freeze(model, 3) is model


@dataclasses.dataclass
class _Batch:
    image: torch.Tensor
    label: torch.Tensor


def test_freeze_norms_at_passes_batch_size_and_progress(capsys):
    """Batches precise_bn cannot read need both forward= and batch_size=; FreezeNormsAt
    passes them on (and progress=False keeps the bar off)."""
    batches = _batches([3, 5, 4, 4])
    data = [_Batch(x, torch.zeros(len(x))) for x in batches]
    sizes: list[int] = []

    def batch_size(batch: _Batch) -> int:
        sizes.append(len(batch.image))
        return len(batch.image)

    freeze = smallbn.FreezeNormsAt(
        0,
        precise_data=lambda: data,
        num_samples=8,
        forward=lambda m, b: m(b.image),
        batch_size=batch_size,
        progress=False,
    )
    model = freeze(_model(), 0)
    assert sizes == [3, 5]  # stopped once 8 samples were counted by batch_size
    assert "PreciseBN" not in capsys.readouterr().err
    (m1, v1), (m2, v2) = _naive_reference(_model(), batches[:2])
    assert isinstance(model[5], smallbn.FrozenBatchNorm2d)
    torch.testing.assert_close(model[2].running_mean, m1)
    torch.testing.assert_close(model[2].running_var, v1)
    torch.testing.assert_close(model[5].running_mean, m2)
    torch.testing.assert_close(model[5].running_var, v2)


# -- two processes over gloo: different data, identical statistics ---------------------------


def _precise_worker(rank: int, world: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        model = smallbn.convert(_model(), "syncbn")
        sizes = [[3, 5, 2], [4, 6]][rank]  # different data and batch counts per rank
        smallbn.precise_bn(model, _batches(sizes, seed=10 + rank), sum(sizes), progress=False)
        torch.save({k: v for k, v in model.state_dict().items() if "running" in k}, out % rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_precise_bn_two_processes_match_single_process_over_all_data(tmp_path):
    out = str(tmp_path / "rank%d.pt")
    mp.spawn(_precise_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    results = [torch.load(out % r) for r in range(2)]
    model = _model()
    batches = _batches([3, 5, 2], seed=10) + _batches([4, 6], seed=11)
    (m1, v1), (m2, v2) = _naive_reference(model, batches)
    for result in results:
        torch.testing.assert_close(result["2.running_mean"], m1)
        torch.testing.assert_close(result["2.running_var"], v1)
        torch.testing.assert_close(result["5.running_mean"], m2)
        torch.testing.assert_close(result["5.running_var"], v2)
    assert os.path.exists(out % 1)


# -- layers off some ranks' paths, and data running out on one rank ------------------------


class _TwoBranches(nn.Module):
    """Branch A (a BN) for batches without domain ids, branch B (a BN, then a domain BN) for
    batches with them; ``shared`` follows both, ``unused`` is on no path.  ``branch_a`` and
    ``branch_b`` have the same shape, so pairing one rank's with the other's goes unnoticed
    by the collective."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_a = nn.BatchNorm2d(2, eps=EPS)
        self.branch_b = nn.BatchNorm2d(2, eps=EPS)
        self.branch_d = smallbn.DomainBatchNorm2d(2, eps=EPS, num_domains=3)
        self.shared = nn.BatchNorm2d(2, eps=EPS)
        self.unused = nn.BatchNorm2d(2, eps=EPS)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        x, domain = batch
        if domain is None:
            h = self.branch_a(x)
        else:
            h = self.branch_d(self.branch_b(x), domain=domain)
        return self.shared(h * 2 + 1)


def _branch_data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Rank 0 only takes branch B (domains 0 and 1), rank 1 only branch A."""
    batches = _batches([4, 4], seed=20 + rank)
    if rank == 0:
        return [(x * 2 + 10, torch.tensor([0, 1, 1, 0])) for x in batches]
    return [(x - 10, None) for x in batches]


def _branch_body(rank: int, world: int) -> dict[str, object]:
    model = _TwoBranches().double()
    with torch.no_grad():
        model.branch_d.running_mean[2].fill_(7.0)
        model.unused.running_mean.fill_(5.0)
    smallbn.precise_bn(
        model, _branch_data(rank), 8, forward=lambda m, b: m(b), batch_size=lambda b: len(b[0]),
        progress=False,
    )  # fmt: skip
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    short = nn.Sequential(nn.BatchNorm2d(3))
    try:  # rank 0's data runs out: every rank must raise, none may wait for rank 0
        smallbn.precise_bn(short, [torch.randn(4, 3, 2, 2)] * (1 if rank == 0 else 3), 8,
                           progress=False)  # fmt: skip
        error = ""
    except ValueError as exc:
        error = str(exc)
    return {"stats": stats, "error": error, "short_mean": short[0].running_mean.clone()}


def _normalized(x: torch.Tensor) -> torch.Tensor:
    """Training-mode BN without affine, written out (biased variance over N, H, W)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + EPS)


@pytest.mark.distributed
def test_precise_bn_two_processes_layers_off_some_paths_and_data_running_out(tmp_path):
    """Every rank gathers every layer (zeros where its data never reached one), so the
    statistics are those of the data that did reach it, on every rank; and a rank whose data
    runs out makes every rank raise instead of leaving the others in a collective."""
    results = run_world(_branch_body, 2, tmp_path, deadline_s=90.0)
    (b0, b1), (a0, a1) = _branch_data(0), _branch_data(1)
    domain_inputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    shared_inputs = [_normalized(x) * 2 + 1 for x, _ in (a0, a1)]
    for x, dom in (b0, b1):
        z, h = _normalized(x), torch.empty_like(x)
        for d in (0, 1):
            domain_inputs[d].append(z[dom == d])
            h[dom == d] = _normalized(z[dom == d])
        shared_inputs.append(h * 2 + 1)
    want = {
        "branch_a": _population([a0[0], a1[0]]),
        "branch_b": _population([b0[0], b1[0]]),
        "shared": _population(shared_inputs),
    }
    for rank, result in enumerate(results):
        stats = result["stats"]
        for layer, (mean, var) in want.items():
            torch.testing.assert_close(stats[f"{layer}.running_mean"], mean, msg=f"{rank} {layer}")
            torch.testing.assert_close(stats[f"{layer}.running_var"], var, msg=f"{rank} {layer}")
        for d in (0, 1):
            mean, var = _population(domain_inputs[d])
            torch.testing.assert_close(stats["branch_d.running_mean"][d], mean)
            torch.testing.assert_close(stats["branch_d.running_var"][d], var)
        assert torch.all(stats["branch_d.running_mean"][2] == 7.0)  # no samples: untouched
        assert torch.all(stats["unused.running_mean"] == 5.0)  # on no path: untouched
        assert "ran out before num_samples=8 on 1 of 2 processes (rank 0 had 4" in result["error"]
        assert torch.all(result["short_mean"] == 0.0)


@pytest.mark.parametrize(
    "batch",
    [
        {"mask": torch.zeros(2, 2, 5, 5, dtype=torch.float64), "image": torch.ones(2, 2, 5, 5)},
        [torch.randn(2, 5, 5, dtype=torch.float64) for _ in range(3)],  # detection-style images
        (torch.tensor([3, 1]), torch.randn(2, 2, 5, 5, dtype=torch.float64)),  # (label, image)
        torch.tensor([[1, 2]]),  # integer data
    ],
    ids=["dict", "list-of-images", "label-image", "integer"],
)
def test_precise_bn_never_guesses_the_input(batch) -> None:
    # A dict used to give the statistics of its first tensor (the mask); a list of images or
    # a (label, image) pair failed inside the model with a foreign error.
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"cannot tell the model input.*forward=lambda model"):
        smallbn.precise_bn(model, [batch], num_samples=2, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value)


def test_precise_bn_explicit_forward_reads_any_batch() -> None:
    model = _model()
    batches = _batches([4, 4])
    wrapped = [{"mask": torch.zeros_like(x), "image": x} for x in batches]
    smallbn.precise_bn(
        model,
        wrapped,
        num_samples=8,
        forward=lambda m, b: m(b["image"]),
        batch_size=lambda b: len(b["image"]),
        progress=False,
    )
    (mean1, var1), _ = _naive_reference(_model(), batches)
    torch.testing.assert_close(model[2].running_mean, mean1)
    torch.testing.assert_close(model[2].running_var, var1)


@pytest.mark.parametrize("num_samples", [0, -5])
def test_precise_bn_rejects_non_positive_num_samples(num_samples: int) -> None:
    with pytest.raises(ValueError, match="num_samples .* must be >= 1"):
        smallbn.precise_bn(_model(), _batches([2]), num_samples=num_samples, progress=False)
