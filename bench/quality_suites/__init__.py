"""The quality benchmark's suites, one module each; bench/quality.py is the entry point."""
