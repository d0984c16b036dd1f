"""Drift statistics over bounded summaries (histograms with fixed bins, counts, samples),
and their thresholds calibrated on a no-drift reference. Pure numbers: the monitor that feeds
them from the event stream is ``tailbridge.streams.monitor``."""
