"""Loaders for image classification: a `Dataset` (see `datasets.py`) into batches.

Loaders are `grain.python.DataLoader`s:

* training: `IndexSampler` with seeded shuffling (a new permutation every epoch,
  infinite), the dataset's random augmentation as a `RandomMapTransform` (its
  per-record generator is derived from the seed and the record position, so the
  stream is reproducible), `Batch(drop_remainder=True)`; optional worker processes
  (`worker_count`). The iterator's `get_state()`/`set_state()` position goes into
  checkpoints.
* evaluation: the split in order, once, in batches padded to a fixed size with a
  `mask` (1 = real example), so one compiled eval step serves every batch and every
  host runs the same number of steps.

On several processes each loads only its rows of every global batch
(`ProcessShardSampler`), so the run does not depend on the number of processes.
"""

from __future__ import annotations

import math
import sys
from typing import Iterator, Optional

import grain.python as grain
import numpy as np

from experiments.classification.datasets import Dataset


class ProcessShardSampler:
    """This process's share of every global batch drawn from a sampler's record stream.

    A grain sampler defines one global stream of records; the global batch `t` is
    records `[t * B, (t + 1) * B)` of it (B = `global_batch_size`). Process `p` of `P`
    reads rows `[p * b, (p + 1) * b)` of every global batch (b = B / P), so the
    assembled global batch, and hence the whole run, is the same for any number of
    processes. With `worker_count` grain workers, which batch within their own share,
    the same holds batch for batch against one process with that many workers.

    Local position `j` (worker `w = j % W`, batch `m` of that worker, row `i`) maps to
    global position `w + W * (m * B + p * b + i)`, W = max(worker_count, 1).

    Args:
        sampler: The global sampler (`grain.IndexSampler` without sharding).
        global_batch_size: B, examples per global batch.
        worker_count: grain worker processes batching within their share (0: none).
        process_index: p (default `jax.process_index()`).
        process_count: P (default `jax.process_count()`).
    """

    def __init__(self, sampler, global_batch_size: int, *, worker_count: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        import jax

        self.sampler = sampler
        self.process_count = jax.process_count() if process_count is None else process_count
        self.process_index = jax.process_index() if process_index is None else process_index
        if global_batch_size < 1 or global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size must be a positive multiple of the {self.process_count} "
                f"processes, got {global_batch_size}"
            )
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.workers = max(int(worker_count), 1)
        total = len(sampler)
        if total >= sys.maxsize // 2:  # An infinite sampler.
            self._length = sys.maxsize
        else:
            if self.workers > 1:
                raise ValueError(
                    "a finite sampler must be read in order: pass worker_count=0 and batch "
                    "the records after the loader"
                )
            full, rest = divmod(total, global_batch_size)
            start = self.process_index * self.local_batch_size
            self._length = full * self.local_batch_size + min(max(rest - start, 0), self.local_batch_size)

    def global_index(self, index: int) -> int:
        """The position in the global stream of this process's position `index`."""
        worker, position = index % self.workers, index // self.workers
        batch, row = divmod(position, self.local_batch_size)
        offset = self.process_index * self.local_batch_size
        return worker + self.workers * (batch * self.global_batch_size + offset + row)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        if not 0 <= index < self._length:
            raise IndexError(f"index must be in [0, {self._length}), got {index}")
        return self.sampler[self.global_index(index)]

    def __repr__(self) -> str:
        # grain compares reprs when an iterator state is restored.
        return (
            f"ProcessShardSampler({self.sampler!r}, global_batch_size={self.global_batch_size}, "
            f"workers={self.workers}, process={self.process_index}/{self.process_count})"
        )


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    prefetch_buffer_size: int = 64,
) -> grain.DataLoader:
    """An infinite, shuffled, augmented and batched training loader (this process's share).

    Records are drawn epoch after epoch, each epoch a fresh seeded permutation;
    global batches are consecutive in that stream (a batch may span an epoch
    boundary), and this process loads its rows of each (`ProcessShardSampler`), so the
    global stream does not depend on the number of processes.

    Args:
        dataset: The `Dataset`.
        batch_size: Examples per global batch (over all processes).
        seed: Shuffling and augmentation seed.
        worker_count: grain worker processes (0: in this process).
        worker_buffer_size: Batches buffered per worker.
        read_threads: Threads reading records (per process / worker).
        prefetch_buffer_size: Records read ahead.

    Returns:
        A `grain.python.DataLoader`; `iter()` gives an iterator with
        `get_state()`/`set_state()`, yielding `{"image": uint8 (B, H, W, C),
        "label": int32 (B,)}`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset.train_source) < batch_size:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(dataset.train_source)} training examples"
        )
    sampler = ProcessShardSampler(
        grain.IndexSampler(
            num_records=len(dataset.train_source),
            shard_options=grain.NoSharding(),
            shuffle=True,
            num_epochs=None,
            seed=seed,
        ),
        batch_size,
        worker_count=worker_count,
    )
    operations = [dataset.train_transform] if dataset.train_transform is not None else []
    operations.append(grain.Batch(sampler.local_batch_size, drop_remainder=True))
    if worker_count:
        _ensure_absl_flags_parsed()
    return grain.DataLoader(
        data_source=dataset.train_source,
        sampler=sampler,
        operations=operations,
        shard_options=grain.NoSharding(),  # The sampler shards by process.
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        read_options=grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size
        ),
    )


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
    """Global eval batches that cover `num_examples` examples (every process runs them all)."""
    return math.ceil(num_examples / global_batch_size)


def eval_batches(
    dataset: Dataset,
    split: str,
    *,
    batch_size: int,
    worker_count: int = 0,
    read_threads: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's rows of each global batch of `split`, in order, padded.

    Global batch `t` holds the split's examples `[t * B, (t + 1) * B)` in order
    (B = `batch_size`, the global batch); this process yields its `B / P` rows of each
    as `{"image": uint8 (b, H, W, C), "label": int32 (b,), "mask": float32 (b,)}`
    with mask 0 on padding. Every process yields `num_eval_steps(len(split), B)`
    batches, so collective eval steps stay in lockstep.

    Args:
        dataset: The `Dataset`.
        split: "validation" (evaluation during training, selection) or "test" (once,
            at the end, for the chosen setting).
        batch_size: Examples per global batch (over all processes).
        worker_count: grain worker processes (records are batched here, in order).
        read_threads: Threads reading records.
    """
    source = dataset.eval_source(split)
    sampler = ProcessShardSampler(
        grain.IndexSampler(
            num_records=len(source),
            shard_options=grain.NoSharding(),
            shuffle=False,
            num_epochs=1,
            seed=0,
        ),
        batch_size,
    )
    operations = [dataset.eval_transform] if dataset.eval_transform is not None else []
    if worker_count:
        _ensure_absl_flags_parsed()
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        shard_options=grain.NoSharding(),
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64),
    )
    info = dataset.info
    local = sampler.local_batch_size
    image_shape = (info.image_size, info.image_size, info.in_chans)
    records = iter(loader)
    for _ in range(num_eval_steps(len(source), batch_size)):
        images = np.zeros((local,) + image_shape, np.uint8)
        labels = np.zeros((local,), np.int32)
        mask = np.zeros((local,), np.float32)
        for row in range(local):
            record = next(records, None)
            if record is None:
                break
            images[row], labels[row], mask[row] = record["image"], record["label"], 1.0
        yield {"image": images, "label": labels, "mask": mask}
