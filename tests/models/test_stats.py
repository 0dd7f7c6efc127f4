"""Parameter and MAC counts from meta-device builds, checked against known figures."""
import pytest
import torchvision

from keel.models.stats import model_stats


def test_resnet18_matches_torchvision_params_and_macs():
    st = model_stats("resnet18", num_classes=1000)
    tv = torchvision.models.resnet18()
    assert round(st["params_m"] * 1e6) == sum(p.numel() for p in tv.parameters())
    # torchvision documents 1.81 GFLOPS (multiply-accumulates) for resnet18 at 224 px
    assert abs(st["gmacs"] - 1.814) < 0.005
    assert st["img_size"] == 224 and [f["stride"] for f in st["feature_info"]] == [4, 8, 16, 32]


def test_vit_base_macs_match_deit_figure_and_scale_with_resolution():
    st = model_stats("vit_base_patch16")
    assert abs(st["gmacs"] - 17.6) / 17.6 < 0.01          # DeiT-B: 17.6 GMACs at 224
    big = model_stats("vit_base_patch16", img_size=448)
    assert big["gmacs"] > 4 * st["gmacs"]                  # 4x tokens, plus quadratic attention


def _fresh_vs_table(names):
    import json

    from keel.models.stats import TABLE
    table = json.loads(TABLE.read_text())
    for name in names:
        for classes in (0, 1000):
            assert table[f"{name}@{classes}"] == model_stats(name, num_classes=classes), (name, classes)


def test_the_table_keel_models_reads_is_a_fresh_count_for_small_models():
    _fresh_vs_table(["resnet10_cifar", "vit_tiny_patch4_32", "swin_tiny"])


@pytest.mark.slow
def test_the_table_covers_every_model_with_a_fresh_count():
    """If this fails after a model changed: python -m keel.models.stats"""
    from keel import list_models
    _fresh_vs_table(list_models())
