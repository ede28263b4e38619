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
