"""Speed and memory benchmarks of the pipeline's hot spots: ``python -m bench --help``.

Kept free of heavy imports: worker processes spawned by the CRF benchmark import this package.
"""
