"""Side-by-side speed and memory benchmarks: wanx vs diffusers/transformers on identical weights.

Run ``python -m bench --help``. Nothing here is imported by wanx or run by the test suite.
"""
