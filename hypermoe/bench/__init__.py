"""The benchmarks: `hypermoe bench` (the layer against the official approach) and `hypermoe bench --generation`.

    harness.py       what every benchmark shares: timing, memory, the GEMM probe, the machine description
    official.py      the official approach, re-implemented from SPEC.md, checked against ref/
    layer.py         the layer benchmark: implementations, the measured groups, the result
    layer_report.py  its tables (markdown)
    generation.py    the generation benchmark: onnxruntime, torch with and without KV cache
    cli.py           `hypermoe bench`

`from hypermoe import bench` gives the layer benchmark's names (bench.Options, bench.run, bench.markdown, ...).
"""

from hypermoe.bench.layer import FORWARD_ONLY, IMPLS, MODES, Options, make_impl, routing_load, run  # noqa: F401
from hypermoe.bench.layer_report import COLUMNS, markdown, table_rows, targets  # noqa: F401
from hypermoe.bench.official import official_error_vs_ref, official_layer  # noqa: F401
