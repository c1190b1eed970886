"""Former import path of the Hugging Face interop (Mixtral only); kept working.

Everything lives in :mod:`expert_parallel.interop.hf` now, which finds the MoE blocks of
any supported family by structure; Mixtral's weight table is in
:mod:`expert_parallel.interop.hf.mixtral`. ``replace_moe_blocks(model, groups,
block_types=..., seed=..., **overrides)`` keeps its signature.
"""

from __future__ import annotations

from .hf import HFMoEBlock, gather_to_hf, hf_state_dict, moe_aux_loss, moe_stats, replace_moe_blocks

__all__ = ["HFMoEBlock", "replace_moe_blocks", "gather_to_hf", "hf_state_dict", "moe_aux_loss", "moe_stats"]
