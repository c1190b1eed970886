"""Any Hugging Face ``transformers`` MoE model, expert-parallel in one call.

    from expert_parallel.interop.hf import replace_moe_blocks, gather_to_hf, moe_aux_loss
    replace_moe_blocks(model, groups)            # every rank: same weights in, its experts kept
    loss = ce(model(input_ids=x).logits, y) + moe_aux_loss(model)
    gather_to_hf(model, groups)                  # back to the HF layout (collective)

Modules: ``blocks.py`` finds MoE blocks by structure and checks each mapping against the
installed transformers on probe tokens; ``mapping.py`` is what a mapping is; one module
per family mapping, each with its weight table -- ``mixtral.py`` (Mixtral),
``qwen3_moe.py`` (Qwen3-MoE and OLMoE, one block layout), ``qwen2_moe.py`` (Qwen2-MoE,
gated shared expert), ``deepseek_v3.py`` (DeepSeek-V3, sigmoid + correction bias + groups
+ shared experts), ``gpt_oss.py`` (GPT-OSS, biased router, clamped SwiGLU with biases);
``wrapper.py`` holds :class:`HFMoEBlock` and the public functions. Needs the ``hf`` extra.
"""

from .blocks import MAPPINGS, BlockMatch, find_moe_blocks
from .mapping import Mapping
from .wrapper import (HFMoEBlock, gather_to_hf, hf_state_dict, mapped_config, moe_aux_loss, moe_families,
                      moe_stats, replace_moe_blocks)

__all__ = ["replace_moe_blocks", "gather_to_hf", "hf_state_dict", "moe_aux_loss", "moe_stats", "moe_families",
           "HFMoEBlock", "MAPPINGS", "Mapping", "BlockMatch", "find_moe_blocks", "mapped_config"]
