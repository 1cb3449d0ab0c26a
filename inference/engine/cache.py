"""Warm pipelines: an LRU of loaded models within a memory budget, so requests don't pay for loading."""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from inference.engine.engine import Engine
from inference.engine.kinds import Family, PipelineKind
from inference.engine.loading import (
    BasePipeline,
    LoadOptions,
    Pipeline,
    base_family,
    load_base_pipeline,
    pipeline_nbytes,
)
from inference.engine.media import MediaEngine

CacheKey = tuple[str, LoadOptions]
AnyEngine = Engine | MediaEngine


def engine_for(base: BasePipeline, options: LoadOptions) -> AnyEngine:
    """The engine around a loaded model: the image engine's own loop, or diffusers' video and audio pipelines."""
    if base_family(base) is Family.IMAGE:
        return Engine(base, optimizations=options.optimizations)  # type: ignore[arg-type]  # an SD pipeline
    return MediaEngine(base, optimizations=options.optimizations)  # type: ignore[arg-type]  # LTX or Stable Audio


@dataclass(frozen=True)
class LoadedPipeline:
    """A pipeline handed out by the cache, with what getting it cost.

    `load_ms` is cold-start time (wall clock, monotonic): 0 on a hit. It is recorded apart from GPU time
    and never billed to the customer.
    """

    pipeline: Pipeline
    source: str
    kind: PipelineKind
    options: LoadOptions
    load_ms: int
    nbytes: int
    cache_hit: bool
    # The engine around the model: runs requests on it with the optimizations of `options` applied.
    engine: AnyEngine


@dataclass
class _Entry:
    engine: AnyEngine
    nbytes: int
    kinds: set[PipelineKind] = field(default_factory=set)


class PipelineCache:
    """Loaded pipelines keyed by (source, kind, options), least recently used evicted past `budget_bytes`.

    All kinds of one (source, options) share one set of weights, counted once and evicted together. The model
    just loaded is never evicted, even when it alone exceeds the budget. Loads happen under the cache's lock,
    so two threads asking for the same cold model load it once. Evicting happens after a load: leave room in
    the budget (below the device's memory) for one more model while it loads.
    """

    def __init__(self, *, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must not be negative")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, source: str, kind: PipelineKind | str = PipelineKind.TEXT_TO_IMAGE, *, options: LoadOptions | None = None
    ) -> LoadedPipeline:
        kind = PipelineKind(kind)
        options = options or LoadOptions()
        key = (source, options)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and kind in entry.kinds:
                self._entries.move_to_end(key)
                return LoadedPipeline(
                    entry.engine.pipeline(kind), source, kind, options, 0, entry.nbytes, True, entry.engine
                )

            started = time.perf_counter()
            if entry is None:
                base = load_base_pipeline(source, options=options)
                # The engine applies the module optimizations in place: a model is cached per set of them.
                entry = _Entry(engine=engine_for(base, options), nbytes=pipeline_nbytes(base))
                self._entries[key] = entry
            # Another kind of a warm model: a new pipeline object around the same modules (no weights load).
            pipeline = entry.engine.pipeline(kind)
            entry.kinds.add(kind)
            load_ms = math.ceil((time.perf_counter() - started) * 1000)
            self._entries.move_to_end(key)
            self._evict_over_budget()
            return LoadedPipeline(pipeline, source, kind, options, load_ms, entry.nbytes, False, entry.engine)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def cached_models(self) -> list[CacheKey]:
        """The cached (source, options), least recently used first."""
        with self._lock:
            return list(self._entries)

    def evict(self, source: str, *, options: LoadOptions | None = None) -> bool:
        with self._lock:
            removed = self._entries.pop((source, options or LoadOptions()), None) is not None
        if removed:
            _release_memory()
        return removed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        _release_memory()

    def _evict_over_budget(self) -> None:
        evicted = False
        # len > 1: the entry just used is last and stays.
        while len(self._entries) > 1 and sum(entry.nbytes for entry in self._entries.values()) > self.budget_bytes:
            self._entries.popitem(last=False)
            evicted = True
        if evicted:
            _release_memory()


def _release_memory() -> None:
    # Pipelines hold reference cycles (modules <-> hooks); collect them now so the device memory comes back.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
