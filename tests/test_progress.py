import io

from fedmpi.progress import Progress


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(3, stream=out, tty=False)
    for r in (1, 2, 3):
        p.round_done(r, 0.5 + r / 10, 1.0, 2.0, 4.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("round    1/3  test_acc 0.6000") and "ETA 0:08" in lines[0]
    assert lines[2].endswith("ETA 0:00")


def test_bar_rewritten_in_place_on_a_terminal():
    out = io.StringIO()
    p = Progress(4, stream=out, tty=True)
    p.round_done(1, 0.25, 1.0, 1.0, 30.0)
    p.round_done(2, float("nan"), float("nan"), 1.0, 30.0)  # not evaluated: keeps last accuracy
    text = out.getvalue()
    assert text.count("\r") == 2 and "\n" not in text
    assert "[############............]" in text and "test_acc 0.2500  30.000 s/round  ETA 1:00" in text
    p.close()
    assert out.getvalue().endswith("\n")
