from __future__ import annotations

from ignite.engine import Engine, Events

from monai_ecrm.handlers.progress import ProgressBarHandler


def _engine() -> Engine:
    return Engine(lambda engine, batch: [{"loss": 0.5, "loss_main": 0.4, "loss_aux": 0.25}])


def test_progress_bar_shows_the_loss_terms(capsys):
    engine = _engine()
    ProgressBarHandler(persist=True).attach(engine)
    engine.run(range(3), max_epochs=2)
    shown = capsys.readouterr().err
    assert "3/3" in shown and "loss_aux=0.25" in shown


def test_disabled_progress_bar_attaches_nothing(capsys):
    engine = _engine()
    before = {event: len(engine._event_handlers[event]) for event in Events}
    ProgressBarHandler(enabled=False).attach(engine)
    assert {event: len(engine._event_handlers[event]) for event in Events} == before
    engine.run(range(3), max_epochs=1)
    assert "3/3" not in capsys.readouterr().err


def test_log_lines_are_written_above_the_bar_not_over_it(monkeypatch):
    """While the bar runs, console log lines go through ``tqdm.write`` (which clears and redraws the bar); after the
    run the handlers have their own streams back."""
    import io
    import logging
    import sys

    import tqdm

    written = []
    monkeypatch.setattr(
        tqdm.tqdm, "write", classmethod(lambda cls, text, file=None, end="\n", nolock=False: written.append(text))
    )
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        engine = Engine(lambda e, b: {"loss": 0.5})
        ProgressBarHandler(tqdm_kwargs={"file": io.StringIO()}).attach(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: root.warning("line %d", e.state.iteration))
        engine.run([0, 1], max_epochs=1)
        assert any(text.strip() == "line 1" for text in written) and any(t.strip() == "line 2" for t in written)
        assert handler.stream is sys.stderr, "the console stream is given back when the run ends"
    finally:
        root.removeHandler(handler)
