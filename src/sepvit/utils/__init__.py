"""Measurement helpers shared by tests, benchmarks and the command line."""

from sepvit.utils.flops import count_macs, count_params, count_training_macs
from sepvit.utils.memory import freed_memory_kept, keep_freed_memory
from sepvit.utils.reparameterize import reparameterize

__all__ = [
    "count_macs",
    "count_params",
    "count_training_macs",
    "freed_memory_kept",
    "keep_freed_memory",
    "reparameterize",
]
