"""`edgellm bench`: our engine against the machine's decode ceiling and against peer engines.

* :mod:`edgellm.cli.bench` -- the command's arguments and its text / JSON report;
* :mod:`edgellm.bench.harness` -- the parent side: starts one worker process per engine, runs the
  repeats interleaved across engines, takes medians and ratios;
* :mod:`edgellm.bench.worker` -- one engine (ours, HF transformers, llama.cpp, or the memory
  bandwidth probe) in its own process, so that peak RSS and thread settings are its own.

Nothing here imports torch at module level.
"""
