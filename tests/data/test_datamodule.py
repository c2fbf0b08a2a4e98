"""The data module's settings: its defaults agree with the model's, so a default run's data fits
its model."""

from modlm.model.config import ModelConfig
from tests.data.helpers import DATA_DEFAULTS


def test_window_length_and_vocabulary_default_to_the_models():
    model = ModelConfig()
    assert DATA_DEFAULTS["seq_len"] == model.max_seq_len
    assert DATA_DEFAULTS["vocab_size"] == model.vocab_size
