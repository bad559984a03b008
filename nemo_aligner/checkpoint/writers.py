"""How Megatron's ``torch_dist`` checkpoint writer runs in our saves (which are synchronous).

- Its results travel through a plain in-process queue, not Megatron's default queue behind a
  ``multiprocessing`` manager (:func:`_in_process_write_results`).
- Small checkpoints are written by this process, large ones by Megatron's forked writers
  (:func:`_write_small_checkpoints_in_process`).
"""

import queue


def _in_process_write_results() -> None:
    """Saves run synchronously in this process, so the writer's results can travel through a
    plain in-process queue. Megatron's default is a queue behind a ``multiprocessing``
    manager started with the spawn method: ~2.4 s at the first save of every process, and a
    ~300 MB server process that outlives a killed run."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


# Checkpoints up to this many bytes of tensors are written by this process, larger ones by
# Megatron's forked writers (two processes writing two files at once).
IN_PROCESS_WRITE_BYTES = 64 * 2**20


def _write_small_checkpoints_in_process() -> None:
    """Megatron forks a writer process per file at every save (two by default), each then
    writing, syncing and reporting through queues: ~35 ms of fixed cost a save on 2 CPU cores,
    most of a small model's save. A checkpoint of at most :data:`IN_PROCESS_WRITE_BYTES` is
    written here instead, file after file, by Megatron's own per-file writer (same files,
    same fsync, same error reporting: an ``OSError`` comes back as the write's result);
    above that the parallel writers win (a 20 M-parameter model's save: 0.76 s forked,
    0.83 s in-process) and keep the save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    forked = writer.write_preloaded_data_multiproc
    if getattr(forked, "small_in_process", False):
        return

    def write(transform_list, use_msc, rank, write_buckets, global_results_queue):
        size = sum(t.numel() * t.element_size() for _, _, (_, tensors) in write_buckets for _, t in tensors)
        if size > IN_PROCESS_WRITE_BYTES:
            return forked(transform_list, use_msc, rank, write_buckets, global_results_queue)
        results, local, count = {}, queue.Queue(), queue.Queue()
        extra = {"use_msc": True} if use_msc else {}
        for i, bucket in enumerate(write_buckets):
            count.put(i)
            writer.write_preloaded_data(transform_list, i, bucket, local, count, use_fsync=True, **extra)
            index, result = local.get()
            if isinstance(result, Exception):
                global_results_queue.put(result)
                return
            results[index] = result
        global_results_queue.put(results)

    write.small_in_process = True
    writer.write_preloaded_data_multiproc = staticmethod(write)


def use_in_process_writers() -> None:
    """Both of the above (idempotent); call before ``dist_checkpointing.save``."""
    _in_process_write_results()
    _write_small_checkpoints_in_process()
