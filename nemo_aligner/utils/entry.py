"""What every command-line script does around its work: user errors, final model, summary."""

import atexit
import contextlib
import os
import sys
import threading

from nemo_aligner.utils.config import cfg_get

from nemo_aligner.generation.engine import MissingDependencyError
from nemo_aligner.utils.errors import RunError

# Errors a user can cause; reported as one line, without a traceback. (Not every
# ImportError: only the ones raised on purpose for an optional package that is missing.)
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotImplementedError, MissingDependencyError, RunError)


@contextlib.contextmanager
def report_user_errors(errors=None):
    """Turn an error the user can fix (bad config, data, path, checkpoint; by default) into one
    line on stderr and exit status 1; anything else propagates with its traceback."""
    from nemo_aligner.checkpoint.distributed import CheckpointError
    from nemo_aligner.utils import distributed

    try:
        yield
    except errors or (*USER_ERRORS, CheckpointError) as e:
        rank = distributed.get_rank()
        prefix = f"[rank {rank}] " if rank else ""
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_training(cfg, build_trainer) -> None:
    """Build the trainer, fit, export the final model; user errors exit 1 with one line."""
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.logging import get_logger

    log = get_logger()
    if distributed.is_global_rank_zero():
        log.info(f"command: {' '.join(sys.argv)}")
    with report_user_errors():
        trainer = build_trainer(cfg)
    from nemo_aligner.utils.signals import StoppedBySignal

    try:
        # During the run only the errors that say what to fix are one line (a server that went
        # away, a broken reward function); a bug keeps its traceback.
        with report_user_errors((RunError,)):
            metrics = trainer.fit()
    except StoppedBySignal as e:
        if trainer.metrics_logger is not None:
            trainer.metrics_logger.close()
        print(str(e), file=sys.stderr, flush=True)
        distributed.destroy()
        sys.exit(128 + e.signum)
    finally:
        trainer.close()
    log_dir = cfg_get(cfg, "exp_manager.explicit_log_dir")
    if trainer.finished and cfg_get(cfg, "exp_manager.checkpoint_callback_params.save_final_model", True):
        trainer.export_final_model(f"{log_dir}/final_model")
    summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in trainer.progress_keys and k != "train/lr")
    log.info(f"done at step {trainer.step}: {summary}")
    log.info(f"checkpoints: {log_dir}/checkpoints  metrics: {log_dir}/metrics.jsonl  "
             f"tensorboard: {log_dir}/tensorboard")
    if trainer.metrics_logger is not None:
        trainer.metrics_logger.close()
    distributed.destroy()


def exit_without_teardown() -> None:
    """End a command-line run that finished well, without the interpreter's teardown.

    Called by the entry scripts after ``main()`` returned (not on an error: those exit the
    usual way, with their status). Exit handlers run and every file is flushed and closed as
    in a normal exit; what is skipped is freeing each module and object one by one, about a
    second for a process holding torch, Megatron-Core and a model, which the OS reclaims at
    once anyway.
    """
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
