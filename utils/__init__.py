"""Everything around the quantization itself (quant/) and the models (models/), by role:

- ``utils.core``: the foundations that every other package may import, and that import nothing above
  them: one-line user errors (errors), atomic file writes (files), per-stage timing (timing), the CPU
  allocator setting (allocator), launcher variables (environment), process groups (distributed).
- ``utils.run``: one run of an entry script: flags and their checks (cli), names of scripts and output
  folders (naming), the pipeline's steps (pipeline), data sets, transforms and the published loaders
  (data), top-k counting (evaluate), the log (logs), ImageNet val sorting (imagenet), --demo (demo).
- ``utils.table``: the results table against the published one (results, paper_results.csv), its one
  writer (write) and figures (figures), and the comparison of captured inputs (capture).
- ``utils.runner``: tools/reproduce.py, the whole table in one command: its flags (flags), the plan and
  the cell records (cells), progress and estimates (progress), the local backend (local), the command
  (command).

``quant`` and ``models`` import nothing from here but ``utils.core``.
"""
