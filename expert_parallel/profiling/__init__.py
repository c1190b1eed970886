"""Phase timers, bytes moved and reports for the MoE data path.

* ``timer.py``: ``NULL_TIMER`` / ``PhaseTimer`` (forward phases, backward marks, bytes).
* ``profiler.py``: ``MoEProfiler`` / ``ProfilerConfig`` -- a window of profiled steps,
  aggregated over ranks into JSON records, TensorBoard scalars and a markdown table.
* ``records.py``: how a record is built and what each field means.
* ``host_sync.py``: the documented host syncs, marked (``host_sync``), and an audit of
  host reads / host-built tensors / device-less factories for tests and dry runs.
"""

from .profiler import MoEProfiler, ProfilerConfig
from .records import markdown_table
from .timer import NULL_TIMER, PHASES, PhaseTimer

__all__ = ["MoEProfiler", "ProfilerConfig", "PhaseTimer", "NULL_TIMER", "PHASES", "markdown_table"]
