import json

import numpy as np
import pytest

from diffswarm.data import PARTITION_FORMAT, Partition, load_dataset, make_partition


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def part(digits):
    return make_partition(digits, k=4, seed=0)


def test_partition_is_deterministic(digits, part):
    again = make_partition(digits, k=4, seed=0)
    assert again.partition_hash == part.partition_hash and len(part.partition_hash) == 64
    assert np.array_equal(again.assignments, part.assignments)
    other = make_partition(digits, k=4, seed=1)
    assert other.partition_hash != part.partition_hash  # the seed is part of the identity


def test_partition_fields(digits, part):
    assert part.assignments.shape == (len(digits),) and part.assignments.dtype == np.int64
    assert part.centroids.shape[0] == 4 and part.pca_components.shape == (part.centroids.shape[1], 64)
    assert part.image_shape == (1, 8, 8) and part.num_classes == 10
    assert np.isclose(part.shares().sum(), 1.0) and (part.shares() > 0.02).all()
    assert sum(len(part.indices(c)) for c in range(4)) == len(digits)
    for c, s in enumerate(part.cluster_summary):
        assert s["count"] == len(part.indices(c)) and sum(s["class_hist"]) == s["count"]
    with pytest.raises(ValueError):
        part.indices(4)


def test_assign_matches_training_assignments(digits, part):
    agree = (part.assign(digits.images) == part.assignments).mean()
    assert agree > 0.95
    assert part.features(digits.images[:5]).shape == (5, part.centroids.shape[1])
    with pytest.raises(ValueError, match="images must be"):
        part.assign(digits.images[:, :, :4])


def test_save_load_round_trip(tmp_path, digits, part):
    path = tmp_path / "sub" / "partition.json"
    part.save(path)
    assert json.loads(path.read_text())["format"] == PARTITION_FORMAT
    loaded = Partition.load(path)
    assert loaded.partition_hash == part.partition_hash
    assert np.array_equal(loaded.assignments, part.assignments)
    assert np.array_equal(loaded.assign(digits.images), part.assign(digits.images))
    assert loaded.cluster_summary == part.cluster_summary and loaded.image_shape == part.image_shape
    loaded.check_dataset(digits)
    with pytest.raises(ValueError, match="rebuild"):
        loaded.check_dataset(load_dataset("digits", "test"))
    assert [p.name for p in path.parent.iterdir()] == ["partition.json"]  # no temp file left


def test_corrupt_manifest_is_rejected(tmp_path, part):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        Partition.load(path)
    d = part.to_dict()
    path.write_text(json.dumps({**d, "format": "something/9"}))
    with pytest.raises(ValueError, match="format"):
        Partition.load(path)
    tampered = dict(d, assignments=[(a + 1) % 4 for a in d["assignments"]])
    path.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="partition_hash"):
        Partition.load(path)
    missing = {k: v for k, v in d.items() if k != "centroids"}
    path.write_text(json.dumps(missing))
    with pytest.raises(ValueError, match="corrupt"):
        Partition.load(path)
