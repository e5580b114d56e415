"""infinillm: an embeddable async LLM runtime whose KV cache is one pool across instances.

Attention runs where the KV lives (DistAttention: partial attention merged exactly by
log-sum-exp); instances lend each other free KV blocks under a global ledger. See
docs/ARCHITECTURE.md for the module map.
"""

from __future__ import annotations

from .config import CacheConfig, ModelConfig, ParallelConfig, RuntimeConfig, SchedulerConfig, TransportConfig
from .errors import (
    CapacityError,
    InfiniLLMError,
    InstanceDeadError,
    RequestAbortedError,
    RequestTooLongError,
    SchedulerError,
    TransportError,
    ValidationError,
)
from .llm import LLM, AsyncLLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .runtime import Runtime, RuntimeStats, open_runtime
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "open_runtime",
    "LLM",
    "AsyncLLM",
    "Runtime",
    "RuntimeStats",
    "RuntimeConfig",
    "ModelConfig",
    "CacheConfig",
    "SchedulerConfig",
    "ParallelConfig",
    "TransportConfig",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "InfiniLLMError",
    "ValidationError",
    "CapacityError",
    "RequestTooLongError",
    "InstanceDeadError",
    "TransportError",
    "SchedulerError",
    "RequestAbortedError",
]
