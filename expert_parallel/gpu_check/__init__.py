"""The CUDA/NCCL acceptance check (issue 18): everything claimed about GPUs, in one command.

    scripts/gpu_check.sh                     # on a CUDA machine: checks 1-6, ~5-8 min
    scripts/gpu_check.sh --only host_syncs   # one check again (after a fix)
    scripts/gpu_check.sh --dry-run-cpu       # the same check code on CPU at tiny sizes

Checks (one module each, each run in its own subprocess so a CUDA error in one -- a
device-side assert poisons the process -- cannot take the others down):

=================  ==============================================================
``correctness``    every router x dispatch mode x expert backend at EP=1: fp32 on the
                   device vs a CPU fp64 reference (forward and gradients), bf16
                   autocast within a stated tolerance; grouped_mm's rules refused
                   with a named error, never a crash in the kernel
``host_syncs``     forward+backward under ``torch.cuda.set_sync_debug_mode("error")``:
                   static shapes zero syncs, the other modes exactly the one marked
                   count-exchange read; also the multi-rank paths (EP=4/8) on one GPU
                   through the mirror process group
``cuda_graphs``    the static-shape layer's forward+backward captured in a CUDA graph;
                   replays equal eager results
``multi_gpu``      >= 2 GPUs: torchrun + NCCL golden check (EP=N vs EP=1) at EP=2 and
                   EP=4, and the launcher for 20 steps in bf16; one GPU: reported as
                   "multi-GPU: not run, 1 GPU"
``profiler``       CUDA-event phase times sum to within 10% of the measured layer time
``speed``          GPU-sized layer breakdown, expert-GEMM TFLOP/s vs the chip's bf16
                   peak, grouped_mm vs loop, the compare_deepspeed config at EP=1
=================  ==============================================================

Writes ``benchmarks/results/gpu_check.json`` and ``.md`` (GPU model, torch / CUDA /
NCCL versions, each check's status and figures). Exit codes: 0 every check that ran
passed, 1 a check failed or errored, 77 no CUDA device (nothing was checked: the line
"no CUDA device" and nothing else), 2 bad arguments. ``--dry-run-cpu`` runs every
check's code on CPU at tiny sizes (CUDA-only steps replaced by their CPU stand-ins, each
named in the result); the CPU suite runs it (``tests/integration/test_gpu_check.py``).
"""
