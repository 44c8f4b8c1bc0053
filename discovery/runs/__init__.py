"""Runs: a discovery run (model + task → scores → circuit → faithfulness → run folder) and sweeps;
the top layer beside the command line."""
