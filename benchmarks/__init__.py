"""gem-d2's benchmarks, one module per subcommand of ``python tools/benchmark.py`` (see :mod:`benchmarks.cli`).

The modules import torch, detectron2 and gem_d2 inside their functions; their shared pieces are in
:mod:`benchmarks.common`.
"""
