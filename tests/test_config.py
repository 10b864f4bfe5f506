"""HyperMoEConfig (ref/config.py, SPEC.md §1): every validation rule raises a ValueError naming the field;
the JSON round trip is exact; unknown fields and bad JSON are rejected."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ref
from ref import HyperMoEConfig, tiny_config
from tests.strategies import configs

INT_FIELDS = ("d_model d_ff n_experts top_k d_expert_embed d_process d_hyper d_layer_embed d_generator d_adapter "
              "n_layers vocab_size n_heads max_seq_len moe_every").split()
BOOL_FIELDS = ("expert_bias", "router_bias", "noisy_gating", "hyper_expert", "tie_embeddings")
NUMBER_FIELDS = ("router_jitter", "dropout", "layer_norm_eps")


def test_defaults_are_the_official_sizes():
    cfg = HyperMoEConfig()
    assert (cfg.d_expert_embed, cfg.d_process, cfg.d_hyper, cfg.d_generator) == (128, 128, 128, 128)
    assert (cfg.d_layer_embed, cfg.d_adapter, cfg.n_experts, cfg.top_k) == (10, 64, 8, 1)
    assert cfg.gate == "topk" and cfg.capacity is None and cfg.hyper_expert


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_config().d_model = 3


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [0, -1])
def test_int_fields_must_be_positive(field, value):
    with pytest.raises(ValueError, match=f"config field '{field}' must be ≥ 1, got {value}"):
        tiny_config(**{field: value})


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, 2.0, "4", None])
def test_int_fields_reject_bools_floats_strings(field, value):
    with pytest.raises(ValueError, match=f"config field '{field}' must be an int, got {value!r}"):
        tiny_config(**{field: value})


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_bool_fields_must_be_bools(field, value):
    with pytest.raises(ValueError, match=f"config field '{field}' must be a bool, got {value!r}"):
        tiny_config(**{field: value})


def test_top_k_must_not_exceed_n_experts():
    with pytest.raises(ValueError, match=r"config field 'top_k' \(5\) must be ≤ n_experts \(4\)"):
        tiny_config(top_k=5)
    with pytest.raises(ValueError, match="config field 'top_k' must be ≥ 1, got 0"):
        tiny_config(top_k=0)
    assert tiny_config(top_k=4).top_k == 4  # k = N is valid


@pytest.mark.parametrize("gate", ["top1", "Switch", "", None])
def test_unknown_gate(gate):
    with pytest.raises(ValueError, match=f"config field 'gate' must be one of .* got {gate!r}"):
        tiny_config(gate=gate)


def test_switch_needs_k_1():
    with pytest.raises(ValueError, match="config field 'top_k' must be 1 with gate='switch', got 2"):
        tiny_config(gate="switch", top_k=2)
    assert tiny_config(gate="switch", top_k=1).gate == "switch"


@pytest.mark.parametrize("activation", ["gelu_new", "ReLU", "swiglu", None])
def test_unknown_activation(activation):
    with pytest.raises(ValueError, match=f"config field 'activation' must be one of .* got {activation!r}"):
        tiny_config(activation=activation)


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_known_activations(activation):
    assert tiny_config(activation=activation).activation == activation


def test_capacity_rules():
    assert tiny_config(gate="switch", top_k=1, capacity=3).capacity == 3
    with pytest.raises(ValueError, match=r"config field 'capacity' is only supported with gate='switch'"):
        tiny_config(capacity=3)  # "topk"
    for bad in (0, -2, True, 2.0, "3"):
        with pytest.raises(ValueError, match=f"config field 'capacity' must be None or an int ≥ 1, got {bad!r}"):
            tiny_config(gate="switch", top_k=1, capacity=bad)


@pytest.mark.parametrize("field", ["router_jitter", "dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_unit_interval_fields(field, value):
    with pytest.raises(ValueError, match=f"config field '{field}' must be in \\[0, 1\\), got {value}"):
        tiny_config(**{field: value})


@pytest.mark.parametrize("field", ["router_jitter", "dropout"])
def test_unit_interval_fields_accept_their_range(field):
    assert getattr(tiny_config(**{field: 0.0}), field) == 0.0
    assert getattr(tiny_config(**{field: 0.99}), field) == 0.99


@pytest.mark.parametrize("value", [0.0, -1e-5, float("nan")])
def test_layer_norm_eps_must_be_positive(value):
    with pytest.raises(ValueError, match=f"config field 'layer_norm_eps' must be > 0, got {value}"):
        tiny_config(layer_norm_eps=value)


@pytest.mark.parametrize("field", NUMBER_FIELDS)
@pytest.mark.parametrize("value", [True, "0.1", None])
def test_number_fields_reject_non_numbers(field, value):
    with pytest.raises(ValueError, match=f"config field '{field}' must be a number, got {value!r}"):
        tiny_config(**{field: value})


def test_n_heads_must_divide_d_model_of_a_model_only(tmp_path):
    """n_heads is a model-only field: a layer config (d = 32, the default 12 heads) is valid, and a layer of it
    saves and loads; every model path (ref, torch, a model directory's config.json) refuses it."""
    from ref import io as ref_io
    from ref.model import check_model, init_model, model_param_shapes

    cfg = HyperMoEConfig(d_model=32, d_ff=64, d_expert_embed=8, d_process=8, d_hyper=8, d_generator=8, d_adapter=4)
    assert cfg.n_heads == 12
    ref_io.save_dir(tmp_path / "layer", cfg, ref.init(cfg, seed=0), "layer")
    assert ref_io.load_dir(tmp_path / "layer")[0] == cfg
    message = r"config field 'n_heads' \(3\) must divide d_model \(16\)"
    bad = tiny_config(n_heads=3)  # a valid config, not a valid model
    for build in (check_model, model_param_shapes, init_model):
        with pytest.raises(ValueError, match=message):
            build(bad)
    from hypermoe.model import HyperMoETransformer

    with pytest.raises(ValueError, match=message):
        HyperMoETransformer(bad)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"kind": "model", **bad.to_dict()}))
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        ref_io.load_config(tmp_path / "m")


def test_replace_validates():
    with pytest.raises(ValueError, match="config field 'top_k'"):
        tiny_config().replace(top_k=9)


# --- JSON ---


@given(configs(noisy_gating=False) | configs(noisy_gating=True), st.floats(0, 0.99), st.floats(0, 0.99),
       st.floats(1e-12, 1.0))
def test_json_round_trip(cfg, jitter, dropout, eps):
    cfg = cfg.replace(router_jitter=jitter, dropout=dropout, layer_norm_eps=eps)
    text = cfg.to_json()
    data = json.loads(text)
    assert data["spec_version"] == ref.SPEC_VERSION
    assert set(data) == {f.name for f in dataclasses.fields(HyperMoEConfig)} | {"spec_version"}
    back = HyperMoEConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    assert HyperMoEConfig.from_dict(cfg.to_dict()) == cfg


def test_json_missing_fields_take_defaults():
    assert HyperMoEConfig.from_json('{"d_model": 24, "n_heads": 4}') == HyperMoEConfig(d_model=24, n_heads=4)
    assert HyperMoEConfig.from_json("{}") == HyperMoEConfig()


def test_json_unknown_field_is_rejected():
    data = json.loads(tiny_config().to_json())
    data["d_modle"] = 16
    data["zzz"] = 1
    with pytest.raises(ValueError, match="unknown config field\\(s\\): d_modle, zzz"):
        HyperMoEConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "{", "{'d_model': 16}", '{"d_model": 16,}', "d_model=16"])
def test_bad_json_is_rejected(text):
    with pytest.raises(ValueError, match="config is not valid JSON"):
        HyperMoEConfig.from_json(text)


@pytest.mark.parametrize("text", ["[]", "16", '"config"', "null"])
def test_json_must_be_an_object(text):
    with pytest.raises(ValueError, match="config must be a JSON object"):
        HyperMoEConfig.from_json(text)


@pytest.mark.parametrize("text, field", [('{"d_model": 16.0}', "d_model"), ('{"d_model": "16"}', "d_model"),
                                         ('{"hyper_expert": 1}', "hyper_expert"), ('{"top_k": 9}', "top_k"),
                                         ('{"capacity": 2}', "capacity"), ('{"gate": "moe"}', "gate")])
def test_json_values_are_validated(text, field):
    with pytest.raises(ValueError, match=f"config field '{field}'"):
        HyperMoEConfig.from_json(text)


def test_tiny_config():
    cfg = tiny_config()
    assert (cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.d_adapter, cfg.n_layers) == (16, 32, 4, 2, 4, 2)
    assert tiny_config(top_k=1).top_k == 1


def test_is_moe_block():
    assert [tiny_config(moe_every=1).is_moe_block(i) for i in range(4)] == [True] * 4
    assert [tiny_config(moe_every=2).is_moe_block(i) for i in range(4)] == [False, True, False, True]
