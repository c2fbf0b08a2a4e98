"""ModelConfig validates itself and names the offending field."""
import pytest

from modlm import ModelConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("d_model", -8),
        ("n_layers", 0),
        ("n_heads", 0),
        ("n_heads", 3),  # 256 % 3 != 0
        ("max_seq_len", 0),
        ("capacity", 0.0),
        ("capacity", 1.5),
        ("route_every", -1),
        ("route_every", 7),  # more than n_layers: nothing would be routed
        ("mlp", "relu"),
        ("mlp_hidden", 0),
        ("router_weight", "tanh"),
        ("causal_method", "oracle"),
        ("router_aux_weight", -0.1),
        ("predictor_aux_weight", -1.0),
        ("predictor_hidden", 0),
        ("rope_theta", 0.0),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        ModelConfig(**{field: value})


def test_odd_head_dim_rejected():
    with pytest.raises(ValueError, match="n_heads.*even"):
        ModelConfig(d_model=36, n_heads=4)  # head_dim 9 cannot be rotated in pairs


def test_defaults_are_the_papers_setting():
    cfg = ModelConfig()
    assert cfg.capacity == 0.125 and cfg.route_every == 2
    assert cfg.routed_layers == [1, 3, 5]
    assert cfg.mlp_hidden == 704  # 8/3 * 256 rounded up to a multiple of 64
    assert ModelConfig(mlp="gelu").mlp_hidden == 1024


def test_round_trips_through_a_dict():
    cfg = ModelConfig(d_model=128, n_heads=4, capacity=0.5, causal_method="router")
    assert ModelConfig(**cfg.to_dict()) == cfg


def test_rebuilt_from_saved_hyperparameters_and_tensor_differences():
    saved = {"d_model": 64, "n_heads": 4, "capacity": 0.5, "lr": 1e-3, "warmup_steps": 10}  # module hparams
    cfg = ModelConfig.from_hparams(saved)
    assert (cfg.d_model, cfg.n_heads, cfg.capacity) == (64, 4, 0.5)
    # capacity does not change tensors; d_model does; a field this run leaves unset is not compared
    assert ModelConfig.tensor_differences(saved, {"d_model": 64, "capacity": 0.25}) == []
    assert ModelConfig.tensor_differences(saved, {"d_model": 32, "n_heads": None}) == [
        "d_model=64 in the checkpoint, 32 in this run"]
    assert "capacity" not in ModelConfig.TENSOR_FIELDS and "d_model" in ModelConfig.TENSOR_FIELDS
