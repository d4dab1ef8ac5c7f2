"""What a run leaves and shows: its directory (every file name and the one atomic
write), the typed record of its rounds, its line per round in the terminal, and its
heterogeneity report. Federated runs and the baselines share all of it."""
