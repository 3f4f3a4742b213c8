"""Sweeps: the offline agent that runs a W&B sweep yaml as `wandb agent` would (sweep_file,
state, launch, agent, cli), a grid as a job array (array), the results table every run writes
(results), and what is drawn from it (report, spread)."""
