"""What frostline shows people: tables in the terminal, plots in the run folder."""

from frostline.report.plots import plot_lr_find, plot_training
from frostline.report.tables import model_map_table, summary_table

__all__ = ["model_map_table", "plot_lr_find", "plot_training", "summary_table"]
