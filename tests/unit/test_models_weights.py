"""Pretrained weights: torchvision-format checkpoints served over file:// into a temporary
$TORCH_HOME, hash checks, strict loading, an independent functional forward, channel
adaptation, 2D -> 3D inflation, the small stem and MedicalNet's type-A shortcuts.

Checkpoints are made here from the torchvision architecture's key names and shapes (written
out independently below, no torchvision import) and seeded random tensors; nothing is
downloaded from the network.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medres.errors import WeightsError
from medres.models import build_model, load_pretrained, read_state_dict, weights_meta
from medres.models.adapt import adapt_input_conv, inflate_kernel, resize_kernel
from medres.models.hub import cache_dir
from medres.models.weights import channel_mixing, get_weight_spec

_TV_LAYERS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}


@functools.cache
def tv_state_dict(
    depth: int,
    num_classes: int = 1000,
    seed: int = 0,
    in_ch: int = 3,
    nbt: bool = False,
    meta: bool = False,
):
    """Key names/shapes of torchvision's resnet<depth> (v1.5), seeded random values.

    BN statistics are random but sane so that activations stay O(1) through the net.
    ``nbt`` adds ``num_batches_tracked`` (torchvision's V1 files predate it). Cached:
    callers must not modify the returned tensors. ``meta`` gives shape-only meta tensors.
    """
    block, layers = _TV_LAYERS[depth]
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def randn(*shape):
        return torch.empty(shape, device="meta") if meta else torch.randn(*shape, generator=g)

    def rand(*shape):
        return torch.empty(shape, device="meta") if meta else torch.rand(*shape, generator=g)

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = randn(o, i, k, k) * (1.0 / (i * k * k)) ** 0.5

    def bn(name, c):
        sd[f"{name}.weight"] = 0.5 + 0.5 * rand(c)
        sd[f"{name}.bias"] = 0.1 * randn(c)
        sd[f"{name}.running_mean"] = 0.1 * randn(c)
        sd[f"{name}.running_var"] = 0.5 + rand(c)
        if nbt:
            sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1", 64, in_ch, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, n) in enumerate(zip([64, 128, 256, 512], layers, strict=True), 1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            if block == "basic":
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                out = planes
            else:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
                out = planes * 4
            if b == 0 and (stride != 1 or inplanes != out):
                conv(f"{p}.downsample.0", out, inplanes, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    sd["fc.weight"] = randn(num_classes, inplanes) * inplanes**-0.5
    sd["fc.bias"] = 0.01 * randn(num_classes)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int) -> torch.Tensor:
    """torchvision's ResNet forward written with torch.nn.functional from the state dict."""
    block, layers = _TV_LAYERS[depth]

    def bn(t, p):
        return F.batch_norm(
            t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
            training=False, eps=1e-5,
        )  # fmt: skip

    x = F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)
    x = F.max_pool2d(F.relu(bn(x, "bn1")), kernel_size=3, stride=2, padding=1)
    for stage, n in enumerate(layers, 1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            if block == "basic":
                out = F.relu(
                    bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1")
                )
                out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            else:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(
                    bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2")
                )
                out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                ds = F.conv2d(
                    x,
                    sd[f"{p}.downsample.0.weight"],
                    sd.get(f"{p}.downsample.0.bias"),
                    stride=stride,
                )
                short = bn(ds, f"{p}.downsample.1")
            else:
                short = x
            x = F.relu(out + short)
    x = x.mean(dim=(2, 3))
    return F.linear(x, sd["fc.weight"], sd["fc.bias"])


@contextlib.contextmanager
def _capture_medres_logs(caplog):
    """Capture medres' INFO logs even after a CLI test set propagate=False on "medres"."""
    logger = logging.getLogger("medres")
    old_level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _serve(
    monkeypatch, tmp_path: Path, sd, arch="resnet18", source="imagenet", name=None, legacy=False
):
    """Save ``sd`` as a .pth, point the URL override at it (file://) and pin its sha256."""
    spec = get_weight_spec(source, arch)
    src_dir = tmp_path / "mirror"
    src_dir.mkdir(exist_ok=True)
    path = src_dir / (name or spec.filename)
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    monkeypatch.setenv(f"MEDRES_WEIGHTS_URL_{spec.env_key}", path.as_uri())
    monkeypatch.setenv(f"MEDRES_WEIGHTS_SHA256_{spec.env_key}", _sha(path))
    return path


# --- architecture: torchvision keys and shapes ----------------------------------------------


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_state_dict_keys_and_shapes_are_torchvisions(depth):
    with torch.device("meta"):
        model = build_model(f"resnet{depth}", 2, 3, 1000, stem="standard")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tv = {k: tuple(v.shape) for k, v in tv_state_dict(depth, nbt=True, meta=True).items()}
    assert ours == tv


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
@pytest.mark.parametrize(
    ("dims", "in_ch", "stem"), [(3, 1, "standard"), (3, 2, "small"), (2, 1, "small")]
)
def test_imagenet_layout_adapts_to_every_depth_dims_and_stem(depth, dims, in_ch, stem):
    """Shape-level check on the meta device: every tensor is produced, with the model's shape."""
    from medres.models.adapt import adapt_state_dict

    with torch.device("meta"):
        model = build_model(f"resnet{depth}", dims, in_ch, 2, stem=stem)
    state = tv_state_dict(depth, meta=True)
    out, changes, new_head, folded = adapt_state_dict(state, model)
    target = model.state_dict()
    expected = {
        k for k in target if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    assert expected <= set(out) and new_head and not folded
    assert all(tuple(out[k].shape) == tuple(target[k].shape) for k in out)
    assert changes[0].startswith("conv1.weight: 3->")


# --- download, cache, hash -----------------------------------------------------------------


def test_file_url_download_verifies_and_loads_strictly(monkeypatch, tmp_path, caplog):
    sd = tv_state_dict(18)
    _serve(monkeypatch, tmp_path, sd)
    model = build_model("resnet18", 2, 3, 1000, stem="standard")
    with _capture_medres_logs(caplog):
        report = load_pretrained(model, "imagenet", arch="resnet18", dims=2)
    cached = cache_dir() / "resnet18-f37072fd.pth"
    assert Path(report.file) == cached and cached.is_file()
    assert not list(cache_dir().glob("*.part"))
    assert report.missing == () and report.unexpected == () and not report.new_head
    assert report.adapted == ()
    # the cached file itself loads strictly, and the model holds exactly its tensors
    model.load_state_dict(read_state_dict(cached), strict=True)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "weights: imagenet" in caplog.text
    # a second load is served from the cache (the URL is gone) and re-verified
    monkeypatch.setenv("MEDRES_WEIGHTS_URL_RESNET18_IMAGENET", (tmp_path / "gone.pth").as_uri())
    assert load_pretrained(build_model("resnet18", 2, 3, 1000, stem="standard"), "imagenet").loaded


def test_hash_check_rejects_corrupted_download(monkeypatch, tmp_path):
    path = _serve(monkeypatch, tmp_path, tv_state_dict(18))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte after the sha256 was pinned
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256") as exc:
        load_pretrained(build_model("resnet18", 2, 3, 1000), "imagenet")
    assert "\n" not in str(exc.value)
    assert not (cache_dir() / "resnet18-f37072fd.pth").exists()
    assert not list(cache_dir().glob(".*part"))


def test_published_hash_prefix_rejects_other_file_via_mirror(monkeypatch, tmp_path):
    """Without overrides the expected hash is the one in torchvision's file name."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.save(tv_state_dict(18), mirror / "resnet18-f37072fd.pth")
    monkeypatch.setenv("MEDRES_WEIGHTS_MIRROR", mirror.as_uri())
    with pytest.raises(WeightsError, match="expected f37072fd"):
        load_pretrained(build_model("resnet18", 2, 3, 1000), "imagenet")
    assert not (cache_dir() / "resnet18-f37072fd.pth").exists()


def test_corrupted_cached_file_is_refused(monkeypatch, tmp_path):
    dest = cache_dir() / "resnet34-b627a593.pth"
    dest.parent.mkdir(parents=True)
    torch.save(tv_state_dict(34), dest)
    with pytest.raises(WeightsError, match="delete it"):
        load_pretrained(build_model("resnet34", 2, 3, 2), "imagenet")


def test_offline_error_names_url_file_and_folder(monkeypatch):
    monkeypatch.setenv("MEDRES_OFFLINE", "1")
    with pytest.raises(WeightsError) as exc:
        load_pretrained(build_model("resnet50", 2, 3, 2), "imagenet")
    msg = str(exc.value)
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in msg
    assert str(cache_dir() / "resnet50-0676ba61.pth") in msg
    assert "$TORCH_HOME/hub/checkpoints/" in msg and "MEDRES_WEIGHTS_MIRROR" in msg
    assert "\n" not in msg


def test_network_failure_gives_the_same_instruction(monkeypatch):
    monkeypatch.setenv("MEDRES_OFFLINE", "0")
    monkeypatch.setenv("MEDRES_WEIGHTS_URL_RESNET18_IMAGENET", "http://127.0.0.1:9/resnet18.pth")
    with pytest.raises(WeightsError, match="download failed") as exc:
        load_pretrained(build_model("resnet18", 2, 3, 2), "imagenet")
    assert "resnet18-f37072fd.pth" in str(exc.value)


def test_unknown_source_and_2d_medicalnet_are_errors():
    with pytest.raises(WeightsError, match="imagenet, imagenet-v2, medicalnet, none"):
        load_pretrained(build_model("resnet18", 2, 3, 2), "imagenet21k")
    with pytest.raises(WeightsError, match="3D only"):
        load_pretrained(build_model("resnet18", 2, 1, 2), "medicalnet")
    with pytest.raises(WeightsError, match="exist for resnet50, resnet101, resnet152"):
        load_pretrained(build_model("resnet18", 2, 3, 2), "imagenet-v2")


def test_wrong_architecture_file_is_refused(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(tv_state_dict(34), path)
    with pytest.raises(WeightsError, match="deeper network"):
        load_pretrained(build_model("resnet18", 2, 3, 2), str(path))
    path50 = tmp_path / "r50.pth"
    torch.save(tv_state_dict(50), path50)
    with pytest.raises(WeightsError, match="another architecture"):
        load_pretrained(build_model("resnet18", 2, 3, 2), str(path50))


# --- forward pass equals an independent computation -------------------------------------------


@pytest.mark.parametrize("depth", [18, 50])
def test_forward_equals_functional_reference(tmp_path, depth):
    sd = tv_state_dict(depth)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    model = build_model(f"resnet{depth}", 2, 3, 1000, stem="standard").eval()
    load_pretrained(model, str(path))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(sd, x, depth)
        # the stem alone: conv1 + bn1 + relu + maxpool
        stem = model.maxpool(model.act(model.bn1(model.conv1(x))))
        bn = F.batch_norm(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3),
                          sd["bn1.running_mean"], sd["bn1.running_var"], sd["bn1.weight"],
                          sd["bn1.bias"], training=False, eps=1e-5)  # fmt: skip
        stem_ref = F.max_pool2d(F.relu(bn), 3, 2, 1)
    torch.testing.assert_close(stem, stem_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert ref.abs().max() > 1e-2  # not a degenerate all-zero comparison


def test_shortcut_bias_is_folded_exactly(tmp_path):
    """A file from a projection shortcut *with* bias (MONAI's default) loads exactly."""
    sd = dict(tv_state_dict(18))
    g = torch.Generator().manual_seed(3)
    for stage, planes in ((2, 128), (3, 256), (4, 512)):
        sd[f"layer{stage}.0.downsample.0.bias"] = 0.5 * torch.randn(planes, generator=g)
    path = tmp_path / "biased.pth"
    torch.save(sd, path)
    model = build_model("resnet18", 2, 3, 1000, stem="standard").eval()
    report = load_pretrained(model, str(path))
    assert report.unexpected == () and any("folded" in a for a in report.adapted)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, x, 18), rtol=1e-4, atol=1e-4)


def test_safetensors_and_model_dir_sources(tmp_path):
    from safetensors.torch import save_file

    from medres.models import ModelMeta, save_model_dir

    sd = tv_state_dict(18)
    save_file(sd, tmp_path / "w.safetensors")
    m = build_model("resnet18", 2, 3, 1000, stem="standard")
    assert load_pretrained(m, str(tmp_path / "w.safetensors")).missing == ()
    wmeta = weights_meta("imagenet", "resnet18", in_channels=3)
    meta = ModelMeta.for_model(m, preprocessing={"weights": wmeta})
    save_model_dir(tmp_path / "run" / "model", m, meta)
    m3d = build_model("resnet18", 3, 1, 2, stem="standard")
    report = load_pretrained(m3d, str(tmp_path / "run"))  # a run dir resolves to its model/
    assert report.new_head and any("inflated" in a for a in report.adapted)
    # the preprocessing travels with the weights, adapted to the new channel count
    assert report.meta["normalization"] == "mean_std" and report.meta["value_range"] == [0.0, 1.0]
    assert report.meta["mean"] == weights_meta("imagenet", "resnet18", in_channels=1)["mean"]
    w = sd["layer1.0.conv1.weight"]
    torch.testing.assert_close(m3d.state_dict()["layer1.0.conv1.weight"], inflate_kernel(w, 3))


# --- channel adaptation (in the style of timm's tests/test_input_conv.py) ---------------------


@pytest.mark.parametrize("in_chans", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dims", [2, 3])
def test_adapted_conv_on_replicated_input_equals_original(in_chans, dims):
    g = torch.Generator().manual_seed(in_chans)
    k = (7,) * dims
    weight = torch.randn(16, 3, *k, generator=g, dtype=torch.float64)
    x = torch.randn(2, 1, *([20] * dims), generator=g, dtype=torch.float64)
    conv = F.conv2d if dims == 2 else F.conv3d
    original = conv(x.expand(-1, 3, *([-1] * dims)), weight, stride=2, padding=3)
    adapted = adapt_input_conv(weight, in_chans)
    assert adapted.shape == (16, in_chans, *k)
    response = conv(x.expand(-1, in_chans, *([-1] * dims)), adapted, stride=2, padding=3)
    torch.testing.assert_close(response, original, rtol=1e-10, atol=1e-10)
    if in_chans == 1:  # timm: sum of the RGB kernels
        torch.testing.assert_close(adapted, weight.sum(dim=1, keepdim=True))
    if in_chans == 3:
        assert adapted is weight


def test_channel_mixing_columns_sum_to_one_and_meta_follows():
    for k in (1, 2, 3, 4, 5, 8):
        m = channel_mixing(k)
        for c in range(3):
            assert sum(row[c] for row in m) == pytest.approx(1.0)
    meta1 = weights_meta("imagenet", "resnet18", in_channels=1)
    assert meta1["mean"] == [pytest.approx((0.485 + 0.456 + 0.406) / 3, abs=1e-6)]
    assert meta1["channels"] == 3 and meta1["value_range"] == [0.0, 1.0]
    meta4 = weights_meta("imagenet", "resnet18", in_channels=4)
    assert meta4["mean"] == [0.485, 0.456, 0.406, 0.485]
    assert weights_meta("medicalnet", "resnet50")["normalization"] == "zscore_nonzero"
    assert weights_meta("none", "resnet50")["mean"] is None


def test_model_with_other_channel_count_gives_same_logits(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(tv_state_dict(18), path)
    m3 = build_model("resnet18", 2, 3, 1000, stem="standard").eval()
    m4 = build_model("resnet18", 2, 4, 1000, stem="standard").eval()
    load_pretrained(m3, str(path))
    report = load_pretrained(m4, str(path))
    assert report.adapted == ("conv1.weight: 3->4 input channels",)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            m4(x.expand(-1, 4, -1, -1)), m3(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5
        )


# --- 2D -> 3D inflation -------------------------------------------------------------------


def _replicate_depth_padding(model: nn.Module) -> None:
    """Pad the depth axis by replication instead of zeros (height/width keep zero padding).

    A depth-constant input then stays depth-constant through every layer, which removes
    the only difference between the I3D-inflated 3D network and the 2D one: zero padding
    at the first and last slices. (With zero padding, edge slices see fewer non-zero
    taps, and since every stride-2 stage mixes edge and interior positions, no position
    of layer4 is free of border effects at affordable depths; see the interior test
    below for the unpatched network.)
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.MaxPool3d)):
            pad = m.padding if isinstance(m.padding, tuple) else (m.padding,) * 3
            if pad[0] == 0:
                continue
            m.padding = (0, pad[1], pad[2])
            m.register_forward_pre_hook(
                lambda mod, args, p=pad[0]: (F.pad(args[0], (0, 0, 0, 0, p, p), mode="replicate"),)
            )


@pytest.mark.parametrize("depth", [18, 50])
def test_inflated_3d_net_on_depth_constant_volume_equals_2d(tmp_path, depth):
    path = tmp_path / "w.pth"
    torch.save(tv_state_dict(depth), path)
    m2 = build_model(f"resnet{depth}", 2, 3, 1000, stem="standard").eval()
    m3 = build_model(f"resnet{depth}", 3, 3, 1000, stem="standard").eval()
    load_pretrained(m2, str(path))
    load_pretrained(m3, str(path), inflate="i3d")
    _replicate_depth_padding(m3)
    x2 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x3 = x2.unsqueeze(2).expand(-1, -1, 4, -1, -1).contiguous()  # (N, C, D, H, W)
    with torch.no_grad():
        f2, f3 = m2.forward_features(x2), m3.forward_features(x3)
        logits2, logits3 = m2.fc(f2), m3.fc(f3)
    # float32 tolerance: the 3D convs sum 3x more terms, in another order
    torch.testing.assert_close(f3, f2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits3, logits2, rtol=1e-4, atol=1e-4)
    assert f2.abs().max() > 1e-2


def test_center_inflation_is_exact_even_with_zero_padding(tmp_path):
    """'center' uses only the middle depth tap, so zero padding in depth never matters."""
    path = tmp_path / "w.pth"
    torch.save(tv_state_dict(18), path)
    m2 = build_model("resnet18", 2, 3, 1000, stem="standard").eval()
    m3 = build_model("resnet18", 3, 3, 1000, stem="standard").eval()
    load_pretrained(m2, str(path))
    load_pretrained(m3, str(path), inflate="center")
    x2 = torch.randn(1, 3, 32, 32)
    x3 = x2.unsqueeze(2).expand(-1, -1, 3, -1, -1).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(
            m3.forward_features(x3), m2.forward_features(x2), rtol=1e-5, atol=1e-6
        )


def test_i3d_interior_positions_match_without_patching(tmp_path):
    """Unpatched zero padding: after the stem and layer1 (depth receptive field 43), output
    positions whose receptive field lies inside the volume equal the 2D activations."""
    path = tmp_path / "w.pth"
    sd = tv_state_dict(18)
    torch.save(sd, path)
    m2 = build_model("resnet18", 2, 3, 1000, stem="standard").eval()
    m3 = build_model("resnet18", 3, 3, 1000, stem="standard").eval()
    load_pretrained(m2, str(path))
    load_pretrained(m3, str(path))
    x2 = torch.randn(1, 3, 16, 16)
    x3 = x2.unsqueeze(2).expand(-1, -1, 64, -1, -1).contiguous()
    with torch.no_grad():
        a2 = m2.layer1(m2.maxpool(m2.act(m2.bn1(m2.conv1(x2)))))
        a3 = m3.layer1(m3.maxpool(m3.act(m3.bn1(m3.conv1(x3)))))
    assert a3.shape[2] == 16
    # output index i covers input slices [4i - 21, 4i + 21]: inside [0, 63] for i in 6..10
    for i in range(6, 11):
        torch.testing.assert_close(a3[:, :, i], a2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a3[:, :, 0], a2, rtol=1e-3, atol=1e-3)  # the border does differ


# --- small stem -----------------------------------------------------------------------------


def test_small_stem_loads_pretrained_with_resized_kernel(tmp_path, caplog):
    path = tmp_path / "w.pth"
    torch.save(tv_state_dict(18), path)
    model = build_model("resnet18", 2, 1, 2, image_size=28)
    assert model.config.stem == "small" and model.no_max_pool
    assert tuple(model.conv1.weight.shape) == (64, 1, 3, 3) and model.conv1.stride == (1, 1)
    with _capture_medres_logs(caplog):
        report = load_pretrained(model, str(path))
    assert "resized to 3x3" in report.adapted[0] and "resized to 3x3" in caplog.text
    assert report.new_head
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 2)
    # the DC gain of a constant kernel is kept
    assert resize_kernel(torch.ones(1, 1, 7, 7), (3, 3)).sum().item() == pytest.approx(49.0)
    assert resize_kernel(torch.ones(1, 1, 7, 7, 7), (3, 3, 3)).sum().item() == pytest.approx(343.0)


# --- MedicalNet -------------------------------------------------------------------------------


@functools.cache
def medicalnet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """MedicalNet resnet18 layout: 3D, 1 channel, type-A shortcuts, conv_seg, module. prefix."""
    sd2 = tv_state_dict(18, seed=seed, nbt=True)
    g = torch.Generator().manual_seed(seed + 100)
    out = {}
    for k, v in sd2.items():
        if ".downsample." in k or k.startswith("fc."):
            continue
        if v.ndim == 4:
            kk = v.shape[-1]
            i = 1 if k == "conv1.weight" else v.shape[1]
            v = torch.randn(v.shape[0], i, kk, kk, kk, generator=g) * (1.0 / (i * kk**3)) ** 0.5
        out[f"module.{k}"] = v
    out["module.conv_seg.0.weight"] = torch.randn(512, 32, 2, 2, 2, generator=g)
    return out


def _medicalnet_reference(sd, x):
    """MedicalNet's forward up to pooled features (type-A shortcuts, stride-2 stages)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}

    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-5)  # fmt: skip

    x = F.relu(bn(F.conv3d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool3d(x, 3, 2, 1)
    for stage in range(1, 5):
        for b in range(2):
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            out = F.relu(
                bn(F.conv3d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1")
            )
            out = bn(F.conv3d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = x
            if stride != 1:  # type A: subsample, zero-pad the new channels
                short = F.avg_pool3d(x, kernel_size=1, stride=stride)
                short = torch.cat([short, torch.zeros_like(short)], dim=1)
            x = F.relu(out + short)
    return x.mean(dim=(2, 3, 4))


def test_medicalnet_type_a_checkpoint_maps_exactly(monkeypatch, tmp_path):
    sd = medicalnet_state_dict(seed=12)
    # MedicalNet files: {"state_dict": ...} in torch's legacy (non-zip) format
    _serve(monkeypatch, tmp_path, {"state_dict": sd}, source="medicalnet", legacy=True)
    monkeypatch.delenv("MEDRES_WEIGHTS_SHA256_RESNET18_MEDICALNET")  # none is published
    model = build_model("resnet18", 3, 1, 2, stem="standard").eval()
    report = load_pretrained(model, "medicalnet", arch="resnet18", dims=3)
    assert sum("type-A shortcut" in a for a in report.adapted) == 3
    assert report.unexpected == ("conv_seg.0.weight",)  # the segmentation head is dropped
    assert report.notes and "dilation" in report.notes[0]
    pin = cache_dir() / "resnet_18_23dataset.pth.sha256"
    assert pin.read_text().strip() == _sha(cache_dir() / "resnet_18_23dataset.pth")
    x = torch.randn(1, 1, 16, 16, 16)
    ref = _medicalnet_reference(sd, x)
    with torch.no_grad():
        feats = model.forward_features(x)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)
    assert ref.abs().max() > 1e-2
    # a later corruption of the cached file is caught by the pinned digest
    cached = cache_dir() / "resnet_18_23dataset.pth"
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(WeightsError, match="sha256"):
        load_pretrained(build_model("resnet18", 3, 1, 2), "medicalnet")
