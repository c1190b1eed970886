"""Small random transformers models of each supported family, from configs (no download).

``small_config(model_type, hidden_size=..., ffn=..., experts=..., top_k=..., layers=...,
vocab_size=..., **overrides)`` returns the family's ``PretrainedConfig`` with its expert
sizes spelled the family's way (``intermediate_size`` / ``moe_intermediate_size``,
``num_local_experts`` / ``num_experts`` / ``n_routed_experts``) and small attention;
``overrides`` are passed through as config fields. ``small_model(config, seed)`` builds the
``*ForCausalLM`` with every weight drawn from ``seed`` (the same model on every rank), the
routers and biases included: HF initialises some of them to zero, which makes routing a
tie between experts (an equal-logits test would then compare tie-breaking, not math).

Used by the tests, ``launch/finetune_hf.py`` (``--model-config x.json``) and
``benchmarks/compare_hf_ep.py``.
"""

from __future__ import annotations

from typing import Any

import torch

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
"""The families with a mapping, as transformers ``model_type`` names."""


def _family_fields(model_type: str, d: int, f: int, e: int, k: int) -> dict[str, Any]:
    if model_type == "mixtral":
        return dict(intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    if model_type == "qwen2_moe":
        return dict(moe_intermediate_size=f, intermediate_size=2 * f, shared_expert_intermediate_size=2 * f,
                    num_experts=e, num_experts_per_tok=k)
    if model_type == "qwen3_moe":
        return dict(moe_intermediate_size=f, intermediate_size=2 * f, num_experts=e, num_experts_per_tok=k,
                    norm_topk_prob=True)
    if model_type == "olmoe":
        return dict(intermediate_size=f, num_experts=e, num_experts_per_tok=k)
    if model_type == "deepseek_v3":
        groups = 4 if e % 4 == 0 and e >= 8 else 1
        return dict(moe_intermediate_size=f, intermediate_size=2 * f, n_routed_experts=e, num_experts_per_tok=k,
                    n_shared_experts=1, n_group=groups, topk_group=max(1, groups // 2), first_k_dense_replace=1,
                    routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=16,
                    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=None,
                    head_dim=8)  # RoPE runs over the rope part of a head
    if model_type == "gpt_oss":
        return dict(intermediate_size=f, num_local_experts=e, num_experts_per_tok=k, sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(f"model_type must be one of {list(MODEL_TYPES)}, got {model_type!r}")


def small_config(model_type: str, *, hidden_size: int = 32, ffn: int = 24, experts: int = 8, top_k: int = 2,
                 layers: int = 2, vocab_size: int = 96, heads: int = 4, kv_heads: int = 2,
                 max_positions: int = 512, **overrides: Any):
    """A small config of ``model_type`` (see the module docstring)."""
    from transformers import AutoConfig

    fields = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden_size // heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=1, pad_token_id=None)
    fields.update(_family_fields(model_type, hidden_size, ffn, experts, top_k))
    if fields.get("num_key_value_heads") is None:  # DeepSeek's MLA: one KV head per head
        fields["num_key_value_heads"] = heads
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Redraw every parameter and floating buffer from ``seed`` (norm weights around 1,
    everything else ``N(0, std)``; the routers' logits get a larger spread so that
    top-k choices are well separated)."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() or "inv_freq" in name:
            continue
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith("norm.weight") or "layernorm" in name:
            value = 1.0 + 0.1 * noise
        elif name.endswith(("gate.weight", "router.weight")) and t.dim() == 2 and "shared_expert_gate" not in name:
            value = noise * 0.5
        else:
            value = noise * std
        t.copy_(value.to(t.dtype))


def small_model(config: Any, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM.from_config(config)`` with every weight from ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomise(model, seed)
    return model.eval()


__all__ = ["MODEL_TYPES", "small_config", "small_model", "randomise"]
