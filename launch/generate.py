"""Generate text from a launcher checkpoint, experts sharded over the ranks as in training.

Examples (run from the repository root)::

    # greedy, one process (EP=1), from the newest checkpoint of a run
    python launch/generate.py --checkpoint runs/default --prompt "def main(" --max-new-tokens 64

    # the same checkpoint at EP=4 (any EP size loads any other), sampled, JSON out
    torchrun --nproc_per_node=4 launch/generate.py --checkpoint runs/default/checkpoints/step_00000500 \
        --prompt "import os" --temperature 0.8 --top-k 40 --seed 1 --out gen.json

    # decode-size batches: the all-gather dispatcher (two exchanges, no count exchange)
    torchrun --nproc_per_node=2 launch/generate.py --checkpoint runs/default --a2a-algorithm allgather

    # under SLURM or Open MPI the ranks are discovered as in launch/train.py
    srun --ntasks=4 python launch/generate.py --checkpoint runs/default

Every rank decodes the same prompt; rank 0's choice of each token is broadcast, so all
ranks continue one text. Rank 0 prints the text (prompt + continuation) and, with
``--out FILE``, writes JSON: ``text`` (the continuation), ``prompt``, ``tokens``,
``token_latency_s`` (one per generated token; entry 0 includes the prefill), the
checkpoint, its step, the EP size and the dispatcher. A bad ``--checkpoint`` is a
``CheckpointNotFoundError``, a prompt that does not fit the context a
``PromptTooLongError``: one line on the first rank, exit status 2, before any rendezvous.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from expert_parallel.config import ParallelConfig
from expert_parallel.config.moe import A2A_ALGORITHMS, EXPERT_BACKENDS
from expert_parallel.distributed.device import PRECISIONS, cuda_available, local_device, resolve_precision
from expert_parallel.distributed.groups import ParallelGroups
from expert_parallel.distributed.launch_env import discover_rank_info, init_distributed, shutdown
from expert_parallel.inference.loader import CheckpointNotFoundError, build_model, load_weights, resolve_checkpoint
from expert_parallel.models.generation import PromptTooLongError, check_context, decode, encode, generate
from expert_parallel.training.launcher import fail
from expert_parallel.training.trainer import describe_dispatch

PROG = "generate.py"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"cannot parse {text!r} as bool")


def parse_args(argv: list[str], quiet: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a launcher --out directory (its newest checkpoint) or one checkpoints/step_N in it")
    p.add_argument("--prompt", default="def ", help="text to continue (byte-level tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
    p.add_argument("--out", default=None, metavar="FILE", help="write the result as JSON")
    p.add_argument("--ep-size", default="auto", help="EP size (default: as many ranks as divide the experts)")
    p.add_argument("--dtype", default=None, choices=list(PRECISIONS), help="default: the run's dtype")
    p.add_argument("--a2a-algorithm", default=None, choices=list(A2A_ALGORITHMS), help="default: the run's")
    p.add_argument("--static-shapes", type=_bool, default=None, metavar="BOOL")
    p.add_argument("--allgather-max-tokens", type=int, default=None, metavar="N")
    p.add_argument("--expert-backend", default=None, choices=list(EXPERT_BACKENDS))
    p.add_argument("--ranks-per-node", type=int, default=None, help="for a2a_algorithm=hierarchical")
    if quiet:
        p.error = lambda message: sys.exit(2)  # type: ignore[method-assign]
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.temperature < 0:
        p.error(f"--temperature must be >= 0, got {a.temperature}")
    if a.top_k is not None and a.top_k < 1:
        p.error(f"--top-k must be >= 1, got {a.top_k}")
    return a


def overrides(a: argparse.Namespace) -> dict:
    names = ("a2a_algorithm", "static_shapes", "allgather_max_tokens", "expert_backend")
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


@record
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        info = discover_rank_info()
    except ValueError as err:
        return fail(0, err, PROG)
    a = parse_args(argv, quiet=info.rank != 0)
    try:  # decided from the files alone, identically on every rank, before any rendezvous
        run = resolve_checkpoint(a.checkpoint)
        model_cfg = run.config.model
        if model_cfg.vocab_size < 256:
            raise ValueError(f"the model's vocab_size={model_cfg.vocab_size} is not byte-level (256): "
                             "text prompts need byte-level tokens")
        prompt = encode(a.prompt)
        check_context(len(prompt), a.max_new_tokens, model_cfg.seq_len)
        parallel = ParallelConfig(ep_size=a.ep_size, ranks_per_node=a.ranks_per_node)
        ep, per_node = parallel.resolve(model_cfg.moe.num_experts, info.world_size, info.local_world_size)
        moe_overrides = overrides(a)
        precision = resolve_precision(a.dtype or run.config.dtype, "cuda" if cuda_available() else "cpu")
    except (CheckpointNotFoundError, PromptTooLongError) as err:
        return fail(info.rank, err, PROG, named=True)
    except ValueError as err:
        return fail(info.rank, err, PROG)
    try:
        info = init_distributed(timeout=timedelta(seconds=run.config.collective_timeout_s))
        if not cuda_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
        hierarchical = moe_overrides.get("a2a_algorithm", model_cfg.moe.a2a_algorithm) == "hierarchical"
        groups = ParallelGroups.build(ep, timeout=timedelta(seconds=run.config.collective_timeout_s),
                                      ranks_per_node=per_node if hierarchical else 0)
        device = local_device(info.local_rank)
        model = build_model(model_cfg, groups, device, seed=run.config.seed, moe_overrides=moe_overrides)
        load_weights(model, run.checkpoint, groups)
        prompt_BP = torch.tensor([prompt], dtype=torch.long, device=device)
        sync = dist.group.WORLD if dist.is_initialized() else None
        result = generate(model, prompt_BP, a.max_new_tokens, a.temperature, a.top_k, a.seed,
                          sync_group=sync, autocast=precision.autocast)
        if info.rank == 0:
            tokens = result.tokens_BN[0].tolist()
            text = decode(tokens)
            print(a.prompt + text, flush=True)
            if a.out:
                payload = {
                    "text": text, "prompt": a.prompt, "tokens": tokens,
                    "token_latency_s": result.token_latency_s, "prompt_tokens": result.prompt_tokens,
                    "checkpoint": run.checkpoint, "step": run.step, "world_size": info.world_size,
                    "ep_size": groups.ep_size, "dispatcher": describe_dispatch(model),
                    "precision": precision.to_dict(), "temperature": a.temperature, "top_k": a.top_k,
                    "seed": a.seed, "trained_at": {"world_size": run.manifest.get("world_size"),
                                                   "ep_size": run.manifest.get("ep_size")},
                }
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "w") as fh:
                    json.dump(payload, fh, indent=1)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
