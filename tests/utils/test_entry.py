"""The end of a command-line run: exit handlers, threads and output survive skipping the
interpreter's teardown."""

import sys
import textwrap

from helpers import own_process


def test_exit_without_teardown_keeps_handlers_threads_and_output(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, pathlib, threading, time
        from nemo_aligner.utils.entry import exit_without_teardown

        out = pathlib.Path({str(tmp_path)!r})
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        print("no newline at the end", end="")
        exit_without_teardown()
        (out / "after").write_text("never")
    """))
    proc = own_process([sys.executable, str(script)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "no newline at the end"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
    assert not (tmp_path / "after").exists()
