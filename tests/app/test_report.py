"""persample.app.report: the histogram's legend stays off the bars."""

import matplotlib.pyplot as plt
import torch

import persample.app.report
from persample.app.report import RunReport


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "steps": epoch, "train_loss": 1.0, "test_accuracy": 0.5, "epsilon": 1.0,
            "mean_batch_size": 64.0, "median_grad_norm": 1.0, "fraction_clipped": 0.5, "nonfinite_examples": 0,
            "seconds": 1.0}


def test_the_legend_does_not_cover_the_bars(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(persample.app.report.plt, "close", figures.append)
    report = RunReport(tmp_path, {}, max_grad_norm=1.0)
    # Epoch 1's norms spread evenly: every one of its bars is as tall as the tallest, across the whole axes, so a
    # legend anywhere inside them would cover some.
    report.add_epoch(_row(1), torch.linspace(0.0, 3.0, 1000))
    report.add_epoch(_row(2), torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2.0)
    report.finish("finished", {})
    (figure,) = figures
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        (ax,) = figure.axes
        legend = ax.get_legend().get_window_extent(renderer)
        bars = [patch.get_window_extent(renderer) for patch in ax.patches if patch.get_height() > 0]
        assert len(bars) > 50
        assert not any(legend.overlaps(bar) for bar in bars)
        page = figure.bbox  # and on the page: the saved image holds it
        assert page.x0 <= legend.x0 and page.y0 <= legend.y0 and legend.x1 <= page.x1 and legend.y1 <= page.y1
    finally:
        plt.close(figure)
    assert (tmp_path / "grad_norms.png").stat().st_size > 1000
