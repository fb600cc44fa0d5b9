"""The progress bar: a log file or a pipe gets the final state, not one line per refresh."""
import io
import time

from prefix_attn.progress import progress_bar


def test_a_log_gets_a_few_refreshes_not_one_per_step():
    log = io.StringIO()
    bar = progress_bar(300, "work", "step", file=log)
    for _ in range(300):                    # 0.6 s: six refreshes at a terminal's rate
        time.sleep(0.002)
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "300/300" in text
    assert text.count("\r") <= 3, text      # tqdm draws a refresh with a carriage return


def test_disabled_bar_writes_nothing():
    log = io.StringIO()
    bar = progress_bar(5, "work", "step", enabled=False, file=log)
    bar.update(5)
    bar.close()
    assert log.getvalue() == ""
