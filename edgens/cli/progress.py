"""Progress display for long commands: a tqdm bar per epoch and one summary line per finished epoch."""

from __future__ import annotations

import click


class EpochProgress:
    """Draws training progress from :class:`edgens.train.Callbacks` events (on stderr, so --json stays clean)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar = None

    def callbacks(self):  # -> edgens.train.Callbacks
        """Callbacks to pass to training."""
        from edgens.train import Callbacks

        return Callbacks(epoch_start=self._epoch_start, batch_end=self._batch_end, epoch_end=self._epoch_end)

    def _epoch_start(self, epoch: int, n_batches: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False, dynamic_ncols=True,
                        disable=None)  # None: no bar when stderr is not a terminal (logs, pipes)

    def _batch_end(self, batch: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def _epoch_end(self, record: dict) -> None:
        self.close()
        if self.quiet:
            return
        train, val = record["train"], record["val"]
        line = (f"epoch {record['epoch']:3d}  train loss {train['loss']:.4f} err {100 * train['ensemble_error']:5.2f}%"
                f"  val loss {val['ensemble_loss']:.4f} err {100 * val['ensemble_error']:5.2f}%  members "
                f"{100 * val['best_member_error']:.1f}/{100 * val['median_member_error']:.1f}/"
                f"{100 * val['worst_member_error']:.1f}%  ambiguity {val['ambiguity']:.3f}  {record['time_s']:.1f}s")
        if record["best_epoch"] == record["epoch"]:
            line += "  *"
        click.echo(line, err=True)

    def close(self) -> None:
        """Remove the current bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StageProgress:
    """A tqdm bar per named stage, driven by ``progress(stage, done, total)`` calls (export, profiling, benches)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.stage: str | None = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if stage != self.stage:
            self.close()
            from tqdm import tqdm

            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, leave=False, dynamic_ncols=True, disable=None)  # no bar off a tty
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        """Remove the current bar."""
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None
