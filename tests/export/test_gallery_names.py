"""One spelling per concept (issue 14): ``gallery`` (not ``database``) in
``export_saved_model`` and ``brute_force`` in the config.

The old keywords still work, with a ``DeprecationWarning`` and messages that
name the argument the caller gave; no SavedModel is written here (every
check runs before anything is embedded or written)."""

import numpy as np
import pytest

from tfdml.export import export_saved_model
from tfdml.models import build_embedding_model
from tfdml.training import config as config_lib

SMOKE = """
data: {source: synthetic, num_classes: 4, examples_per_class: 4, size: 8}
model: {image_size: 8, channels: 1, backbone: small_cnn, embedding_dim: 8}
loss: {name: ContrastiveLoss}
"""


@pytest.fixture(scope="module")
def encoder():
    return build_embedding_model((8, 8, 1), embedding_dim=8)


def test_new_names_in_messages(encoder, tmp_path):
    gal = np.eye(3, 8, dtype=np.float32)
    with pytest.raises(ValueError, match="`gallery_labels`"):
        export_saved_model(
            encoder, str(tmp_path), gallery=gal, gallery_labels=[0, 1]
        )
    with pytest.raises(ValueError, match="`gallery_ids`"):
        export_saved_model(
            encoder, str(tmp_path), gallery=gal, gallery_ids=["a"]
        )
    with pytest.raises(ValueError, match="`gallery`"):
        export_saved_model(encoder, str(tmp_path), gallery=gal[:, :5])
    with pytest.raises(ValueError, match="`gallery` .* or `gallery_images`"):
        export_saved_model(encoder, str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_old_names_warn_and_keep_their_messages(encoder, tmp_path):
    gal = np.eye(3, 8, dtype=np.float32)
    with pytest.warns(DeprecationWarning, match="gallery_labels="):
        with pytest.raises(ValueError, match="`database_labels`"):
            export_saved_model(
                encoder, str(tmp_path), database=gal, database_labels=[0, 1]
            )
    with pytest.raises(ValueError, match="not both"):
        export_saved_model(encoder, str(tmp_path), gallery=gal, database=gal)
    with pytest.raises(TypeError, match="databse"):
        export_saved_model(encoder, str(tmp_path), databse=gal)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("section", ["eval", "export"])
def test_config_index_spelled_brute_force(section):
    cfg = config_lib.load(text=SMOKE)
    assert cfg[section]["index"] == "brute_force"
    old = config_lib.load(text=SMOKE, overrides=[f"{section}.index=bruteforce"])
    assert old[section]["index"] == "bruteforce"  # still accepted
    with pytest.raises(config_lib.ConfigError, match=f"{section}.index"):
        config_lib.load(text=SMOKE, overrides=[f"{section}.index=brute"])
