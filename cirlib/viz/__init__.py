"""What the notebooks show: :mod:`~cirlib.viz.tables` saves result tables (CSV + markdown),
:mod:`~cirlib.viz.plots` draws and saves figures."""
