"""Prepare the next items of an iteration in a background thread, in order, a bounded number ahead.

A clinical job decodes and pre-processes the next frames while the network runs on the current one: decoding leaves
the critical path where the decoder releases the GIL (imagecodecs' JPEG 2000 decoder, see
:func:`monai_ecrm.data.image_io.dicom_decoding_plugin`; pydicom's pylibjpeg and Pillow plugins hold it).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["Prefetch", "prefetched"]


class Prefetch:
    """Iterate in a background thread, at most ``depth`` items ahead of the consumer, in order.

    An exception raised by the iterable is raised by ``next`` where the iterable raised it. A bounded queue, so the
    items ahead never hold more than ``depth`` frames. The decoders (imagecodecs) and torch release the GIL, so the
    thread decodes while the network runs. MONAI's ``monai.data.ThreadBuffer`` does the same queueing but ends the
    iteration silently when its source raises, which would cut a job short without a report: hence this class.

    Args:
        iterable: the items.
        depth: items prepared ahead (at least 1).
    """

    _END = object()

    def __init__(self, iterable: Iterable[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(iter(iterable),), name="monai-ecrm-prefetch")
        self._thread.daemon = True  # an interrupted job does not wait for it at exit
        self._thread.start()

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as error:  # raised again in the consumer's thread, in order
            self._put((None, error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # closes the files of an abandoned generator in this thread

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if error is not None:
            self._done = True
            raise error
        if item is self._END:
            self._done = True
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (after the item it is preparing) and wait for it."""
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def prefetched(iterable: Iterable[Any], depth: int) -> Iterator[Iterable[Any]]:
    """The items of ``iterable``, prepared ``depth`` ahead in a background thread (as they are, for ``depth`` 0).

    Args:
        iterable: the items.
        depth: items prepared ahead; 0 or less for none (no thread).
    """
    if depth <= 0:
        yield iterable
        return
    prefetch = Prefetch(iterable, depth)
    try:
        yield prefetch
    finally:
        prefetch.close()
