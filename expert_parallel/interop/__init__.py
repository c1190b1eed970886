"""Interoperability with other model libraries (optional extras).

``hf``: make a Hugging Face ``transformers`` MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3, GPT-OSS, and other blocks with their layouts) expert-parallel
(``replace_moe_blocks``) and gather it back to the HF layout (``gather_to_hf``).
``hf_mixtral`` is its former, Mixtral-only import path and re-exports the same functions.
Import them explicitly; they need the ``hf`` extra (transformers).
"""
