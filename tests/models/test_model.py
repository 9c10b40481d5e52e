import pytest
import torch

from ressl import BACKBONES, ProjectionHead, ReSSL, SmallCNN, build_backbone


@pytest.mark.parametrize(
    "name,channels,size,dim",
    [
        ("small", 1, 28, 256),
        ("small", 3, 32, 256),
        ("resnet18", 3, 32, 512),
        ("resnet18", 1, 28, 512),
        ("resnet18", 3, 96, 512),
    ],
)
def test_backbone_feature_shapes(name, channels, size, dim):
    net = build_backbone(name, channels, size, width=32).eval()
    with torch.no_grad():
        f = net(torch.randn(2, channels, size, size))
    assert f.shape == (2, dim) and net.out_dim == dim


def test_small_images_get_the_cifar_stem_and_large_the_imagenet_stem():
    small = build_backbone("resnet18", 3, 32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    large = build_backbone("resnet18", 3, 224)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)


def test_resnet50_feature_dim():
    assert build_backbone("resnet50", 3, 224).out_dim == 2048


def test_backbone_errors():
    with pytest.raises(ValueError, match="backbone must be one of small, resnet18, resnet50"):
        build_backbone("vit", 3, 32)
    with pytest.raises(ValueError, match="width must be >= 1"):
        SmallCNN(3, 0)
    with pytest.raises(ValueError, match="hidden_dim must be >= 1"):
        ProjectionHead(8, 0, 4)
    assert set(BACKBONES) == {"small", "resnet18", "resnet50"}


def test_ressl_teacher_is_a_frozen_copy_and_embeddings_are_unit():
    m = ReSSL(
        "small", in_channels=1, image_size=28, hidden_dim=32, embed_dim=16, queue_size=64, width=8
    )
    assert all(not p.requires_grad for p in m.teacher.parameters())
    for a, b in zip(m.student.parameters(), m.teacher.parameters()):
        assert torch.equal(a, b)
    z = m.student(torch.randn(4, 1, 28, 28))
    assert z.shape == (4, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(m.queue.norm(dim=1), torch.ones(64))


def test_queue_and_pointer_are_saved_with_the_weights():
    m = ReSSL(
        "small", in_channels=1, image_size=28, hidden_dim=8, embed_dim=4, queue_size=8, width=2
    )
    keys = torch.eye(4)[:3]
    m.enqueue_(keys)
    state = m.state_dict()
    assert int(state["queue_ptr"]) == 3 and torch.equal(state["queue"][:3], keys)
    m2 = ReSSL(
        "small", in_channels=1, image_size=28, hidden_dim=8, embed_dim=4, queue_size=8, width=2
    )
    m2.load_state_dict(state)
    assert torch.equal(m2.queue, m.queue) and int(m2.queue_ptr) == 3


@pytest.mark.parametrize(
    "name,image_size,crops,dim",
    [
        ("small", 32, (32, 28, 24, 20, 16), 64),
        ("resnet18", 32, (32, 28, 24, 20, 16), 512),
        ("resnet50", 224, (224, 192, 160, 128, 96), 2048),
    ],
)
def test_every_multicrop_size_goes_through_the_backbone(name, image_size, crops, dim):
    net = build_backbone(name, 3, image_size, width=8).eval()
    with torch.no_grad():
        for side in crops:
            assert net(torch.randn(2, 3, side, side)).shape == (2, dim), side
