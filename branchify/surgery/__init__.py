"""Model surgery: tracing, cutting into levels, replica init, deepening."""
from .tracing import TraceError, Tracer, trace

__all__ = ["Tracer", "TraceError", "trace"]
