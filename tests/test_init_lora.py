"""Invariants of every initialization in init_lora.py, on tiny models built in the test (float32)."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

import init_lora

RANK = 8
ALPHA = 16.0


def tiny_qwen2(seed=0, dtype=torch.float32, tie=True):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(config).to(dtype)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config)


def principal_sine(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal-angle sine between the row spaces of A and B."""
    Qa, _ = torch.linalg.qr(A.double().T)
    Qb, _ = torch.linalg.qr(B.double().T)
    cosines = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1.0)
    return float(torch.sqrt(1 - cosines.min() ** 2))


def lora_layers(peft_model):
    return [(name, module) for name, module in peft_model.named_modules() if isinstance(module, init_lora.LoraLayer)]


def original_weights(model):
    """Effective (out x in) weights of every linear layer, keyed by module name."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weights[name] = module.weight.detach().clone()
        elif isinstance(module, init_lora.Conv1D):
            weights[name] = module.weight.detach().T.clone()
    return weights


def effective(layer):
    weight = layer.get_base_layer().weight.detach()
    return weight.T if layer.fan_in_fan_out else weight


@pytest.mark.parametrize("method", ["rlpo", "rlmo"])
def test_orthonormal_init_spans_exact_subspace(method):
    model = tiny_qwen2()
    before = original_weights(model)
    peft_model, _ = init_lora.initialize_adapter(model, method, rank=RANK, alpha=ALPHA)
    layers = lora_layers(peft_model)
    assert len(layers) == 2 * 7
    for name, layer in layers:
        A = layer.lora_A["default"].weight.detach()
        B = layer.lora_B["default"].weight.detach()
        W = before[name.removeprefix("base_model.model.")]
        _, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        exact = Vh[:RANK] if method == "rlpo" else Vh[-RANK:]
        assert (A @ A.T - torch.eye(RANK)).abs().max() < 1e-5, name
        assert principal_sine(A, exact) < 1e-4, name
        assert torch.count_nonzero(B) == 0, name
        assert torch.equal(effective(layer), W), name


@pytest.mark.parametrize("method", init_lora.METHODS)
def test_step_zero_logits_match_base(method):
    model = tiny_qwen2()
    input_ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids).logits
    peft_model, _ = init_lora.initialize_adapter(model, method, rank=RANK, alpha=ALPHA)
    with torch.no_grad():
        actual = peft_model(input_ids).logits
    if method in init_lora.RESIDUAL_METHODS:
        assert torch.allclose(actual, expected, atol=1e-5, rtol=0)
    else:
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("method", init_lora.RESIDUAL_METHODS)
def test_residual_reconstructs_weight(method):
    model = tiny_qwen2()
    before = original_weights(model)
    peft_model, metadata = init_lora.initialize_adapter(model, method, rank=RANK, alpha=ALPHA)
    assert metadata["residual_base"] == init_lora.RESIDUAL_BASE_DIR
    for name, layer in lora_layers(peft_model):
        W = before[name.removeprefix("base_model.model.")]
        A = layer.lora_A["default"].weight.detach()
        B = layer.lora_B["default"].weight.detach()
        rebuilt = effective(layer) + layer.scaling["default"] * B @ A
        relative_error = torch.linalg.norm(rebuilt - W) / torch.linalg.norm(W)
        assert relative_error < 1e-5, name
        assert torch.count_nonzero(B) > 0, name


def test_pissa_factors_match_top_triplets():
    model = tiny_qwen2()
    before = original_weights(model)
    peft_model, _ = init_lora.initialize_adapter(model, "pissa", rank=RANK, alpha=ALPHA)
    name, layer = lora_layers(peft_model)[0]
    W = before[name.removeprefix("base_model.model.")].double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    scaling = ALPHA / RANK
    A = layer.lora_A["default"].weight.detach().double()
    B = layer.lora_B["default"].weight.detach().double()
    expected_A_norms = torch.sqrt(S[:RANK] / scaling)
    assert torch.allclose(A.norm(dim=1), expected_A_norms, rtol=1e-4)
    assert torch.allclose(B.norm(dim=0), expected_A_norms, rtol=1e-4)
    assert principal_sine(A, Vh[:RANK]) < 1e-4


def test_olora_factors_are_qr():
    model = tiny_qwen2()
    before = original_weights(model)
    peft_model, _ = init_lora.initialize_adapter(model, "olora", rank=RANK, alpha=ALPHA)
    name, layer = lora_layers(peft_model)[0]
    W = before[name.removeprefix("base_model.model.")]
    Q, R = torch.linalg.qr(W)
    assert torch.allclose(layer.lora_A["default"].weight.detach(), R[:RANK], atol=1e-6)
    assert torch.allclose(layer.lora_B["default"].weight.detach(), Q[:, :RANK], atol=1e-6)


@pytest.mark.parametrize("method", ["rlpo", "pissa"])
def test_bfloat16_model_initializes(method):
    model = tiny_qwen2(dtype=torch.bfloat16)
    before = original_weights(model)
    peft_model, metadata = init_lora.initialize_adapter(model, method, rank=RANK, alpha=ALPHA)
    assert metadata["dtype"] == "bfloat16"
    name, layer = lora_layers(peft_model)[0]
    A = layer.lora_A["default"].weight.detach().float()
    assert torch.isfinite(A).all()
    _, _, Vh = torch.linalg.svd(before[name.removeprefix("base_model.model.")].double(), full_matrices=False)
    assert principal_sine(A, Vh[:RANK]) < 1e-2  # bfloat16 weights, factors cast to the adapter dtype
    assert layer.get_base_layer().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["rlpo", "pissa"])
def test_conv1d_uses_out_by_in_weight(method):
    model = tiny_gpt2()
    before = original_weights(model)
    peft_model, _ = init_lora.initialize_adapter(model, method, rank=RANK, alpha=ALPHA, target_modules=["c_attn", "c_fc"])
    layers = lora_layers(peft_model)
    assert layers and all(layer.fan_in_fan_out for _, layer in layers)
    for name, layer in layers:
        W = before[name.removeprefix("base_model.model.")]
        A = layer.lora_A["default"].weight.detach()
        assert A.shape == (RANK, W.shape[1]), name
        _, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        assert principal_sine(A, Vh[:RANK]) < 1e-4, name
        if method == "pissa":
            B = layer.lora_B["default"].weight.detach()
            rebuilt = effective(layer) + layer.scaling["default"] * B @ A
            assert torch.linalg.norm(rebuilt - W) / torch.linalg.norm(W) < 1e-5, name


def test_same_init_gives_same_bytes(tmp_path):
    paths = []
    for attempt in range(2):
        peft_model, metadata = init_lora.initialize_adapter(tiny_qwen2(), "rlpo", rank=RANK, alpha=ALPHA)
        directory = tmp_path / f"attempt{attempt}"
        directory.mkdir()
        init_lora.save_adapter(peft_model, metadata, directory)
        paths.append(directory / "adapter_model.safetensors")
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize("method", ["rlmo", "milora"])
def test_saved_adapter_loads_unchanged(tmp_path, method):
    model = tiny_qwen2()
    input_ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids).logits
    model.config._name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "base")
    peft_model, metadata = init_lora.initialize_adapter(model, method, rank=RANK, alpha=ALPHA)
    metadata["model"] = str(tmp_path / "base")
    init_lora.save_adapter(peft_model, metadata, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base_path = init_lora.resolve_base(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True)
    for key, value in loaded.state_dict().items():
        if "lora_" in key:
            assert torch.equal(value, saved[key.replace(".default", "")]), key
    assert any(parameter.requires_grad for parameter in loaded.parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "svd"}, "Unknown --init 'svd'"),
        ({"method": "rlpo", "rank": 100}, "--rank 100 is larger than min(out, in)"),
        ({"method": "rlpo", "target_modules": ["nonexistent_proj"]}, "matches no module"),
        ({"method": "pissa", "target_modules": ["embed_tokens"]}, "supports only torch.nn.Linear"),
        ({"method": "pissa", "target_modules": ["q_proj", "lm_head"]}, "tied to the input embeddings"),
    ],
)
def test_bad_input_rejected(kwargs, message):
    model = tiny_qwen2()
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        init_lora.initialize_adapter(model, method, **{"rank": RANK, "alpha": ALPHA, **kwargs})


def test_non_finite_weight_rejected():
    model = tiny_qwen2()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.*non-finite"):
        init_lora.initialize_adapter(model, "rlpo", rank=RANK, alpha=ALPHA)


def test_missing_model_path_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_lora.load_base_model(str(tmp_path / "no-such-model"))
