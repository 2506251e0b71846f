"""Everything between a scheduled step and the sampled token ids: building the model (load, fuse, quantize, GGUF
blocks), the KV cache and its sizing, compiled layers, pipeline stages, sampling, and the worker loop of the other
ranks of a split model. The engine above it knows requests and blocks, never tensors."""
from .build import Blueprint, build, checkpoint_switches, kv_blocks, kv_estimate, memory_estimate, prepare, sharing
from .kv_cache import KVCache, kv_bytes_per_token, kv_pool_blocks
from .model_runner import ModelRunner, StepSeq
from .sampling import Sampled, SampleRequest, make_generator
from .worker import run_worker

__all__ = ["Blueprint", "build", "checkpoint_switches", "kv_blocks", "kv_estimate", "memory_estimate", "prepare",
           "sharing", "KVCache", "kv_bytes_per_token", "kv_pool_blocks", "ModelRunner", "StepSeq", "SampleRequest",
           "Sampled", "make_generator", "run_worker"]
