"""Everything that knows about ranks: mesh, expert dispatch, tensor/pipeline/data parallelism."""

from parallel.context import ParallelContext

__all__ = ["ParallelContext"]
