"""Model surgery: tracing, cutting into levels, replica init, deepening."""
from .tracing import Tracer, TraceError, trace

__all__ = ["Tracer", "TraceError", "trace"]
