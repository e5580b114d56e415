"""The cluster simulator: the real scheduler core under a roofline cost model (docs/SIMULATION.md)."""

from .cluster import POLICIES, ClusterSpec, RequestRecord, SimResult, Simulation, simulate
from .cost import CostModel, Efficiency
from .hardware import GPU, GPUS, MODELS, ModelShape, gpu, model_shape
from .traces import TraceRequest, TraceSpec, generate_trace, read_trace_csv, write_trace_csv

__all__ = [
    "POLICIES", "ClusterSpec", "RequestRecord", "SimResult", "Simulation", "simulate",
    "CostModel", "Efficiency", "GPU", "GPUS", "MODELS", "ModelShape", "gpu", "model_shape",
    "TraceRequest", "TraceSpec", "generate_trace", "read_trace_csv", "write_trace_csv",
]
