"""Framework conversions two at a time, for test modules that convert many models.

One conversion keeps about one core busy at a time: the framework child loads and exports
while the converting process waits, then the converting process measures and renders the
report while the child idles. A module that converts dozens of distinct models therefore
runs them in a few spawned worker processes (each its own converting process, with its own
framework child, exactly as ``edge-sdk convert`` runs), and its tests assert on the results
as before. Spawned, not forked: the test process holds onnxruntime's and scikit-learn's
threads. A conversion that raises is raised again by ``Future.result()`` in the test that
asks for it, so each case still fails on its own.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converters._pipeline import ConversionResult, ConvertConfig

WORKERS = max(1, min(2, os.cpu_count() or 1))  # CI runs on two cores


def _convert(src: Path, out: Path, options: Mapping[str, Any], trust_pickle: bool,
             config: ConvertConfig) -> ConversionResult:
    from converters._frontends import convert_source
    from converters._pipeline import ConvertOptions

    return convert_source(src, out, ConvertOptions(**options), source_kind=None,
                          input_shapes=None, trust_pickle=trust_pickle, config=config)


class ConvertPool:
    """``submit`` a conversion (``convert_source`` with ``ConvertOptions(**options)``);
    a future of its :class:`ConversionResult`."""

    def __init__(self, executor: ProcessPoolExecutor) -> None:
        self._executor = executor

    def submit(self, src: Path, out: Path, *, config: ConvertConfig,
               trust_pickle: bool = False, **options: Any) -> Future[ConversionResult]:
        return self._executor.submit(_convert, src, out, options, trust_pickle, config)


@contextmanager
def convert_pool(workers: int = WORKERS) -> Iterator[ConvertPool]:
    """The pool; spawned workers take this process's ``sys.path`` (multiprocessing passes
    it), so they import ``converters`` and ``tests`` from the same checkout."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as executor:
        yield ConvertPool(executor)
