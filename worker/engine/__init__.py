"""The continuous-batching engine: the slot KV cache, prefill and decode, sampling, CUDA graphs."""
