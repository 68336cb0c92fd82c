"""The demo and the experiments: datasets composed or read offline, whole pipelines, plots."""
