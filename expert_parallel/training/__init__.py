"""The launcher's training side.

``config.py``      TrainConfig: the config tree (model / moe / parallel / tuner + loop fields)
``options.py``     the command line and JSON config, generated from that tree
``launcher.py``    what an entry point checks before the rendezvous
``run_dir.py``     one run per ``--out``: refuse, ``--resume``, ``--overwrite``
``trainer.py``     the training loop, written once
``engine.py``      the engine interface and the plain engine (AdamW + DCP checkpoints)
``deepspeed_*.py`` the DeepSpeed engine, its setup, its JSON checks, checkpoint conversion
``factory.py``     picks the engine
``parallel.py``    gradient sync and clipping for expert + data parallelism
``data.py``, ``report.py``, ``host_memory.py``: batches, rank-0 reporting, host allocator
"""
