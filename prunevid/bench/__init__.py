"""Benchmarks (`prunevid bench ...`), one role per file.

- `archs.py`: the models measured (real layer sizes, random weights) and how to build them;
- `measure.py`: prompts, one timed generate() per method, repeats, memory and cache probes;
- `probe.py`: `HostProbe`, the aten ops, host reads and uploads of torch code on any device;
- `profile.py`: `--profile`, each method's prefill and decode step under torch.profiler and
  `HostProbe` (kernels, syncs, copies, busy and host-overhead ms);
- `speed.py`: `bench speed`'s options, setup, stage-1 calibration and order of measurements;
- `report.py`: rows, summaries, the markdown table, targets, machine info, CSV and plot;
- `accuracy.py`: `bench accuracy`'s options, compared methods, sweep, printed table and plot
  (the scoring it runs is the library's, `prunevid.accuracy`);
- `cli.py`: the subcommands (`add_commands`), wired into `prunevid.cli`.
"""
