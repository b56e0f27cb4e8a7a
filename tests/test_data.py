import numpy as np
import pytest
import torch
from PIL import Image

from diffswarm.data import DATASET_NAMES, ImageDataset, default_dataset_name, load_dataset
from diffswarm.data.datasets import FASHION_DEFAULT_DIR, _fashion_available

fashion_missing = not _fashion_available(FASHION_DEFAULT_DIR)


def _check_range(ds: ImageDataset):
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.images.min() < -0.9 and ds.images.max() > 0.9  # the full range is used


def test_digits_shapes_range_and_disjoint_split():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert tr.shape == (1, 8, 8) and len(tr) == 1437 and len(te) == 1797 - 1437
    assert tr.num_classes == 10 and tr.class_names[3] == "3" and tr.dataset_id == "digits:8"
    _check_range(tr)
    assert set(tr.labels.tolist()) == set(range(10))
    # No test image appears in train (the split is by index; digits has no exact duplicates across it).
    rows_tr = {r.tobytes() for r in tr.images.reshape(len(tr), -1).numpy()}
    assert not any(r.tobytes() in rows_tr for r in te.images.reshape(len(te), -1).numpy())
    # Deterministic.
    again = load_dataset("digits", "train")
    assert again.content_hash == tr.content_hash and len(tr.content_hash) == 64


def test_digits_resize_changes_id_and_shape():
    ds = load_dataset("digits", "test", size=16)
    assert ds.shape == (1, 16, 16) and ds.dataset_id == "digits:16"
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0


@pytest.mark.skipif(fashion_missing, reason=f"Fashion-MNIST files not in {FASHION_DEFAULT_DIR}")
def test_fashion_loads(monkeypatch):
    monkeypatch.delenv("DIFFSWARM_FASHION_DIR", raising=False)
    te = load_dataset("fashion", "test")
    assert len(te) == 10_000 and te.shape == (1, 28, 28) and te.dataset_id == "fashion:28"
    assert te.class_names[9] == "Ankle boot" and te.num_classes == 10
    assert torch.bincount(te.labels).tolist() == [1000] * 10
    _check_range(te)
    small = load_dataset("fashion", "test", size=14)
    assert small.shape == (1, 14, 14) and small.dataset_id == "fashion:14"
    assert default_dataset_name() == "fashion"


def test_fashion_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSWARM_FASHION_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion")
    assert default_dataset_name() == "digits"


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="fashion"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")
    assert set(DATASET_NAMES) == {"fashion", "digits", "folder"}


def _write_images(d, n, color, size=(20, 12)):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        arr = np.clip(rng.normal(color, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"img{i:02d}.png")


def test_folder_with_class_subfolders(tmp_path):
    _write_images(tmp_path / "cats", 10, 40)
    _write_images(tmp_path / "dogs", 10, 220)
    tr = load_dataset("folder", "train", root=str(tmp_path), size=8)
    te = load_dataset("folder", "test", root=str(tmp_path), size=8)
    assert len(tr) + len(te) == 20 and len(te) == 2
    assert tr.shape == (1, 8, 8) and tr.class_names == ["cats", "dogs"] and tr.num_classes == 2
    # Labels follow the folder: dark images are class 0, bright ones class 1.
    means = tr.images.mean((1, 2, 3))
    assert ((means > 0) == (tr.labels == 1)).all()
    rgb = load_dataset("folder", "train", root=str(tmp_path), size=8, channels=3)
    assert rgb.shape == (3, 8, 8) and rgb.dataset_id.endswith(":8:c3")
    assert torch.equal(rgb.labels, tr.labels)  # same deterministic split


def test_folder_unlabeled(tmp_path):
    _write_images(tmp_path, 5, 128)
    ds = load_dataset("folder", root=str(tmp_path))
    assert ds.num_classes == 0 and ds.class_names == [] and (ds.labels == 0).all()
    assert ds.shape == (1, 32, 32) and len(ds) == 4


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        load_dataset("folder", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("folder", root=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder")
    _write_images(tmp_path, 3, 100)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        for split in ("train", "test"):
            load_dataset("folder", split, root=str(tmp_path))
