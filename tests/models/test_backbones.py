"""Any backbone: torchvision and timm models by name, any nn.Module through the API; trained,
loaded, exported (ONNX, checked against PyTorch) and embedded; weights for fine-tuning that
the original library loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from cli_helpers import TINY, assert_one_line_error, run_cli, tiny_args
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ressl import BackboneBuild, ConfigError, build_backbone, load_encoder, train
from ressl.models.backbones import start_batchnorm_
from ressl.runs.checkpoint import read_metadata


def test_resnet18_is_torchvisions_with_the_stated_stem():
    torch.manual_seed(0)
    ours = build_backbone("resnet18", 1, 28)
    torch.manual_seed(0)
    named = build_backbone("torchvision:resnet18", 1, 28)
    assert ours.state_dict().keys() == named.state_dict().keys()
    assert all(
        torch.equal(a, b) for a, b in zip(ours.state_dict().values(), named.state_dict().values())
    )
    build = ours.ressl_build
    assert (build.library, build.name, build.feature_dim) == ("torchvision", "resnet18", 512)
    assert [p for p, _, _ in build.changes] == ["conv1", "maxpool", "fc"]
    assert build.changes[0][1].startswith("Conv2d(1, 64, kernel_size=(3, 3), stride=(1, 1)")
    # above 64 px the ImageNet stem stays; only the input channels change
    large = build_backbone("resnet18", 1, 96).ressl_build
    assert [p for p, _, _ in large.changes] == [
        "conv1",
        "fc",
    ] and "kernel_size=(7, 7)" in large.changes[0][1]


def test_a_torchvision_model_takes_the_channels_and_gives_deterministic_features():
    net = build_backbone("torchvision:mobilenet_v3_small", in_channels=1, image_size=32)
    build = net.ressl_build
    assert build.feature_dim == 1024 and net.out_dim == 1024
    # the first conv takes one channel; the classifier and the dropout before it are gone
    assert [(p, why) for p, _, why in build.changes] == [
        ("features.0.0", "1-channel input"),
        ("classifier.2", "classifier removed"),
        ("classifier.3", "classifier removed"),
    ]
    x = torch.randn(4, 1, 32, 32)
    net.train()
    assert net(x).shape == (4, 1024) and torch.equal(net(x), net(x))  # no dropout left
    assert BackboneBuild.from_json(build.to_json()) == build


def test_eval_mode_keeps_the_scale_of_training_from_the_start():
    # torchvision's MobileNetV3: BatchNorm momentum 0.01 and depthwise convolutions whose
    # outputs have variance 1e-2..1e-5. Had its running statistics started at PyTorch's
    # (0, 1), eval mode would shrink the features about 1e8-fold (after a 7-step run:
    # the same features for every image, kNN at chance)
    net = build_backbone("torchvision:mobilenet_v3_small", 1, 28)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.momentum for m in norms} == {0.01}  # the model's own, restored
    assert all(int(m.num_batches_tracked) == 0 for m in norms)  # no training batch seen
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = net.train()(x)
        evaluated = net.eval()(x)
    ratio = evaluated.norm(dim=1).mean() / trained.norm(dim=1).mean()
    assert 0.5 < ratio < 2, ratio


def test_start_batchnorm_sets_the_statistics_of_noise_and_leaves_the_rng():
    conv = nn.Conv2d(1, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight.mul_(1e-3)  # a variance of about 1e-7, far from the initial 1
    net = nn.Sequential(conv, nn.BatchNorm2d(2, momentum=0.01), nn.Dropout(0.5)).eval()
    rng = torch.get_rng_state()
    start_batchnorm_(net, 1, 8)
    assert torch.equal(torch.get_rng_state(), rng) and not net.training
    # a 6x6 map: 36 values per image, ceil(256 / 36) = 8 images
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = conv(noise).transpose(0, 1).flatten(1)  # (2, B*6*6)
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, y.mean(1))
    torch.testing.assert_close(bn.running_var, y.var(1))  # unbiased, as PyTorch keeps it
    assert bn.momentum == 0.01 and int(bn.num_batches_tracked) == 0


def test_vits_are_sized_to_the_images():
    build = build_backbone("torchvision:vit_b_32", 3, 64).ressl_build
    assert build.kwargs == {"image_size": 64} and build.feature_dim == 768


def test_timm_models_by_name():
    pytest.importorskip("timm")
    vit = build_backbone("timm:test_vit", 3, 32)
    assert vit.ressl_build.kwargs == {"img_size": 32, "in_chans": 3, "num_classes": 0}
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, vit.out_dim)
    net = build_backbone("timm:test_resnet", 1, 24)
    assert net(torch.randn(2, 1, 24, 24)).shape == (2, 96)


@pytest.mark.parametrize(
    "name, size, message",
    [
        (
            "torchvision:resnet_nine",
            32,
            "torchvision:resnet_nine is not a torchvision classification model",
        ),
        ("torchvision:squeezenet1_0", 32, "has no final Linear layer (its classifier) to remove"),
        ("torchvision:alexnet", 32, "torchvision:alexnet cannot take 3x32x32 images: "),
        ("timm:no_such_net", 32, "timm:no_such_net is not a timm model"),
        ("custom:MyNet", 32, "custom:MyNet was a module given through the API"),
        ("vit", 32, "backbone must be one of small, resnet18, resnet50, torchvision:NAME"),
    ],
)
def test_a_backbone_that_cannot_be_built_says_why(name, size, message):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    with torch.device("meta"), pytest.raises(ValueError) as e:
        build_backbone(name, 3, size)
    assert message in str(e.value)


class MapNet(nn.Module):
    """A module whose output is a feature map, not (batch, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)


class TinyNet(nn.Module):
    """A user's own backbone: (B, 3, H, W) -> (B, 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.norm = nn.BatchNorm2d(12)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3))


def test_a_module_must_return_batch_by_features():
    with pytest.raises(
        ValueError, match=r"gives \(1, 8, 14, 14\) for one 3x16x16 image; a backbone must"
    ):
        build_backbone(MapNet(), 3, 16)
    assert build_backbone(TinyNet(), 3, 16).ressl_build.feature_dim == 12


def test_a_module_trains_through_the_api_and_is_needed_to_rebuild(tmp_path, tiny_settings, capsys):
    mine = TinyNet()
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    settings = dict(tiny_settings, out=str(tmp_path / "run"), epochs=1)
    del settings["backbone"]
    ckpt = train(backbone=mine, **settings)
    assert all(torch.equal(v, mine.state_dict()[k]) for k, v in before.items())  # a copy trained
    meta = read_metadata(ckpt)
    assert BackboneBuild.from_json(meta["backbone_build"]).spec == "custom:TinyNet"
    with pytest.raises(ValueError, match="custom:TinyNet was a module given through the API"):
        load_encoder(ckpt)
    encoder, found = load_encoder(ckpt, backbone=TinyNet())
    assert found["backbone"] == "custom:TinyNet"
    assert encoder.features(torch.randn(2, 3, 16, 16)).shape == (2, 12)
    with pytest.raises(Exception, match="settings describe|is not part of|has no tensor"):
        load_encoder(ckpt, backbone=MapNet())  # another architecture: its tensors do not fit
    # resuming needs the module too; with it the run goes on
    with pytest.raises(ConfigError, match=r"ressl.train\(resume=..., backbone=module\)"):
        train(resume=tmp_path / "run", epochs=2)
    train(resume=tmp_path / "run", epochs=2, backbone=TinyNet())
    assert read_metadata(ckpt)["epoch"] == "2"
    # the command line says where to go, in one line
    code, _, err = run_cli(capsys, "export", tmp_path / "run", "-o", tmp_path / "e.onnx")
    assert_one_line_error(code, err, "custom:TinyNet was a module given through the API")
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run", "--epochs", "3")
    assert_one_line_error(code, err, "backbone=module")


def _rebuilt_by_torchvision(path) -> nn.Module:
    """What a user writes to fine-tune: torchvision's model, the changes ressl states, the weights."""
    net = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    net.features[0][0] = nn.Conv2d(
        3, 16, kernel_size=3, stride=2, padding=1, bias=False
    )  # (3 channels: unchanged)
    net.classifier[2] = nn.Identity()
    net.classifier[3] = nn.Identity()
    net.load_state_dict(load_file(path))  # strict: every name and shape as torchvision has it
    return net.eval()


@pytest.fixture(scope="module")
def mobilenet_run(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("mobilenet") / "run"
    train(
        **dict(
            TINY,
            dataset=f"folder:{image_folder}",
            backbone="torchvision:mobilenet_v3_small",
            image_size=32,
            epochs=1,
            out=str(out),
        )
    )
    return out


def test_a_torchvision_run_exports_weights_the_library_loads(capsys, tmp_path, mobilenet_run):
    out = tmp_path / "backbone.safetensors"
    code, stdout, err = run_cli(capsys, "export", mobilenet_run, "-o", out)
    assert code == 0, err
    assert (
        "load it without ressl:" in stdout
        and "get_model('mobilenet_v3_small', weights=None)" in stdout
    )
    encoder, _ = load_encoder(mobilenet_run)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_rebuilt_by_torchvision(out)(x), encoder.features(x), atol=1e-6)
    # the code in the file's metadata does the same, without ressl
    scope: dict = {}
    with safe_open(str(out), "pt") as f:
        code_text = f.metadata()["code"]
    exec(code_text.replace("'backbone.safetensors'", repr(str(out))), scope)
    with torch.no_grad():
        assert torch.allclose(scope["net"].eval()(x), encoder.features(x), atol=1e-6)
    # ressl info describes the weights file
    code, stdout, err = run_cli(capsys, "info", out)
    assert code == 0, err
    assert (
        "the student backbone of last.safetensors" in stdout
        and "torchvision mobilenet_v3_small" in stdout
    )
    assert f"net.load_state_dict(load_file({str(out.resolve())!r}))" in stdout
    # the checkpoint itself is never the target
    code, _, err = run_cli(
        capsys, "export", mobilenet_run, "-o", mobilenet_run / "last.safetensors", "--overwrite"
    )
    assert_one_line_error(code, err, "is the checkpoint itself")


def test_a_torchvision_run_exports_to_onnx_and_embeds(
    capsys, tmp_path, mobilenet_run, image_folder
):
    onnx_file = tmp_path / "m.onnx"
    code, stdout, err = run_cli(capsys, "export", mobilenet_run, "-o", onnx_file)
    assert code == 0 and "verified" in stdout, err
    code, stdout, err = run_cli(
        capsys, "embed", onnx_file, image_folder / "test", "-o", tmp_path / "e.npz"
    )
    assert code == 0, err
    got = np.load(tmp_path / "e.npz")
    images = len(list((image_folder / "test").rglob("*.png")))
    assert got["embeddings"].shape == (images, 1024)
    assert np.allclose(np.linalg.norm(got["embeddings"], axis=1), 1.0, atol=1e-4)


def test_timm_run_trains_exports_and_evaluates_from_the_command_line(
    capsys, tmp_path, image_folder
):
    pytest.importorskip("timm")
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys, *tiny_args(image_folder, run, backbone="timm:test_vit", epochs=1, image_size=32)
    )
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "export", run, "-o", tmp_path / "v.onnx")
    assert code == 0 and "verified" in stdout, err
    code, stdout, err = run_cli(
        capsys, "eval", "knn", tmp_path / "v.onnx", "--dataset", f"folder:{image_folder}"
    )
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "export", run, "-o", tmp_path / "v.safetensors")
    assert code == 0 and "timm.create_model('test_vit', pretrained=False, img_size=32" in stdout, (
        err
    )


def test_a_backbone_error_names_the_flag(capsys, tmp_path, image_folder):
    code, _, err = run_cli(
        capsys, *tiny_args(image_folder, tmp_path / "r", backbone="torchvision:alexnet")
    )
    assert_one_line_error(code, err, "--backbone torchvision:alexnet cannot take 3x16x16 images")
    assert not (tmp_path / "r").exists()


def test_export_refuses_other_suffixes(capsys, tmp_path, mobilenet_run):
    code, _, err = run_cli(capsys, "export", mobilenet_run, "-o", tmp_path / "x.pt")
    assert_one_line_error(code, err, "-o must end in .onnx (the ONNX encoder) or .safetensors")


class TinyViT(nn.Module):
    """Patches, one transformer layer (nn.MultiheadAttention's fused inference path), mean."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 16, 4, stride=4)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (B, N, 16)
        return self.block(tokens).mean(dim=1)


def test_attention_models_export_to_onnx(tmp_path):
    from ressl.export.exporter import export_onnx

    report = export_onnx(
        TinyViT().eval(),
        tmp_path / "vit.onnx",
        image_size=16,
        channels=3,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    assert report.verification.passed


class Scaled(nn.Module):
    """A module holding a plain tensor attribute (not a buffer): no meta-device copy of it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.scale = torch.full((1, 3, 1, 1), 2.0)

    def forward(self, x):
        return self.conv(x * self.scale).mean(dim=(2, 3))


def test_modules_that_cannot_run_on_the_meta_device_still_train(tmp_path, tiny_settings):
    settings = dict(tiny_settings, out=str(tmp_path / "run"), epochs=1)
    del settings["backbone"]
    ckpt = train(backbone=Scaled(), **settings)
    encoder, _ = load_encoder(ckpt, backbone=Scaled())
    assert encoder.features(torch.rand(2, 3, 16, 16)).shape == (2, 6)


def test_googlenet_gives_features_in_train_mode_and_a_library_name_is_not_ressls():
    net = build_backbone("torchvision:googlenet", 3, 32)
    assert net.ressl_build.kwargs == {"aux_logits": False, "init_weights": True}
    assert [p for p, _, _ in net.ressl_build.changes] == ["dropout", "fc"]
    net.train()
    assert isinstance(net(torch.rand(2, 3, 32, 32)), torch.Tensor)  # no aux-logits tuple
    with pytest.raises(
        ValueError, match="torchvision:small is not a torchvision classification model"
    ):
        build_backbone("torchvision:small", 3, 32)


def test_a_new_family_is_one_entry():
    """A family registered in one place is parsed, checked, listed, built and rebuilt."""
    from ressl.models.families import (
        FAMILIES,
        BackboneFamily,
        register_family,
        unregister_family,
    )
    from ressl.rules import BACKBONE, BackboneNames, backbone_help, split_backbone

    def build(name, in_channels, image_size, width, spec):
        pool = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.AdaptiveAvgPool2d(1))
        return nn.Sequential(pool, nn.Flatten()), {"width": width}, []

    def code(built):
        return ["import torch", "from safetensors.torch import load_file", "", "net = toy()"]

    toy = BackboneFamily(BackboneNames("toy", "a toy net as toy:NAME"), build, lambda: "9.9", code)
    assert split_backbone("toy:tiny") is None
    with pytest.raises(ConfigError, match="backbone must be one of .* or timm:NAME, got"):
        from ressl import TrainConfig

        TrainConfig(backbone="toy:tiny")
    register_family(toy)
    try:
        assert FAMILIES["toy"] is toy and split_backbone("toy:tiny") == ("toy", "tiny")
        assert BACKBONE.expect.endswith("timm:NAME or toy:NAME")
        assert backbone_help().endswith("; a toy net as toy:NAME.")
        from ressl import TrainConfig

        assert TrainConfig(backbone="toy:tiny").backbone == "toy:tiny"
        with pytest.raises(ValueError, match="exist already"):
            register_family(toy)
        net = build_backbone("toy:tiny", 1, 16, width=5)
        built = net.ressl_build
        assert (built.library, built.name, built.version, built.feature_dim) == (
            "toy",
            "tiny",
            "9.9",
            5,
        )
        assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 5)
        assert "net = toy()" in built.code() and "load_file('backbone.safetensors')" in built.code()
        with pytest.raises(ValueError, match="one of .*toy:NAME; got 'toy'"):
            build_backbone("toy", 1, 16)
    finally:
        unregister_family("toy")
    assert "toy" not in FAMILIES and split_backbone("toy:tiny") is None
    assert not BACKBONE.expect.endswith("toy:NAME")


def test_the_family_tables_agree_and_say_what_they_take():
    from ressl.models.families import FAMILIES
    from ressl.rules import BACKBONE, BACKBONE_FAMILIES, BUILTIN_BACKBONES

    assert FAMILIES.keys() == BACKBONE_FAMILIES.keys() == {"ressl", "torchvision", "timm", "custom"}
    assert all(FAMILIES[n].names is BACKBONE_FAMILIES[n] for n in FAMILIES)
    assert BUILTIN_BACKBONES == ("small", "resnet18", "resnet50")
    assert BACKBONE.expect == "one of small, resnet18, resnet50, torchvision:NAME or timm:NAME"
    with pytest.raises(ValueError, match="custom:Net was a module given through the API"):
        build_backbone("custom:Net")
    assert build_backbone("small", 1, 8).ressl_build.code().count("SmallCNN(in_channels=1") == 1
