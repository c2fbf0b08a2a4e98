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
        ("n_kv_heads", 3),  # does not divide n_heads=8
        ("n_kv_heads", 0),
        ("head_size", 7),  # odd: RoPE rotates pairs
        ("qkv_bias", "yes"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}),
        (
            "rope_scaling",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
        ),  # high below low
        ("route_layers", [6]),  # no block 6 in 6 blocks
        ("route_layers", [3, 1]),  # not ascending
        ("capacities", [0.5, 0.5]),  # 3 routed blocks
        ("capacities", [0.5, 0.0, 0.5]),
        ("capacity_depth", 1.0),
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
        "d_model=64 in the checkpoint, 32 in this run"
    ]
    assert "capacity" not in ModelConfig.TENSOR_FIELDS and "d_model" in ModelConfig.TENSOR_FIELDS


def test_a_capacity_spread_that_would_exceed_one_is_refused():
    with pytest.raises(ValueError, match="capacity_depth"):
        ModelConfig(capacity=0.8, capacity_depth=0.5)  # the first routed block would get 1.2


def test_the_default_model_builds_the_tensors_it_always_has():
    """New fields keep today's model by default: same parameters, names and shapes (the README's
    6,967,683), and two buffers per router: its causal decision's calibrated threshold and spread."""
    from modlm import MoDTransformer

    model = MoDTransformer(ModelConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model.num_params() == 6_967_683 and len(shapes) == 60 + 2 * 3
    assert shapes["blocks.1.router.decision.threshold"] == () == shapes["blocks.5.router.decision.spread"]
    assert shapes["blocks.0.attn.qkv.weight"] == (768, 256) and "blocks.0.attn.qkv.bias" not in shapes
    assert shapes["blocks.1.block.attn.proj.weight"] == (256, 256) and shapes["blocks.1.router.weight"] == (1, 256)
    cfg = ModelConfig()
    assert (cfg.head_dim, cfg.kv_heads, cfg.layer_capacities, cfg.routed_layers) == (32, 8, [0.125] * 3, [1, 3, 5])


def test_routed_blocks_and_capacities_by_list_or_spread():
    cfg = ModelConfig(route_layers=[0, 4], capacities=[0.5, 0.25])
    assert cfg.routed_layers == [0, 4] and cfg.capacity_of(4) == 0.25 and cfg.topk_tokens(64, 0.5) == 32
    assert ModelConfig(route_layers=[]).routed_layers == []  # dense
    spread = ModelConfig(route_every=1, capacity=0.2, capacity_depth=0.5).layer_capacities
    assert (
        spread[0] == pytest.approx(0.3) and spread[-1] == pytest.approx(0.1) and sum(spread) / 6 == pytest.approx(0.2)
    )
