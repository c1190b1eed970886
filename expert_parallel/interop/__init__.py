"""Interoperability with other model libraries (optional extras).

``hf_mixtral``: make a Hugging Face ``transformers`` Mixtral-style model expert-parallel
(``replace_moe_blocks``) and gather it back to the HF layout (``gather_to_hf``). Import
it explicitly; it needs the ``hf`` extra (transformers).
"""
