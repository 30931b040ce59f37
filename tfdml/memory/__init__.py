"""Memories of past embeddings: XBM ring buffer, MMSI class dictionary."""

from tfdml.memory.class_dictionary import ClassDictionary  # noqa: F401
from tfdml.memory.xbm import CrossBatchMemory  # noqa: F401
