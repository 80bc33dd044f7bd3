"""An OpenAI-compatible HTTP server for RetNet (and the Transformer baseline): continuous batching over fixed-size
state slots and exact prompt-state caching. ``retentive serve RUN_OR_CHECKPOINT`` runs it.

- ``protocol``: the OpenAI request and response bodies (pydantic) and error bodies;
- ``backends``: one state slot per running sequence, for RetNet and for a key-value-cache model;
- ``prefix_cache``: the state after a token prefix, in memory (LRU) and optionally on disk;
- ``engine``: the scheduler thread (continuous batching, chunked prefill, sampling, stop strings);
- ``transformers_engine``: transformers' own continuous batching behind the same front end (a Transformer baseline);
- ``app``: the HTTP routes and what guards them (API key, body and prompt limits); ``metrics``: ``/metrics`` in
  Prometheus' text format; ``server``: loading a checkpoint and putting it all together.
"""

from .app import ServerLimits, create_app
from .backends import Backend, KVCacheBackend, RetNetBackend, backend_for
from .engine import Engine, Request, SamplingParams, ServingEngine, Unsupported
from .prefix_cache import PrefixCache
from .server import ServeConfig, build_app, compile_decoding, load_checkpoint, run
from .transformers_engine import TransformersEngine

__all__ = [
    "Backend",
    "Engine",
    "KVCacheBackend",
    "PrefixCache",
    "Request",
    "RetNetBackend",
    "SamplingParams",
    "ServeConfig",
    "ServerLimits",
    "ServingEngine",
    "TransformersEngine",
    "Unsupported",
    "backend_for",
    "build_app",
    "compile_decoding",
    "create_app",
    "load_checkpoint",
    "run",
]
