"""Plot conventions the experiment programs share."""


def readable_log_scale(ax) -> None:
  """A log y axis labelled in plain numbers (120, 150, 200, ...), not powers of ten:
  perplexities span a few hundred, where matplotlib's default shows one label."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_yscale('log')
  plain = ticker.FuncFormatter(lambda y, _: f'{y:g}')
  ax.yaxis.set_major_formatter(plain)
  ax.yaxis.set_minor_formatter(plain)
  ax.tick_params(axis='y', which='minor', labelsize=7)


def epoch_axis(ax, fontsize: int | None = None) -> None:
  """An x axis of whole epochs."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_xlabel('epoch', fontsize=fontsize)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
